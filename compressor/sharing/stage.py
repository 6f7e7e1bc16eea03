"""The sharing stage: ``model, record = share(model, ShareConfig(...))``."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..adapters import ArchitectureAdapter, module_weight
from ..adapters.alignment import (
    find_permutation,
    permute_weights,
    restrict,
    unit_features,
)
from ..adapters.base import ATTENTION_ROLES, FFN_ROLES
from ..data import calibration_texts
from ..errors import ConfigError
from ..fidelity import Reference, compare
from ..layer_groups import Grouping
from ..models import LoadedModel, unique_parameters
from ..models.sharing_manifest import SharingManifest, is_lora_parameter
from ..models.shared import install_shared
from ..progress import Progress
from ..record import StageRecord
from .config import ShareConfig, grouping_from_file, parse_plan

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


def _check_rank(adapter, blocks, modules, rank):
    """A rank no shared matrix can hold is an error; smaller matrices (grouped-query K/V) get full rank."""
    sizes = {path: tuple(module_weight(blocks[0].get_submodule(path)).shape) for path in modules}
    largest = max(min(s) for s in sizes.values())
    if rank > largest:
        path, (out_f, in_f) = max(sizes.items(), key=lambda kv: min(kv[1]))
        raise ConfigError(f"--lora-rank {rank} is above the size of every shared matrix (largest: {path}, {out_f} x {in_f}); use at most {largest}")


def _align_group(adapter, blocks, group, geometry, roles, progress: Progress | None = None) -> None:
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
        if progress is not None:
            progress.update()


def share(loaded: LoadedModel, config: ShareConfig, *,
          grouping: Grouping | None = None) -> tuple[LoadedModel, StageRecord]:
    """Merge the model's layers into groups that share their linear weights.

    The model is changed in place: in every group of two or more layers, each shared linear
    becomes a `SharedLinear` on one ``nn.Linear`` (the same Parameter object for all members);
    with ``lora_rank > 0`` each member adds its own low-rank delta. Norms and biases stay per
    layer. Singleton groups keep their dense weights.

    Args:
        loaded: A dense model (see `compressor.models.load_model`).
        config: The plan, what to share, how to initialise, LoRA rank.
        grouping: For ``config.groups`` without ``config.analysis``: the grouping an analysis of
            this model recommends, whose best partition into ``groups`` is the plan
            (`compressor.pipeline.compose.share` runs that analysis first).

    Returns:
        The shared model (``loaded.sharing`` holds the manifest a checkpoint needs) and a record
        with unique parameters before/after and, in ``metrics``: the plan, the energy of each
        residual its delta keeps, and fidelity to the original on calibration text.

    Raises:
        ConfigError: a bad plan, more groups than layers, a rank above a matrix size, a
            selection that splits a fused module, or ``groups`` with neither an analysis file
            nor a ``grouping``. Nothing is changed then.
    """
    start = time.perf_counter()
    roles, modules = check_selection(loaded, config)
    texts = (calibration_texts(config.data, text_column=config.text_column, encoding=config.encoding,
                               limit=config.max_samples) if config.fidelity else None)  # read first: a bad file fails at once
    plan, plan_source = _resolve_plan(loaded, config, grouping)
    # the original's outputs, taken before the model changes in place (not a copy of the model)
    reference = (Reference(loaded, texts, batch_size=config.batch_size, max_length=config.max_length,
                           device=config.device) if config.fidelity else None)
    params_before, bytes_before = unique_parameters(loaded.model)

    energy = _share_groups(loaded, plan, roles, modules, config)
    loaded.sharing = _manifest(plan, roles, modules, config)
    params_after, bytes_after = unique_parameters(loaded.model)
    metrics: dict = {
        "plan": plan,
        "plan_source": plan_source,
        "shared_modules": list(modules),
        "unique_params_before": params_before,
        "unique_params_after": params_after,
        "lora_params": sum(p.numel() for name, p in loaded.model.named_parameters() if is_lora_parameter(name)),
        **_energy_metrics(energy, config),
    }
    if reference is not None:
        with reference:
            metrics["fidelity"] = compare(loaded, reference)
    if any(len(g) > 1 for g in plan):
        metrics["note"] = NO_RECOVERY_NOTE
    record = StageRecord.build("share", config, before=(params_before, bytes_before), after=(params_after, bytes_after),
                               metrics=metrics, started=start)
    return loaded, record


def check_selection(loaded: LoadedModel, config: ShareConfig) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The roles and module paths to share, after every check that needs no data; changes nothing.

    Raises:
        ConfigError: as `share` does, before its slow part.
    """
    if loaded.sharing is not None:
        raise ConfigError(f"{loaded.name} is already shared; share the original dense model")
    adapter = loaded.adapter
    blocks = adapter.blocks(loaded.model)
    n = len(blocks)
    roles = tuple(r for r in config.shared_roles if r in adapter.roles)
    modules = shared_modules(adapter, roles)
    _check_rank(adapter, blocks, modules, config.lora_rank)
    if config.groups is not None and config.groups > n:
        raise ConfigError(f"--groups {config.groups} is more than the model's {n} layers")
    return roles, modules


