"""Embedding surgery: keep some rows of a model's vocabulary and keep its config true.

The input embedding keeps the rows of the kept tokens; an untied LM head and its bias keep
the same rows, and a tied head follows the embedding (it is the same tensor). The config's
``vocab_size`` (and the copy a model may hold) becomes the new row count, and every
``*_token_id`` of the config and the generation config is renumbered.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError


def model_token_ids(model) -> set[int]:
    """Token ids the model itself names: every ``*_token_id`` of its configs and the embedding's padding id."""
    ids: set[int] = set()
    for cfg in _configs(model):
        for key, value in cfg.to_dict().items():
            if key.endswith("_token_id"):
                ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    padding = model.get_input_embeddings().padding_idx
    if padding is not None:
        ids.add(padding)
    return ids


def _configs(model, *, generation: bool = True) -> list:
    """The model's config, its text config (if another object) and its generation config."""
    cfgs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        cfgs.append(text)
    if generation and getattr(model, "generation_config", None) is not None:
        cfgs.append(model.generation_config)
    return cfgs


def vocab_parameter_count(model) -> int:
    """Elements of the input embedding's weight and, if not tied to it, the LM head's weight and bias."""
    emb = model.get_input_embeddings()
    params = [emb.weight]
    out = model.get_output_embeddings()
    if out is not None:
        if out.weight is not emb.weight:
            params.append(out.weight)
        if getattr(out, "bias", None) is not None:
            params.append(out.bias)
    return sum(p.numel() for p in params)


def shrink_embeddings(model, keep: list[int], old_to_new: dict[int, int]) -> list[int]:
    """Keep the rows ``keep`` of the input embedding and the LM head, in place; set ``vocab_size``.

    Parameters are changed through ``.data``, so every alias (a tied head, a bias the head
    shares with its parent module) keeps pointing at the same, now smaller, tensor.

    Args:
        model: The model.
        keep: Old ids of the kept tokens, ascending; those past the embedding (tokens the
            tokenizer has and the embedding has no row for) stay rowless.
        old_to_new: Old id -> new id of every kept token.

    Returns:
        The old ids of the rows kept.

    Raises:
        UnsupportedModelError: position ids count from a padding id that would move, or the
            LM head and the embedding have different row counts; nothing is changed then.
    """
    import torch

    _check_position_padding(model, old_to_new)
    emb = model.get_input_embeddings()
    old_rows = emb.num_embeddings
    rows = [i for i in keep if i < old_rows]
    index = torch.tensor(rows, dtype=torch.long)
    out = model.get_output_embeddings()
    if out is not None and out.weight.shape[0] != old_rows:
        raise UnsupportedModelError(
            f"the LM head has {out.weight.shape[0]} rows and the embedding {old_rows}; cannot prune them together"
        )
    k = len(rows)
    with torch.no_grad():
        emb.weight.data = emb.weight.data.index_select(0, index)
        emb.num_embeddings = k
        if emb.padding_idx is not None:
            emb.padding_idx = old_to_new.get(emb.padding_idx)
        if out is not None:
            if out.weight is not emb.weight:
                out.weight.data = out.weight.data.index_select(0, index)
            if getattr(out, "bias", None) is not None:
                out.bias.data = out.bias.data.index_select(0, index)
            if hasattr(out, "out_features"):
                out.out_features = k
    for cfg in _configs(model, generation=False):
        cfg.vocab_size = k
    for module in {id(m): m for m in (model, getattr(model, "base_model", model))}.values():
        if isinstance(getattr(module, "vocab_size", None), int):  # Llama keeps a copy of it
            module.vocab_size = k
    return rows


def _check_position_padding(model, old_to_new: dict[int, int]) -> None:
    """RoBERTa-style models count position ids from the padding id; it must not move."""
    emb = model.get_input_embeddings()
    pad = emb.padding_idx
    if pad is None or old_to_new.get(pad) == pad:
        return
    for name, module in model.named_modules():
        if module is not emb and getattr(module, "padding_idx", None) == pad:
            raise UnsupportedModelError(
                f"{name} counts positions from the padding id {pad}, which pruning would renumber "
                f"to {old_to_new.get(pad)}; not pruned"
            )


def remap_config_ids(model, old_to_new: dict[int, int]) -> list[str]:
    """Renumber every ``*_token_id`` of the configs; ids that name no kept token become ``None``.

    Returns the ``key=id`` entries that were dropped, sorted.
    """
    dropped = []
    for cfg in _configs(model):
        for key, value in cfg.to_dict().items():
            if not key.endswith("_token_id") or value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) for v in values):
                continue
            mapped = [old_to_new.get(v) for v in values]
            dropped += [f"{key}={v}" for v, m in zip(values, mapped) if m is None]
            mapped = [m for m in mapped if m is not None]
            if isinstance(value, list):
                setattr(cfg, key, mapped)
            else:
                setattr(cfg, key, mapped[0] if mapped else None)
    return sorted(set(dropped))
