"""The pruning self-checks: prove on a two-layer copy that the adapter's head and FFN surgery
computes what zeroing the unit computes, before `prune` relies on it.

They build a copy of the architecture, so they run only where pruning (or `compress inspect`)
needs them, not at every load; see `compressor.adapters.checks` for the checks every load runs.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..adapters import ArchitectureAdapter, Geometry, module_weight
from ..adapters.checks import (
    MAPPING_RTOL,
    AdapterChecks,
    Check,
    final_hidden,
    probe_inputs,
    prove,
    relative_error,
    tolerance,
    weights_dtype,
    within,
)
from ..errors import first_line
from ..models import LoadedModel
from ..progress import track
from .structured import head_rows, prune_ffn, prune_heads

#: Vocabulary of the two-layer copy the pruning check builds.
PROBE_VOCAB = 512


def prove_pruning(loaded) -> float:
    """Run the pruning checks on a `LoadedModel` once (and the load's checks, if they have not
    run); what they rule out is refused on ``loaded.adapter``. Returns the seconds they took."""
    start = time.perf_counter()
    loaded.adapter, loaded.checks = prove_units(loaded.model, loaded.adapter, checks=loaded.checks)
    return time.perf_counter() - start


def prove_units(model: nn.Module, adapter: ArchitectureAdapter, *,
                checks: AdapterChecks | None = None) -> tuple[ArchitectureAdapter, AdapterChecks]:
    """`prove` plus ``prune heads`` / ``prune ffn``: the adapter with what they rule out
    refused, and the checks."""
    adapter, checks = prove(model, adapter, checks=checks)
    for unit, capability in track((("heads", "prune_heads"), ("ffn", "prune_ffn")), "pruning self-checks",
                                  unit="checks"):
        if checks.get(f"prune {unit}") is not None:
            continue
        if (unit == "heads" and adapter.refusal("permute_heads") and not adapter.refusal(capability)
                and not adapter.prunes_head_state):
            # a head read by state outside its block cannot leave it alone either, unless the
            # state is sliced with it (the check below proves that it is)
            adapter = adapter.with_refusals({capability: adapter.refusal("permute_heads")})
        result = checks.add(check_pruning(model, adapter, unit))
        if result.passed is False:
            adapter = adapter.with_refusals({capability: f"self-check 'prune {unit}' failed: {result.detail}"})
    return adapter, checks


def probe_model(model: nn.Module, adapter: ArchitectureAdapter, layers: int = 2) -> nn.Module:
    """A fresh copy of the model's architecture with ``layers`` blocks, randomly initialised."""
    config = copy.deepcopy(model.config)
    n = config.num_hidden_layers
    keep = min(layers, n)
    for key, value in list(config.to_diff_dict().items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, value[:keep])  # per-layer lists (Gemma's layer_types)
    config.num_hidden_layers = keep
    # a small vocabulary: the embeddings play no part in head or neuron surgery, and a
    # 150k-token table would dominate the check's time
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > PROBE_VOCAB:
        config.vocab_size = PROBE_VOCAB
        for key, value in list(config.to_dict().items()):
            if key.endswith("_token_id") and isinstance(value, int) and value >= PROBE_VOCAB:
                setattr(config, key, PROBE_VOCAB - 1 - ("pad" not in key))
    if getattr(config, "pruned_heads", None):
        config.pruned_heads = {k: v for k, v in config.pruned_heads.items() if int(k) < keep}
    torch.manual_seed(0)
    probe = rebuild(adapter, type(model), config)
    with torch.no_grad():  # as in a trained model: norms and biases not all 1 and 0
        for p in probe.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
        for path in adapter.head_state:
            # a trained relative bias is several units per head (initialised at 0.02, one head's
            # slice in another's place would pass unseen)
            adapter.base(probe).get_parameter(path).normal_(0.0, 1.0)
    return probe