def _resolve_plan(loaded: LoadedModel, config: ShareConfig,
                  grouping: Grouping | None) -> tuple[list[list[int]], str]:
    """``(plan, plan_source)``: the plan given, or the best contiguous groups of an analysis."""
    n = len(loaded.adapter.blocks(loaded.model))
    if config.plan is not None:
        return parse_plan(config.plan, n), "given"
    if config.analysis is not None:
        grouping, source = grouping_from_file(config.analysis), f" in {config.analysis}"
    elif grouping is None:
        raise ConfigError("--groups K takes its plan from an analysis: give --analysis analysis.json (from "
                          "`compress analyze -o`), or run `compress share`, which analyzes first", option="groups")
    else:
        source = ""
    if config.groups not in grouping.by_groups:
        raise ConfigError(f"the analysis{source} has no partition into {config.groups} groups", option="groups")
    plan = parse_plan(grouping.by_groups[config.groups].groups, n)
    return plan, f"best contiguous {config.groups} groups by {grouping.metric}{source}"


@torch.no_grad()
def _share_groups(loaded: LoadedModel, plan: list[list[int]], roles: tuple[str, ...],
                  modules: dict[str, tuple[str, ...]], config: ShareConfig) -> dict[str, dict[str, float]]:
    """Put every group of two or more layers on shared weights, in place.

    Returns:
        ``{layer: {module path: residual energy its LoRA delta keeps}}`` (0 without an SVD init).
    """
    adapter, geometry = loaded.adapter, loaded.geometry
    blocks = adapter.blocks(loaded.model)
    energy: dict[str, dict[str, float]] = {}
    shared = [group for group in plan if len(group) > 1]
    align = config.init == "aligned-mean"
    # a line per alignment or shared sublayer: a 1.7 B model's group takes half a minute
    steps = sum(len(group) - 1 for group in shared) * align + len(shared) * len(modules)
    with Progress("sharing", steps, "alignments and shared sublayers") as progress:
        for group in shared:
            if align:
                _align_group(adapter, blocks, group, geometry, roles, progress)
            for path in modules:
                for layer, kept in _share_module(blocks, group, path, config).items():
                    energy.setdefault(str(layer), {})[path] = kept
                progress.update()
    return energy


def _share_module(blocks, group: list[int], path: str, config: ShareConfig) -> dict[int, float]:
    """Share the module at ``path`` across ``group``; ``{layer: residual energy its delta keeps}``."""
    # whole modules, rows as stored: a fused module is shared whole
    weights = {layer: module_weight(blocks[layer].get_submodule(path)).clone() for layer in group}
    biases = {layer: _bias(blocks[layer].get_submodule(path)) for layer in group}
    # the mean in float32 whatever the model's dtype (a bf16 sum of several layers would round)
    shared_w = weights[group[0]] if config.init == "first" else torch.stack([w.float() for w in weights.values()]).mean(0)
    out_f, in_f = shared_w.shape
    ref = blocks[group[0]].get_submodule(path).weight
    base = nn.Linear(in_f, out_f, bias=False, dtype=ref.dtype, device=ref.device)
    base.weight.copy_(shared_w)
    installed = install_shared(blocks, group, path, base, biases, config.lora_rank, config.lora_alpha)
    svd_init = bool(config.lora_rank) and config.lora_init == "svd"
    stored = base.weight.float()  # the residual from the shared weight as stored
    return {layer: module.init_lora_from_residual(weights[layer].float() - stored) if svd_init else 0.0
            for layer, module in installed.items()}


def _manifest(plan: list[list[int]], roles: tuple[str, ...], modules: dict[str, tuple[str, ...]],
              config: ShareConfig) -> SharingManifest:
    """``loaded.sharing``: what a checkpoint needs to rebuild the shared model (see `install_shared`)."""
    return SharingManifest(plan=plan, modules=list(modules), roles=list(roles), init=config.init,
                           lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_init=config.lora_init)


def _energy_metrics(energy: dict[str, dict[str, float]], config: ShareConfig) -> dict:
    """The residual energy the SVD-initialised deltas keep, per layer and module and on average."""
    if not (config.lora_rank and config.lora_init == "svd" and energy):
        return {}
    values = [v for per_layer in energy.values() for v in per_layer.values()]
    return {"lora_energy_kept": energy, "lora_energy_kept_mean": sum(values) / len(values)}
