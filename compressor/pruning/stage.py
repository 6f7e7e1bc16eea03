"""The pruning stage: ``model, record = prune(model, PruneConfig(...))``."""

from __future__ import annotations

import time

import torch

from ..data import calibration_texts
from ..errors import ConfigError, ResultError, first_line
from ..fidelity import Reference, compare
from ..models import LoadedModel, unique_parameters
from ..record import StageRecord
from . import importance, structured
from .config import PruneConfig


class PruneError(ResultError):
    """The pruned model does not run (the work's result failed its check: exit 1)."""


def prune(loaded: LoadedModel, config: PruneConfig) -> tuple[LoadedModel, StageRecord]:
    """Remove layers, attention heads, FFN neurons and unused vocabulary, in that order.

    The model is changed in place. Layers go first (the lowest Block Influence), then heads
    and neurons are ranked on what is left and the same count is removed in every layer (the
    config holds one head count and one FFN width); layers that share weights keep the same
    units. A vocabulary cut comes last.

    Returns:
        The pruned model and a record with unique parameters before/after and, in ``metrics``:
        the dropped layers and their Block Influence, the kept heads and neurons per layer, the
        new geometry, the vocabulary cut, and fidelity to the model as it came in.

    Raises:
        ConfigError: more layers to drop than the model has, or bad data.
        UnsupportedModelError: the family cannot prune what is asked (said by its adapter or
            found by the adapter's pruning self-check); nothing is changed then.
        PruneError: the pruned model no longer runs.
    """
    start = time.perf_counter()
    _check_request(loaded, config)
    texts, vocab_texts = _read_texts(loaded, config)  # all data first, so that a bad file fails before any work

    # the original's outputs, taken before the model changes in place (not a copy of the model)
    reference = (Reference(loaded, texts, batch_size=config.batch_size, max_length=config.max_length,
                           device=config.device) if config.fidelity else None)
    params_before, bytes_before = unique_parameters(loaded.model)
    geometry_before = loaded.geometry
    metrics: dict = {}
    if config.drop_layers:
        metrics.update(_drop_layers(loaded, config, texts))
    if config.heads or config.ffn:
        metrics.update(_prune_units(loaded, config, texts))
    if vocab_texts is not None:
        from .vocab import prune_vocabulary

        metrics["vocabulary"] = prune_vocabulary(loaded, vocab_texts, min_count=config.vocab_min_count)

    _check_runs(loaded, texts)
    metrics["geometry_before"] = _geometry(geometry_before)
    metrics["geometry_after"] = _geometry(loaded.geometry)
    params_after, bytes_after = unique_parameters(loaded.model)
    if reference is not None:
        with reference:
            metrics["fidelity"] = compare(loaded, reference)
        loaded.model.cpu()
    record = StageRecord.build("prune", config, before=(params_before, bytes_before), after=(params_after, bytes_after),
                               metrics=metrics, started=start)
    return loaded, record


def _check_request(loaded: LoadedModel, config: PruneConfig) -> None:
    """Refuse what this model cannot have done to it, before any work."""
    n = len(loaded.adapter.blocks(loaded.model))
    if config.drop_layers >= n:
        raise ConfigError(f"--drop-layers {config.drop_layers} would leave no layer of the model's {n}")
    g = loaded.geometry
    heads = "attention heads" if g.heads_per_kv == 1 else f"key/value heads (with their {g.heads_per_kv} query heads)"
    for option, share, units, what in (("heads", config.heads, g.num_kv_heads, heads),
                                       ("ffn", config.ffn, g.intermediate_size, "FFN neurons")):
        if share and int(round(share * units)) >= units:
            raise ConfigError(f"--{option} {share:g} would remove all {units} {what} of every layer; "
                              f"at most {units - 1} can go (--{option} {(units - 1) / units:.3f})")
    require_pruning(loaded, heads=bool(config.heads), ffn=bool(config.ffn), layers=bool(config.drop_layers))


