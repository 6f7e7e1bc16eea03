"""The sharing stage: ``model, record = share(model, ShareConfig(...))``."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..adapters import ArchitectureAdapter
from ..adapters.base import ATTENTION_ROLES, FFN_ROLES
from ..adapters import module_weight
from ..analysis.alignment import find_permutation, permute_weights, restrict, unit_features
from ..data import calibration_texts
from ..errors import ConfigError
from ..models import LoadedModel, unique_parameters
from ..record import StageRecord
from .config import ShareConfig, parse_plan
from .layer import SharedLinear

#: Printed with every share that has no recovery training behind it.
NO_RECOVERY_NOTE = (
    "Sharing without recovery training costs a lot of quality (expect an embedding cosine to the "
    "original far below 1); recover it by distilling from the original with `compress finetune`."
)


def shared_modules(adapter: ArchitectureAdapter, roles: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Module paths to share for the chosen roles; a fused module must be chosen whole."""
    chosen = adapter.module_roles(roles)
    for path, held in adapter.module_roles().items():
        if path in chosen and chosen[path] != held:
            raise ConfigError(
                f"{adapter.family} fuses {', '.join(held)} into one module ({path}); share all of them or none"
            )
    if not chosen:
        raise ConfigError(f"--share selects no sublayer of a {adapter.family} model")
    return chosen


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().clone()


def install_shared(blocks, group: list[int], path: str, base: nn.Linear, biases: dict[int, torch.Tensor | None],
                   lora_rank: int, lora_alpha: float | None) -> dict[int, SharedLinear]:
    """Replace the module at ``path`` in every layer of ``group`` by a `SharedLinear` on ``base``.

    The rank is capped at the matrix's smaller side. Used both to share and to rebuild a saved
    checkpoint, so the two always agree.
    """
    installed = {}
    # A matrix smaller than the rank (grouped-query K/V) gets a full-rank delta.
    rank = min(lora_rank, base.in_features, base.out_features)
    for layer in group:
        module = SharedLinear(base, biases[layer], rank, lora_alpha)
        blocks[layer].set_submodule(path, module)
        installed[layer] = module
    return installed


def _check_rank(adapter, blocks, modules, rank):
    """A rank no shared matrix can hold is an error; smaller matrices (grouped-query K/V) get full rank."""
    sizes = {path: tuple(module_weight(blocks[0].get_submodule(path)).shape) for path in modules}
    largest = max(min(s) for s in sizes.values())
    if rank > largest:
        path, (out_f, in_f) = max(sizes.items(), key=lambda kv: min(kv[1]))
        raise ConfigError(f"--lora-rank {rank} is above the size of every shared matrix (largest: {path}, {out_f} x {in_f}); use at most {largest}")


def _align_group(adapter, blocks, group, geometry, roles) -> None:
    """Permute every member onto the group's first layer (function-preserving, in place)."""
    ref_w, _ = adapter.block_weights(blocks[group[0]], geometry)
    ref_features = unit_features(ref_w, geometry)
    # Only the shared half needs lining up, and only units the adapter lets move (MPNet's heads
    # are read by a bias outside the block) may be moved.
    heads = any(r in roles for r in ATTENTION_ROLES) and adapter.refusal("permute_heads") is None
    neurons = any(r in roles for r in FFN_ROLES) and adapter.refusal("permute_neurons") is None
    for layer in group[1:]:
        w, b = adapter.block_weights(blocks[layer], geometry)
        perm = restrict(find_permutation(ref_features, unit_features(w, geometry)), geometry, heads=heads, neurons=neurons)
        adapter.load_block_weights(blocks[layer], *permute_weights(w, b, perm, geometry), geometry)