def rebuild(adapter: ArchitectureAdapter, cls: type, config) -> nn.Module:
    """``cls(config)`` as a load builds it: transformers re-prunes ``config.pruned_heads``, the
    adapter slices the head state outside the blocks to match."""
    model = cls(config).eval()
    adapter.fit_head_state(model)
    return model


def check_pruning(model: nn.Module, adapter: ArchitectureAdapter, unit: str) -> Check:
    """Prune one ``unit`` (``heads`` or ``ffn``) in every layer of a two-layer copy; the result
    must rebuild from its config, load its own weights and run."""
    name = f"prune {unit}"
    capability = "prune_heads" if unit == "heads" else "prune_ffn"
    if adapter.refusal(capability):
        return Check(name, None, f"refused: {adapter.refusal(capability)}")
    try:
        probe = probe_model(model, adapter)
    except Exception as e:  # noqa: BLE001  (a config that does not rebuild: reported, not raised)
        return Check(name, False, f"the architecture does not rebuild from its config: {first_line(e)}")
    loaded = LoadedModel(model=probe, tokenizer=None, adapter=adapter, source="probe")
    g = loaded.geometry
    units = g.num_kv_heads if unit == "heads" else g.intermediate_size
    if units < 2:
        return Check(name, None, f"only one {'key/value head' if unit == 'heads' else 'FFN neuron'}")
    keep = {layer: list(range(units - 1)) for layer in range(g.num_layers)}
    try:
        inputs = probe_inputs(probe)
        masked = _without_last_unit(probe, adapter, g, unit)  # what the pruned model must compute
        (prune_heads if unit == "heads" else prune_ffn)(loaded, keep, set())
        out = final_hidden(adapter, probe, inputs)
        err = relative_error(out, final_hidden(adapter, masked, inputs))
        if not within(err, tolerance(MAPPING_RTOL * 10, weights_dtype(probe))):
            return Check(name, False, f"the pruned copy does not compute what the unit's output columns zeroed "
                                      f"compute (relative error {err:.1e}): the rows cut are not that unit's")
        rebuilt = rebuild(adapter, type(probe), copy.deepcopy(probe.config))
        expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        wrong = next((k for k in expected if got.get(k) != expected[k]), None)
        if wrong:
            return Check(name, False, f"after pruning, the config rebuilds {wrong} as {got.get(wrong)}, the model "
                                      f"holds {expected[wrong]}", wrong)
        rebuilt.load_state_dict(probe.state_dict())
        err = relative_error(final_hidden(adapter, rebuilt, inputs), out)
        if err > MAPPING_RTOL:
            return Check(name, False, f"the model rebuilt from the pruned config computes something else "
                                      f"(relative error {err:.1e})")
    except Exception as e:  # noqa: BLE001  (whatever breaks here is the finding)
        return Check(name, False, f"pruning one {unit[:-1] if unit == 'heads' else 'neuron'} through the adapter "
                                  f"breaks the model: {first_line(e)}")
    what = ("FFN neuron" if unit == "ffn" else "head" if g.heads_per_kv == 1
            else f"key/value head with its {g.heads_per_kv} query heads")
    return Check(name, True, f"one {what} pruned in every layer of a 2-layer copy: computes what zeroing it does, "
                             "config matches shapes, reloads and runs")


def _without_last_unit(probe, adapter: ArchitectureAdapter, g: Geometry, unit: str):
    """A copy of ``probe`` whose last attention unit (or FFN neuron) writes nothing: its columns
    of the output projection are zero. Removing the unit must compute the same."""
    masked = copy.deepcopy(probe)
    with torch.no_grad():
        for block in adapter.blocks(masked):
            if unit == "heads":
                cols = head_rows([g.num_kv_heads - 1], g.heads_per_kv, g.head_dim)
                module_weight(adapter.linear(block, "attn_out"))[:, cols] = 0
            else:
                module_weight(adapter.linear(block, "ffn_out"))[:, g.intermediate_size - 1] = 0
    return masked