def _read_texts(loaded: LoadedModel, config: PruneConfig) -> tuple[list[str], list[str] | None]:
    """``(calibration texts, the vocabulary's domain texts or None)``.

    Raises:
        ConfigError: calibration needs text and the model has no tokenizer (or bad data).
    """
    vocab_texts = None
    if config.vocab_from:
        from ..data.datasets import load_texts_from

        # interleaved, so that the calibration texts taken from the front come from every source
        vocab_texts = load_texts_from(config.vocab_from, text_column=config.text_column, encoding=config.encoding)
    if config.data is None and vocab_texts is not None:
        # A model cut to a domain's vocabulary is meant for that domain: calibrate and measure
        # fidelity on its text, not on general sentences whose rarer words it no longer has.
        texts = vocab_texts[: config.max_samples]
    else:
        texts = calibration_texts(config.data, text_column=config.text_column, encoding=config.encoding,
                                  limit=config.max_samples)
    needs_text = config.fidelity or config.drop_layers or ((config.heads or config.ffn) and config.score == "taylor")
    if needs_text and loaded.tokenizer is None:
        raise ConfigError(f"{loaded.name} has no tokenizer; calibration needs one (use --score magnitude --no-fidelity)")
    return texts, vocab_texts


def _drop_layers(loaded: LoadedModel, config: PruneConfig, texts: list[str]) -> dict:
    """Drop the ``config.drop_layers`` blocks of lowest Block Influence on ``texts``."""
    from ..models.block_outputs import collect_block_outputs

    influence = collect_block_outputs(loaded, texts, max_length=config.max_length, batch_size=config.batch_size,
                                      max_tokens=16, device=config.device).block_influence
    drop = sorted(torch.argsort(influence)[: config.drop_layers].tolist())
    structured.drop_layers(loaded, drop)
    return {"dropped_layers": drop, "block_influence": [round(float(v), 6) for v in influence]}


def _prune_units(loaded: LoadedModel, config: PruneConfig, texts: list[str]) -> dict:
    """Rank heads and FFN neurons and remove the same count in every layer (a group keeps the same ones)."""
    if config.score == "taylor":
        head_scores, neuron_scores = importance.taylor_scores(
            loaded, texts, batch_size=config.batch_size, max_length=config.max_length, device=config.device)
    else:
        head_scores, neuron_scores = importance.magnitude_scores(loaded)
    loaded.model.cpu()
    metrics: dict = {}
    done: set[int] = set()  # shared bases already cut
    if config.heads:
        groups = _groups(loaded, ("query", "key", "value", "attn_out"))
        if loaded.adapter.head_state:
            # heads read by one state outside the blocks (MPNet's relative bias) go from every
            # layer at once: ranked by their importance summed over the layers
            groups = [[i for group in groups for i in group]]
        keep = importance.select(head_scores, groups, config.heads)
        structured.prune_heads(loaded, keep, done)
        metrics["kept_heads"] = {str(k): v for k, v in keep.items()}
    if config.ffn:
        keep = importance.select(neuron_scores, _groups(loaded, ("ffn_gate", "ffn_in", "ffn_out")), config.ffn)
        structured.prune_ffn(loaded, keep, done)
        metrics["ffn_width"] = len(next(iter(keep.values())))
    structured.recap_all(loaded)
    return metrics


def require_pruning(loaded: LoadedModel, *, heads: bool, ffn: bool, layers: bool) -> None:
    """Refuse, in one line, a pruning the family cannot do, before anything changes.

    The adapter's pruning self-checks (one head and one neuron pruned in a two-layer copy,
    which must rebuild from its config and run) are run here once, and what they rule out is
    refused as the family's declared limits are.
    """
    from .checks import prove_pruning

    if heads or ffn:
        prove_pruning(loaded)
    for wanted, capability in ((heads, "prune_heads"), (ffn, "prune_ffn"), (layers, "drop_layers")):
        if wanted:
            loaded.adapter.require(capability)


def _groups(loaded: LoadedModel, roles: tuple[str, ...]) -> list[list[int]]:
    """Layers that must keep the same units: the sharing groups, if any of ``roles`` is shared."""
    n = len(loaded.adapter.blocks(loaded.model))
    sharing = loaded.sharing
    if sharing and set(sharing.roles) & set(roles):
        return [list(g) for g in sharing.plan]
    return [[i] for i in range(n)]


def _geometry(g) -> dict:
    return {"layers": g.num_layers, "heads": g.num_heads, "kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
            "ffn": g.intermediate_size, "hidden": g.hidden_size}


@torch.no_grad()
def _check_runs(loaded: LoadedModel, texts: list[str]) -> None:
    """One forward pass on real text; a pruned model that fails it is an error, not a file."""
    if loaded.tokenizer is None:
        return
    try:
        enc = loaded.tokenizer(texts[:2], padding=True, truncation=True, max_length=32, return_tensors="pt")
        loaded.model.cpu().eval()(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    except Exception as e:  # noqa: BLE001 - any failure here means the surgery broke the model
        raise PruneError(f"the pruned model no longer runs: {first_line(e, with_type=True)}") from None