def share(loaded: LoadedModel, config: ShareConfig) -> tuple[LoadedModel, StageRecord]:
    """Merge the model's layers into groups that share their linear weights.

    The model is changed in place: in every group of two or more layers, each shared linear
    becomes a `SharedLinear` on one ``nn.Linear`` (the same Parameter object for all members);
    with ``lora_rank > 0`` each member adds its own low-rank delta. Norms and biases stay per
    layer. Singleton groups keep their dense weights.

    Args:
        loaded: A dense model (see `compressor.models.load_model`).
        config: The plan, what to share, how to initialise, LoRA rank.

    Returns:
        The shared model (``loaded.sharing`` holds the manifest a checkpoint needs) and a record
        with unique parameters before/after and, in ``metrics``: the plan, the energy of each
        residual its delta keeps, and fidelity to the original on calibration text.

    Raises:
        ConfigError: a bad plan, more groups than layers, a rank above a matrix size, or a
            selection that splits a fused module. Nothing is changed then.
    """
    start = time.perf_counter()
    if loaded.sharing is not None:
        raise ConfigError(f"{loaded.name} is already shared; share the original dense model")
    adapter, model = loaded.adapter, loaded.model
    geometry = loaded.geometry
    blocks = adapter.blocks(model)
    n = len(blocks)
    roles = tuple(r for r in config.shared_roles if r in adapter.roles)
    modules = shared_modules(adapter, roles)
    _check_rank(adapter, blocks, modules, config.lora_rank)
    if config.groups is not None and config.groups > n:
        raise ConfigError(f"--groups {config.groups} is more than the model's {n} layers")

    texts = (calibration_texts(config.data, text_column=config.text_column, encoding=config.encoding,
                               limit=config.max_samples) if config.fidelity else None)  # read first: a bad file fails at once
    if config.plan is not None:
        plan = parse_plan(config.plan, n)
        plan_source = "given"
    else:
        plan = _plan_from_analysis(loaded, config)
        model.cpu()  # the analysis ran on config.device; the surgery below works on the CPU
        plan_source = f"best contiguous {config.groups} groups by {config.plan_metric}"

    original = copy.deepcopy(loaded) if config.fidelity else None
    params_before, bytes_before = unique_parameters(model)

    energy: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for group in plan:
            if len(group) < 2:
                continue
            if config.init == "aligned-mean":
                _align_group(adapter, blocks, group, geometry, roles)
            for path in modules:
                # whole modules, rows as stored: a fused module is shared whole
                weights = {layer: module_weight(blocks[layer].get_submodule(path)).clone() for layer in group}
                biases = {layer: _bias(blocks[layer].get_submodule(path)) for layer in group}
                if config.init == "first":
                    shared_w = weights[group[0]]
                else:
                    shared_w = torch.stack(list(weights.values())).mean(0)
                out_f, in_f = shared_w.shape
                ref = blocks[group[0]].get_submodule(path).weight
                base = nn.Linear(in_f, out_f, bias=False, dtype=ref.dtype, device=ref.device)
                base.weight.copy_(shared_w)
                installed = install_shared(blocks, group, path, base, biases, config.lora_rank, config.lora_alpha)
                for layer, module in installed.items():
                    if config.lora_rank and config.lora_init == "svd":
                        kept = module.init_lora_from_residual(weights[layer] - shared_w)
                    else:
                        kept = 0.0
                    energy.setdefault(str(layer), {})[path] = kept

    loaded.sharing = {
        "plan": plan,
        "modules": list(modules),
        "roles": list(roles),
        "init": config.init,
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_init": config.lora_init,
    }
    params_after, bytes_after = unique_parameters(model)
    metrics: dict = {
        "plan": plan,
        "plan_source": plan_source,
        "shared_modules": list(modules),
        "unique_params_before": params_before,
        "unique_params_after": params_after,
        "lora_params": sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_),
    }
    if config.lora_rank and config.lora_init == "svd" and energy:
        values = [v for per_layer in energy.values() for v in per_layer.values()]
        metrics["lora_energy_kept"] = energy
        metrics["lora_energy_kept_mean"] = sum(values) / len(values)
    if original is not None:
        from ..evaluation.fidelity import fidelity

        metrics["fidelity"] = fidelity(loaded, original, texts, batch_size=config.batch_size,
                                       max_length=config.max_length, device=config.device)
        del original
    shared_any = any(len(g) > 1 for g in plan)
    if shared_any:
        metrics["note"] = NO_RECOVERY_NOTE
    record = StageRecord(
        stage="share",
        config=config.to_dict(),
        params_before=params_before,
        params_after=params_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        metrics=metrics,
        seconds=time.perf_counter() - start,
    )
    return loaded, record


def _plan_from_analysis(loaded: LoadedModel, config: ShareConfig) -> list[list[int]]:
    from ..analysis import AnalyzeConfig, analyze

    weight_metric = config.plan_metric.endswith("weight")
    analysis_config = AnalyzeConfig(
        groups=config.groups, metric=config.plan_metric, weights=weight_metric, activations=not weight_metric,
        data=config.data, text_column=config.text_column, encoding=config.encoding,
        max_samples=config.max_samples, max_length=config.max_length, batch_size=config.batch_size,
        device=config.device,
    )
    _, record = analyze(loaded, analysis_config)
    return record.metrics["grouping"]["recommended"]["groups"]
