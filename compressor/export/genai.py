"""The export of a decoder in onnxruntime-genai's layout (``compress export --layout genai``).

The graph is built from the model through its adapter, not from a per-family exporter config:
the adapter names each block's projections (and the rows of fused ones), its norms and head
norms; what the adapter does not say is read off the model and proved on it before anything is
written (`describe`):

* each norm's kind (LayerNorm, RMSNorm, RMSNorm over ``1 + weight``) and epsilon, by running the
  norm module on a seeded input against each candidate;
* the embedding scale (Gemma's sqrt(hidden)) and a learned position table with its offset (OPT
  counts from 2), from what the first block receives on a probe sequence;
* each layer's rotary tables, from the rotary embedding module that feeds it on that probe
  (Gemma 3's local layers read another base), as full tables over the context;
* the attention's scale, soft-cap and sliding window from the attention modules, the FFN's
  activation from the config.

Whatever is read this way is then checked as a whole: the written folder is loaded with
``onnxruntime_genai.Model`` and run (`check_genai`): its prefill and every cached step against
PyTorch's logits, and in fp32 its greedy tokens against PyTorch's. A family this writer cannot
express is refused before writing, in one line that names the part.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters.base import applied_weight, find_path, get_path, module_weight
from ..errors import ConfigError, ExportError, UnsupportedModelError
from ..progress import Progress

#: The quantization methods the genai layout writes (the runtime's CPU attention is float32, so
#: an fp16 graph would only cast around it; dynamic int8 and static int8 are optimum's layout).
GENAI_PRECISIONS = ("fp32", "int4")
#: Rotary scalings whose tables change with the sequence length: one table cannot hold them.
_DYNAMIC_ROPE = ("dynamic", "longrope")
#: Positions the probe sequence runs (enough for a rotary table to tell its layers apart).
_PROBE_TOKENS = 6


def genai_refusal(loaded, quantize) -> str | None:
    """Why ``loaded`` (with ``quantize``) cannot be written in the genai layout, before any work;
    ``None``: it can be tried (the check after writing proves it)."""
    adapter, config = loaded.adapter, loaded.model.config
    if not adapter.is_decoder:
        return (f"--layout genai writes decoders for onnxruntime-genai; {loaded.name} is an encoder "
                f"({adapter.family}): use --layout optimum")
    if quantize is not None and quantize.name not in GENAI_PRECISIONS:
        return (f"--layout genai writes fp32 or int4 (the runtime's CPU attention runs in float32); "
                f"--quantize {quantize.name} exports with --layout optimum")
    if quantize is not None and getattr(quantize, "int4_method", None) == "hqq":
        return ("--int4-method hqq stores float zero points, which MatMulNBits runs off its fast int8 path on "
                "CPUs; use rtn or gptq with --layout genai, or --layout optimum")
    if getattr(quantize, "embedding_hot_share", 0):
        return "--embedding-hot-share splits the token table, which the genai layout's tied lookup cannot read"
    name = f"{adapter.family} models"
    head_dim = adapter.geometry(config).head_dim
    if head_dim % 16:
        return (f"{loaded.name}'s attention heads are {head_dim} wide; onnxruntime's GroupQueryAttention takes "
                "head sizes that are multiples of 16")
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind in _DYNAMIC_ROPE:
        return (f"{name} with rope_type {kind} change their rotary tables with the sequence length, which "
                "GroupQueryAttention's fixed cos/sin tables cannot express")
    if getattr(config, "do_layer_norm_before", True) is False:
        return f"{name} that normalize after each sublayer (do_layer_norm_before=false) have no fused norm layout here"
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        return f"{name} whose embeddings are projected in and out (word_embed_proj_dim) have no genai layout here"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return f"{name} that scale each layer's attention by its index are not expressible in GroupQueryAttention"
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "") == "alibi":
        return f"{name} with ALiBi position biases: GroupQueryAttention takes rotary or no position encoding"
    if adapter.fused and any(f.per_head and f.roles != ("query", "key", "value") for f in adapter.fused.values()):
        return f"{name}: a per-head fused projection other than query, key, value"
    return None


# --- reading the model ------------------------------------------------------------------------
@dataclass
class Described:
    """The model as the graph writer takes it, and what reading it found."""

    decoder: Any
    layers: Iterator
    parts: dict[Hashable, list[tuple[torch.nn.Module, torch.Tensor | None]]] = field(default_factory=dict)
    found: dict[str, Any] = field(default_factory=dict)


def describe(loaded, model: torch.nn.Module, context_length: int) -> Described:
    """`onnx.genai.Decoder` and its layers (made one at a time) for ``model``.

    Raises:
        UnsupportedModelError: a part the genai layout cannot express (the message names it).
    """
    from ..onnx.genai import ACTIVATIONS, Decoder, default_scale

    adapter, config = loaded.adapter, model.config
    geometry = adapter.geometry(config)
    blocks = adapter.blocks(model)
    base = adapter.base(model)
    probe = _probe(model, adapter, blocks)
    found: dict[str, Any] = {}
    act_name = next((v for k in ("hidden_activation", "hidden_act", "activation_function")
                     if isinstance(v := getattr(config, k, None), str)), None)
    if act_name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{adapter.family} models: the FFN activation {act_name!r} has no operator in "
                                    f"the genai layout (it writes {', '.join(sorted(ACTIVATIONS))})")
    embed = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    tied = head_module is not None and head_module.weight.data_ptr() == embed.data_ptr()
    if getattr(head_module, "bias", None) is not None and tied:
        raise UnsupportedModelError(f"{adapter.family} models: a tied output head with its own bias")
    scale, positions = _embedding_inputs(probe, embed, base, context_length)
    tables, layer_rotary, interleaved = _rotary(probe, base, context_length)
    for cos, _ in tables:
        if cos.shape[1] % 8 or 2 * cos.shape[1] > geometry.head_dim:
            raise UnsupportedModelError(
                f"{adapter.family} models: its rotary embedding turns {2 * cos.shape[1]} of each head's "
                f"{geometry.head_dim} dimensions; GroupQueryAttention turns a multiple of 16, at most the head")
    attn_path = adapter.linears["attn_out"].rsplit(".", 1)[0]
    attn0 = find_path(blocks[0], attn_path)
    head_dims = {adapter.weight(b, "query", geometry).shape[0] // geometry.num_heads for b in blocks}
    if head_dims != {geometry.head_dim}:
        raise UnsupportedModelError(f"{adapter.family} models: query widths {sorted(head_dims)} x heads do not match "
                                    f"head_dim {geometry.head_dim} in every layer")
    final = [p for p in adapter.outer_norms if find_path(base, p) is not None]
    if not final:
        raise UnsupportedModelError(f"{adapter.family} models: no final norm the adapter names")
    softcap = getattr(attn0, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None) or 0.0
    decoder = Decoder(
        hidden_size=geometry.hidden_size, num_heads=geometry.num_heads, num_kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim, vocab_size=embed.shape[0], context_length=context_length,
        embed=lambda: _array(embed), embed_scale=scale,
        final_norm=read_norm(find_path(base, final[-1]), f"{final[-1]}"),
        head=None if tied or head_module is None else _head(head_module),
        activation=ACTIVATIONS[act_name], gated=adapter.gated_ffn,
        scale=float(getattr(attn0, "scaling", None) or default_scale(geometry.head_dim)),
        positions=positions, rotary=tables, rotary_interleaved=interleaved,
        parallel_residual=bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False)),
        softcap=float(softcap), logit_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
    )
    found.update(embed_scale=round(scale, 6), learned_positions=positions is not None, tied_head=tied,
                 rotary_tables=len(tables), rotary_interleaved=interleaved, activation=decoder.activation,
                 parallel_residual=decoder.parallel_residual, attention_softcap=decoder.softcap,
                 logit_softcap=decoder.logit_softcap)
    described = Described(decoder, iter(()), {}, found)
    described.layers = _layers(loaded, model, blocks, geometry, layer_rotary, context_length, described)
    return described


def read_norm(module: torch.nn.Module, name: str):
    """The `onnx.genai.Norm` that ``module`` computes, proved on a seeded input.

    Raises:
        UnsupportedModelError: it computes none of LayerNorm, RMSNorm, RMSNorm over 1 + weight.
    """
    from ..onnx.genai import Norm

    weight = getattr(module, "weight", None)
    eps = next((float(getattr(module, a)) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(module, a)), None)
    if weight is None or eps is None:
        raise UnsupportedModelError(f"the norm {name} ({type(module).__name__}) has no weight or epsilon to read")
    w = weight.detach().float()
    b = getattr(module, "bias", None)
    b = b.detach().float() if isinstance(b, torch.Tensor) else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, w.shape[0], generator=gen) * 3 + 0.5
    with torch.no_grad():
        y = module(x.to(weight.dtype)).float()
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    centered = x - x.mean(-1, keepdim=True)
    layer = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    candidates = [("rms", rms * w, w, None), ("rms", rms * (1 + w), 1 + w, None),
                  ("layer", layer * w + (b if b is not None else 0), w, b)]
    for kind, expected, weight_used, bias in candidates:
        if torch.allclose(y, expected, atol=tol, rtol=tol):
            return Norm(kind, weight_used.numpy(), None if bias is None else bias.numpy(), eps)
    raise UnsupportedModelError(f"the norm {name} ({type(module).__name__}) computes neither LayerNorm nor RMSNorm")


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _head(module) -> Any:
    from ..onnx.genai import Projection

    bias = getattr(module, "bias", None)
    return Projection(key=("lm_head",), weight=lambda: _array(module_weight(module)),
                      bias=None if bias is None else _array(bias))


@dataclass
class _Probe:
    ids: torch.Tensor
    block_input: torch.Tensor
    rotary: dict[int, torch.Tensor]  # block index -> the cos its attention received


def _probe(model, adapter, blocks) -> _Probe:
    """One forward pass over `_PROBE_TOKENS` tokens, keeping what the first block receives and
    the rotary cos each layer's attention receives."""
    attn_path = adapter.linears["attn_out"].rsplit(".", 1)[0]
    seen: dict[str, Any] = {"rotary": {}}
    handles = []

    def first(_module, args, kwargs):
        seen.setdefault("input", (args[0] if args else kwargs["hidden_states"]).detach().float())

    def attention(i):
        def hook(_module, _args, kwargs):
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, (tuple, list)) and pe and isinstance(pe[0], torch.Tensor):
                seen["rotary"].setdefault(i, pe[0].detach().float().reshape(-1, pe[0].shape[-1])[:_PROBE_TOKENS])
        return hook

    handles.append(blocks[0].register_forward_pre_hook(first, with_kwargs=True))
    for i, block in enumerate(blocks):
        module = find_path(block, attn_path)
        if module is not None:
            handles.append(module.register_forward_pre_hook(attention(i), with_kwargs=True))
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(_PROBE_TOKENS) * 7919 + 11) % vocab
    try:
        with torch.no_grad():
            model(input_ids=ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _Probe(ids, seen["input"][0], seen["rotary"])


def _embedding_inputs(probe: _Probe, embed: torch.Tensor, base, context: int) -> tuple[float, np.ndarray | None]:
    """The scale on the token rows and the learned position table (``None``: none), read off
    what the first block received: ``scale * token rows (+ table rows from an offset)``."""
    h = probe.block_input
    e = embed.detach().float()[probe.ids]

    def scaled(rest: torch.Tensor) -> float | None:
        scale = float((rest * e).sum() / (e * e).sum())
        return scale if torch.allclose(rest, scale * e, atol=1e-3, rtol=1e-3) else None

    scale = scaled(h)
    if scale is not None:
        return scale, None
    for module in base.modules():
        if not isinstance(module, torch.nn.Embedding) or module.weight is embed or module.weight.shape[1] != e.shape[1]:
            continue
        table = module.weight.detach().float()
        for offset in range(4):  # OPT and BioGPT count positions from 2
            rows = table[offset:offset + len(probe.ids)]
            if len(rows) == len(probe.ids) and (scale := scaled(h - rows)) is not None:
                if len(table) - offset < context:
                    raise UnsupportedModelError(f"its position table holds {len(table) - offset} positions for a "
                                                f"context of {context}")
                return scale, table[offset:offset + context].numpy()
    raise UnsupportedModelError("the first block's input is neither the scaled token rows nor those plus a learned "
                                "position table")


def _rotary(probe: _Probe, base, context: int) -> tuple[list, dict[int, int], bool]:
    """The rotary tables over the context (one per rotary module the layers read), each layer's
    table (-1: none) and whether the tables interleave their halves."""
    from ..onnx.genai import rotary_tables

    if not probe.rotary:
        return [], {}, False
    modules = [m for m in base.modules() if "Rotary" in type(m).__name__]
    positions = torch.arange(context)[None]
    full = []
    with torch.no_grad():
        for module in modules:
            dummy = torch.zeros(1, 1, 1, dtype=torch.float32)
            cos, sin = module(dummy, positions)
            full.append((cos.float().reshape(context, -1), sin.float().reshape(context, -1)))
    used: dict[int, int] = {}
    per_layer: dict[int, int] = {}
    # a bf16 model hands its layers tables rounded to bf16: matched within its rounding (the
    # graph's tables are the module's, computed in float32 above)
    atol = max(1e-5, 2 * torch.finfo(next(base.parameters()).dtype).eps)
    for layer, cos in probe.rotary.items():
        match = next((j for j, (c, _) in enumerate(full) if c.shape[-1] == cos.shape[-1]
                      and torch.allclose(c[:len(cos)], cos.float(), atol=atol)), None)
        if match is None:
            raise UnsupportedModelError(f"layer {layer}'s rotary embedding matches no rotary module's table")
        per_layer[layer] = used.setdefault(match, len(used))
    tables, interleaved = [], set()
    for j in sorted(used, key=used.get):
        cos, sin = full[j]
        try:
            table, inter = rotary_tables(cos.numpy(), sin.numpy())
        except ValueError as e:
            raise UnsupportedModelError(str(e)) from None
        tables.append(table)
        interleaved.add(inter)
    if len(interleaved) > 1:
        raise UnsupportedModelError("its layers' rotary tables mix interleaved and stacked halves")
    return tables, per_layer, interleaved.pop()


def _window(attn, config, i: int, context: int) -> int:
    """A layer's sliding window (0: full attention)."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    elif getattr(config, "layer_types", None):
        window = config.sliding_window if i < len(config.layer_types) and config.layer_types[i] == "sliding_attention" else None
    else:
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return int(window) if window and window < context else 0


def _layers(loaded, model, blocks, geometry, layer_rotary: dict[int, int], context: int, described: Described):
    """The `onnx.genai.Layer`s, made one at a time as the writer asks."""
    from ..onnx.genai import Layer

    adapter, config = loaded.adapter, model.config
    attn_path = adapter.linears["attn_out"].rsplit(".", 1)[0]
    norms = adapter.norms
    if len(norms) not in (2, 4):
        raise UnsupportedModelError(f"{adapter.family} models: {len(norms)} norms in a block (the genai layout "
                                    "takes one before each sublayer, and optionally one after)")
    for i, block in enumerate(blocks):
        read = [read_norm(get_path(block, p), f"layer {i} {p}") for p in norms]
        attn_norm, ffn_norm = (read[0], read[1]) if len(read) == 2 else (read[0], read[2])
        post_attn, post_ffn = (None, None) if len(read) == 2 else (read[1], read[3])
        q_norm = k_norm = None
        if adapter.head_norms:
            q_norm, k_norm = (read_norm(get_path(block, p), f"layer {i} {p}") for p in adapter.head_norms[:2])
        attn = find_path(block, attn_path)
        qkv = _packed(adapter, block, ("query", "key", "value"), geometry, i, described)
        ffn_in = _packed(adapter, block, ("ffn_gate", "ffn_in") if adapter.gated_ffn else ("ffn_in",), geometry, i,
                         described)
        yield Layer(attn_norm=attn_norm, ffn_norm=ffn_norm, qkv=qkv,
                    attn_out=_projection(adapter, block, ("attn_out",), geometry, i, described),
                    ffn_in=ffn_in, ffn_out=_projection(adapter, block, ("ffn_out",), geometry, i, described),
                    post_attn_norm=post_attn, post_ffn_norm=post_ffn, q_norm=q_norm, k_norm=k_norm,
                    window=_window(attn, config, i, context), rotary=layer_rotary.get(i, -1))


def _packed(adapter, block, roles, geometry, i, described) -> list:
    """One packed projection for ``roles`` (each row block in order), as onnxruntime-genai's
    builder packs Q/K/V and gate/up."""
    return [_projection(adapter, block, roles, geometry, i, described)]


def _projection(adapter, block, roles: tuple[str, ...], geometry, i: int, described: Described):
    """The projection of ``roles`` in ``block`` (their rows stacked): its key (the stored
    weights it reads, so that layers sharing them store them once), its weight made on demand,
    its bias and its low-rank delta."""
    from ..onnx.genai import Projection

    parts, biases, loras = [], [], []
    for role in roles:
        module = adapter.linear(block, role)
        rows = adapter.role_rows(role, geometry)
        parts.append((module, rows))
        bias = adapter.bias(block, role, geometry)
        biases.append(None if bias is None else bias.float())
        loras.append(_lora(module, rows))
    key = tuple((module_weight(m).data_ptr(), None if r is None else tuple(r[[0, -1]].tolist()), len(r) if r is not None else 0)
                for m, r in parts)
    described.parts.setdefault(key, parts)

    def weight() -> np.ndarray:
        return np.concatenate([_array(_rows(module_weight(m), r)) for m, r in parts])

    out = [(_rows(module_weight(m), r)).shape[0] for m, r in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = np.concatenate([_array(b) if b is not None else np.zeros(n, np.float32) for b, n in zip(biases, out)])
    lora = None
    if any(x is not None for x in loras):
        lora = _stacked_lora(loras, out, parts)
    return Projection(key=key, weight=weight, bias=bias, lora=lora)


def _rows(w: torch.Tensor, rows) -> torch.Tensor:
    return w if rows is None else w.index_select(0, rows)


def _lora(module, rows):
    """``(A, B x scaling)`` of a shared layer's own delta (rows of a fused module's), or ``None``."""
    if not getattr(module, "lora_rank", 0):
        return None
    a = _array(module.lora_A.weight)
    b = _array(_rows(module.lora_B.weight.detach().float() * module.scaling, rows))
    return a, b


def _stacked_lora(loras, out, parts):
    """Several roles' deltas as the writer packs them: a pair per role where every role has one;
    else one pair, the ``A``s stacked and the ``B``s block-diagonal (zeros where a role has none)."""
    if all(x is not None for x in loras):
        return list(loras)
    in_features = module_weight(parts[0][0]).shape[1]
    a = np.concatenate([x[0] if x is not None else np.zeros((0, in_features), np.float32) for x in loras])
    b = np.zeros((sum(out), a.shape[0]), np.float32)
    row = col = 0
    for x, n in zip(loras, out):
        if x is not None:
            b[row:row + n, col:col + x[0].shape[0]] = x[1]
            col += x[0].shape[0]
        row += n
    return a, b


# --- how weights are stored -------------------------------------------------------------------
class BlockEncoder:
    """`onnx.genai.Encoder` for an int4 export: each stored weight's blocks, from the plan where
    calibration fitted them (GPTQ, a quantization-aware fine-tune's grid) or kept them in 8 bits,
    else round-to-nearest (``rtn``: symmetric with the scale that loses least; ``rtn-asym``:
    zero points); the output head (and a table tied to it) in ``head_bits`` symmetric blocks."""

    def __init__(self, quantize, plan, parts: dict, head_bits: int):
        self.q, self.plan, self.parts, self.head_bits = quantize, plan, parts, head_bits
        self.module_keys: dict[int, str] = {}
        self.counts = {"fitted": 0, "int8": 0, "rtn": 0, "lora_factors": 0}

    def __call__(self, key: Hashable, w: np.ndarray):
        from ..onnx.genai import Blocks

        bs = self.q.block_size
        if key[0] == "lora":  # a delta's factor: 8-bit blocks (its rank side is narrower than int4 blocks pay off)
            self.counts["lora_factors"] += 1
            return _symmetric(w, 8, bs if w.shape[1] >= bs else 16)
        if key in (("lm_head",), ("tied_embeddings",), ("embed_tokens",)):
            return head_blocks(w, self.head_bits, bs)
        parts = self.parts.get(key)
        fitted, int8 = [], False
        for module, rows in parts or ():
            mk = self._module_key(module)
            int8 |= self.plan is not None and mk in self.plan.int8
            blocks = self.plan.fitted.get(mk) if self.plan is not None else None
            fitted.append(None if blocks is None else tuple(x if rows is None else x[rows.numpy()] for x in blocks))
        if int8:
            self.counts["int8"] += 1
            return _symmetric(w, 8, bs)
        if fitted and all(f is not None for f in fitted):
            from ..grids.gptq import pack_matmul_nbits

            self.counts["fitted"] += 1
            q, scales, zeros = (np.concatenate([f[i] for f in fitted]) for i in range(3))
            return Blocks(4, bs, *pack_matmul_nbits(q.astype(np.uint8), scales, zeros, bs))
        self.counts["rtn"] += 1
        if self.q.int4_method == "rtn-asym" or w.shape[1] % bs:
            return _asymmetric(w, bs)
        return extreme_blocks(w, bs)

    def _module_key(self, module) -> str:
        from ..grids.gptq import weight_key

        ident = id(module)
        if ident not in self.module_keys:
            self.module_keys[ident] = weight_key(_array(module_weight(module)).T) if self.plan else ""
        return self.module_keys[ident]


def _symmetric(w: np.ndarray, bits: int, block_size: int):
    """`grids.rows.quantize_rows` blocks, the input dimension padded with zeros to whole blocks."""
    from ..grids.rows import quantize_rows
    from ..onnx.genai import Blocks

    pad = -w.shape[1] % block_size
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    codes, scales, _ = quantize_rows(w, bits, block_size)
    return Blocks(bits, block_size, codes, scales)


def head_blocks(w: np.ndarray, bits: int, block_size: int):
    """The output head's or a table's blocks: as they are where a fine-tune trained them on
    `_symmetric`'s grid (``--embedding-bits``: its rounding reproduces them exactly), else at 4
    bits on `extreme_blocks`' grid (the head is where clipping costs a decoder most: SmolLM2's
    perplexity 1.399x the original's with only the projections on that grid, 1.357x with the
    head too)."""
    if bits != 4 or w.shape[1] % block_size:
        return _symmetric(w, bits, block_size)
    from ..grids.rows import quantize_rows
    from ..onnx.genai import Blocks

    sample = w[:64]  # a few rows first: the whole search costs a large vocabulary gigabytes
    if not np.array_equal(quantize_rows(sample, bits, block_size)[2], sample):
        return extreme_blocks(w, block_size)
    codes, scales, rounded = quantize_rows(w, bits, block_size)
    if np.array_equal(rounded, w):  # trained on this grid
        return Blocks(bits, block_size, codes, scales)
    return extreme_blocks(w, block_size)


def extreme_blocks(w: np.ndarray, block_size: int):
    """Symmetric 4-bit blocks on onnxruntime's quantizer's grid (the optimum layout's int4 and
    the genai builder's): each block's largest magnitude lands exactly on the code -8, the scale
    taking its sign. The least-error scales of `_symmetric` clip those largest weights, which a
    decoder's outputs depend on most (SmolLM2-135M, 200 held-out snippets: perplexity 1.357x the
    original's on this grid, 1.497x on the least-error one)."""
    from ..grids.gptq import pack_matmul_nbits
    from ..onnx.genai import Blocks

    packed, scales = [], []
    for start in range(0, w.shape[0], EXTREME_ROWS):  # in slices: a large vocabulary's temporaries are gigabytes
        part = w[start:start + EXTREME_ROWS]
        blocks = np.pad(part, ((0, 0), (0, -part.shape[1] % block_size))).astype(np.float32)
        blocks = blocks.reshape(part.shape[0], -1, block_size)
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        scale = np.where(peak == 0, 1.0, peak / -8).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None]) + 8, 0, 15).astype(np.uint8).reshape(part.shape[0], -1)
        b, scale, _ = pack_matmul_nbits(q, scale, np.full(scale.shape, 8, np.uint8), block_size)
        packed.append(b)
        scales.append(scale)
    return Blocks(4, block_size, np.concatenate(packed), np.concatenate(scales))


#: Rows `extreme_blocks` rounds at a time.
EXTREME_ROWS = 4096


def _asymmetric(w: np.ndarray, block_size: int):
    """Round-to-nearest blocks with integer zero points (`grids.gptq.rtn_blocks`)."""
    from ..grids.gptq import pack_matmul_nbits, rtn_blocks
    from ..onnx.genai import Blocks

    q, scales, zeros = rtn_blocks(torch.from_numpy(w), block_size)
    return Blocks(4, block_size, *pack_matmul_nbits(q.numpy().astype(np.uint8), scales.numpy().astype(np.float32),
                                                    zeros.numpy().astype(np.uint8), block_size))


# --- the folder -------------------------------------------------------------------------------
def write_genai(folder: Path, loaded, model, quantize, plan, opset: int, context_length: int,
                threads: int | None = None) -> dict[str, Any]:
    """``model.onnx`` (+ data), ``genai_config.json`` and the tokenizer files in ``folder``; what
    was written, as a record."""
    from ..onnx.genai import BLOCK_SIZES, GenaiGraph

    described = describe(loaded, model, context_length)
    if quantize is None:
        encoder, level = (lambda key, w: None), 0
    else:
        if quantize.block_size not in BLOCK_SIZES:
            raise ConfigError(f"--block-size {quantize.block_size}: onnxruntime's MatMulNBits takes "
                              f"{', '.join(map(str, BLOCK_SIZES))}", option="block_size")
        encoder = BlockEncoder(quantize, plan, described.parts, quantize.embedding_bits or 4)
        level = quantize.accuracy_level
    graph = GenaiGraph(folder, described.decoder, encoder, accuracy_level=level, opset=opset)
    written = graph.write(described.layers, len(loaded.adapter.blocks(model)))
    config = genai_config(loaded, model, described.decoder, written["layers"], context_length, threads)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
    loaded.tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    record = {"layout": "genai", "read_off_the_model": described.found, **written}
    if isinstance(encoder, BlockEncoder):
        record["blocks"] = {**encoder.counts, "head_bits": encoder.head_bits, "block_size": quantize.block_size,
                            "accuracy_level": level}
    return record


def genai_config(loaded, model, decoder, layers: int, context_length: int, threads: int | None) -> dict[str, Any]:
    """``genai_config.json``: the graph's names and shape, the special tokens, greedy search."""
    config = model.config
    gen = getattr(model, "generation_config", None)
    tok = loaded.tokenizer

    def token(name):
        for source in (gen, config):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return getattr(tok, name, None)

    eos = token("eos_token_id")
    pad = token("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if decoder.positions is not None:
        inputs["position_ids"] = "position_ids"
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:
        session["intra_op_num_threads"] = int(threads)
    return {
        "model": {
            "bos_token_id": token("bos_token_id"), "context_length": context_length,
            "decoder": {
                "session_options": session, "filename": "model.onnx", "head_size": decoder.head_dim,
                "hidden_size": decoder.hidden_size, "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": decoder.num_heads, "num_hidden_layers": layers,
                "num_key_value_heads": decoder.num_kv_heads,
            },
            "eos_token_id": eos, "pad_token_id": pad, "type": "llama", "vocab_size": decoder.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


# --- the check ----------------------------------------------------------------------------------
#: Tokens per check length a quantized genai export is compared on (the prefill's, then cached steps).
QUANTIZED_STEPS = 4


def check_genai(folder: Path, model, blocks, tokenizer, texts: list[str], lengths: list[int], steps: int,
                config, quantize, context_length: int, release: Callable[[], None] | None = None) -> dict[str, Any]:
    """Load ``folder`` with ``onnxruntime_genai.Model`` and run it against PyTorch, batch 1:

    * per prompt length: the prefill's logits, then ``steps`` cached steps fed PyTorch's own
      greedy tokens, each step's logits against PyTorch's on the same prefix (fp32: elementwise
      within ``atol + rtol * |PyTorch's|``; quantized: a mean cosine of ``quantize.min_cosine``);
    * fp32: the runtime's own greedy decoding, ``steps`` tokens, equal to PyTorch's.

    PyTorch's side is computed first for every length; ``release`` is then called (the caller
    may drop the model's weights there) before the runtime loads the graph, so the two models
    are never in memory together when the caller hands its model over. Progress moves a block
    of ``blocks`` (the model's) at a time: an 8 B bf16 forward pass over 130 tokens took
    108 s on 2 cores, silent as one item.

    Raises:
        ExportError: any of those off (one line with the numbers).
    """
    og = genai_runtime()
    from ..io import quiet

    with quiet("transformers"):  # the joined texts run past the model's length: only a prefix is used
        ids_all = tokenizer(" ".join(texts), return_tensors="pt")["input_ids"][0]
    rows, generation = [], None
    checked = list(dict.fromkeys(min(n, context_length - steps - 1, len(ids_all)) for n in lengths))
    # counted in tokens: PyTorch's greedy ones and its pass over every prefix (a block of a pass a
    # time), the runtime's steps
    with Progress("checking against PyTorch", len(checked) * (2 * steps + 1) + (steps if quantize is None else 0),
                  "tokens") as progress:
        references = []
        # a forward pass is one item: a token of the greedy decoding, or the pass over every prefix
        per_block = [b.register_forward_hook(lambda *_: progress.update(1 / len(blocks))) for b in blocks]
        try:
            for length in checked:
                prompt = ids_all[:length]
                with torch.no_grad():
                    ref = model.generate(prompt[None], attention_mask=torch.ones(1, length, dtype=torch.long),
                                         max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
                    tokens = ref.sequences[0, length:]
                    full = model(ref.sequences[:, :-1]).logits[0].float().numpy()  # logits of every prefix
                references.append((length, prompt, tokens, full))
        finally:
            for hook in per_block:
                hook.remove()
        del model, blocks
        if release is not None:
            release()
        runtime = og.Model(str(folder))
        for length, prompt, tokens, full in references:
            got = _teacher_forced(og, runtime, prompt, tokens, context_length)
            progress.update(steps)
            rows.append(_compare(got, full[:got.shape[0]], length, config, quantize))
            if quantize is None and generation is None:
                generation = _greedy(og, runtime, prompt, tokens, steps, context_length)
                progress.update(steps)
    return {"loaded_with": "onnxruntime_genai.Model", "batches": rows, "generation": generation,
            "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "mean_cosine": float(np.mean([r["mean_cosine"] for r in rows])),
            "min_cosine": min(r["min_cosine"] for r in rows),
            "tolerance": ({"atol": config.atol, "rtol": config.rtol} if quantize is None
                          else {"min_mean_cosine": quantize.min_cosine})}


def genai_runtime():
    """The ``onnxruntime_genai`` module, or one line on how to install it."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise ConfigError("--layout genai needs onnxruntime-genai: pip install onnxruntime-genai") from None
    return og


def _params(og, runtime, max_length: int):
    params = og.GeneratorParams(runtime)
    params.set_search_options(max_length=max_length, do_sample=False, top_k=1, batch_size=1)
    return params


def _teacher_forced(og, runtime, prompt: torch.Tensor, tokens: torch.Tensor, context: int) -> np.ndarray:
    """The runtime's logits for every prompt position, then one cached step per token of
    ``tokens`` but the last (each fed the token PyTorch chose)."""
    gen = og.Generator(runtime, _params(og, runtime, min(context, len(prompt) + len(tokens) + 1)))
    gen.append_tokens(prompt.numpy().astype(np.int32)[None])
    out = [np.asarray(gen.get_output("logits"), dtype=np.float32).reshape(-1, np.shape(gen.get_output("logits"))[-1])]
    for t in tokens[:-1].tolist():
        gen.append_tokens(np.array([[t]], dtype=np.int32))
        out.append(np.asarray(gen.get_output("logits"), dtype=np.float32).reshape(-1, out[0].shape[-1])[-1:])
    return np.concatenate(out)


def _greedy(og, runtime, prompt, tokens, steps: int, context: int) -> dict[str, Any]:
    gen = og.Generator(runtime, _params(og, runtime, min(context, len(prompt) + steps)))
    gen.append_tokens(prompt.numpy().astype(np.int32)[None])
    got = []
    while len(got) < steps and not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    want = tokens.tolist()[:len(got)]
    if got != want:
        step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise ExportError(f"onnxruntime-genai's greedy decoding leaves PyTorch's at new token {step + 1} of {steps}: "
                          "the cached decode steps do not compute what the model does")
    return {"new_tokens": len(got), "prompts": 1, "token_agreement": 1.0, "passed": True}


def _compare(got: np.ndarray, want: np.ndarray, length: int, config, quantize) -> dict[str, Any]:
    diff = np.abs(got - want)
    cos = (got * want).sum(-1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1), 1e-12)
    row = {"length": length, "tokens": int(got.shape[0]), "max_abs_diff": float(diff.max()),
           "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    if quantize is None:
        bad = diff > config.atol + config.rtol * np.abs(want)
        row["mismatched"] = int(bad.sum())
        if bad.any():
            where = "the prefill" if bad[:length].any() else "a cached step"
            raise ExportError(f"the genai export does not match PyTorch in {where} at prompt length {length}: "
                              f"{int(bad.sum())} of {bad.size} logits differ by up to {diff.max():.2e} "
                              f"(tolerance {config.atol:g} + {config.rtol:g} x |logit|)")
    elif cos.mean() < quantize.min_cosine:
        raise ExportError(f"the {quantize.name} genai export strays from PyTorch at prompt length {length}: mean "
                          f"cosine {cos.mean():.4f} < {quantize.min_cosine} (--min-cosine)")
    return row


def context_length(loaded, model) -> int:
    """The longest sequence the genai folder is made for (its rotary tables' length)."""
    limit = loaded.adapter.max_positions(model.config)
    return int(limit or 4096)


# --- the stage --------------------------------------------------------------------------------
def choose_layout(loaded, task: str, config, quantize) -> tuple[str, str]:
    """The layout an export writes and why (`ExportConfig.layout`).

    Raises:
        ConfigError, UnsupportedModelError: ``--layout genai`` asked where it cannot be written.
    """
    if config.layout == "optimum":
        return "optimum", "--layout optimum"
    refusal = genai_refusal(loaded, quantize)
    if config.layout == "genai":
        if refusal:
            raise (UnsupportedModelError if "--" not in refusal.split(";")[0] else ConfigError)(refusal)
        if config.task not in ("auto", "text-generation-with-past"):
            raise ConfigError(f"--layout genai writes a decoder with its KV cache; --task {config.task} is optimum's "
                              "layout (--layout optimum)", option="task")
        if config.optimize:
            raise ConfigError("--optimize runs onnxruntime's optimizer on optimum's graph; the genai layout is written "
                              "fused already", option="optimize")
        genai_runtime()
        return "genai", "--layout genai"
    if not task.startswith("text-generation"):
        return "optimum", f"{task} is optimum's layout"
    if config.task != "auto":
        return "optimum", f"--task {config.task} names optimum's layout"
    if config.optimize:
        return "optimum", "--optimize runs on optimum's graph"
    if refusal:
        return "optimum", refusal
    try:
        genai_runtime()
    except ConfigError as e:
        return "optimum", str(e)
    return "genai", "a decoder with its cache: onnxruntime-genai's layout decodes fastest on CPUs"


def export_genai(loaded, model, config, output: Path, quantize, *, overwrite: bool, reason: str, start: float,
                 release: bool = False):
    """`compress export` in the genai layout: ``model`` (``loaded``'s, in float32) read through its
    adapter, written in ``output`` (staged: nothing appears unless it passes `check_genai` and the
    storage check). With ``release``, the model's weights are dropped once the check's PyTorch
    side is computed (`release_weights`): the caller hands the model over."""
    from ..data import calibration_texts
    from ..io import staged_folder, write_text_atomic
    from ..models import unique_parameters
    from ..record import StageRecord
    params, nbytes = unique_parameters(model)
    plan = None
    if quantize is not None:
        from ..quantization.stage import calibrate

        plan = calibrate(quantize, loaded, model)
    texts = calibration_texts(config.check_data, text_column=config.text_column, encoding=config.encoding)
    context = context_length(loaded, model)
    with staged_folder(output, overwrite=overwrite) as tmp:
        graph = write_genai(tmp, loaded, model, quantize, plan, config.opset, context)
        stored, projections = check_genai_storage(tmp / "model.onnx", model, params, graph)
        # a quantized export: the prefill and QUANTIZED_STEPS - 1 cached steps per length (its greedy
        # tokens may part from PyTorch's anyway); a 1.7 B model's full 32 took minutes per length
        steps = config.generation_check if quantize is None else min(config.generation_check, QUANTIZED_STEPS)
        check = check_genai(tmp, model, list(loaded.adapter.blocks(model)), loaded.tokenizer, texts,
                            config.check_lengths, steps, config, quantize, context,
                            release=(lambda: release_weights(loaded, model)) if release else None)
        file_bytes = sum(f.stat().st_size for f in (tmp / "model.onnx", tmp / "model.onnx.data") if f.is_file())
        if plan is not None and plan.info:
            graph["calibration"] = dict(plan.info)
        metrics = {
            "model": loaded.name, "task": "text-generation-with-past", "layout": "genai", "layout_reason": reason,
            "ort_class": "onnxruntime_genai.Model", "precision": quantize.name if quantize else "fp32",
            "opset": config.opset, "inputs": ["input_ids", "attention_mask"], "file_bytes": file_bytes,
            "stored_numbers": stored, "projections": projections, "graph": graph, "check": check,
            "sharing": bool(loaded.sharing), "context_length": context,
            "kv_cache": {"exported": True, "layout": "GroupQueryAttention; past and present share one buffer"},
        }
        record = StageRecord.build("export", {**config.to_dict(), "quantize": quantize.to_dict() if quantize else None},
                                   before=(params, nbytes), after=(stored, file_bytes), metrics=metrics, started=start)
        record.seconds = round(record.seconds, 2)
        write_text_atomic(tmp / "export_report.json", json.dumps(record.to_dict(), indent=2))
    return record


def release_weights(loaded, model) -> None:
    """Drop every parameter and buffer of ``model`` (and ``loaded.model``, if another module):
    the storages go, and with the last of them the checkpoint's memory map, so what the process
    holds falls by the model's size. Neither model computes afterwards."""
    import gc

    for m in {id(x): x for x in (model, loaded.model) if x is not None}.values():
        for module in m.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                module._parameters[name] = torch.nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=False)
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = torch.empty(0, dtype=b.dtype)
    gc.collect()


def check_genai_storage(path: Path, model, params: int, graph: dict) -> tuple[int, dict[str, int]]:
    """The numbers the file stores and how its projections read their weights; an export that
    stores more numbers than the model has (a weight its layers share written per layer) fails.

    Raises:
        ExportError: that.
    """
    import onnx

    from ..onnx.graph import stored_elements

    proto = onnx.load(str(path), load_external_data=False)
    stored = stored_elements(proto)
    inits = {t.name for t in proto.graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMulNBits", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            readers.setdefault(node.input[1], []).append(node.op_type)
    del proto
    lora = [w for w in readers if ".lora_" in w]
    weights = {w: ops for w, ops in readers.items() if w not in lora}
    allowed = params + sum(b.numel() for b in model.buffers()) + graph["rotary_numbers"]
    if stored > allowed * 1.01 + 1024:
        raise ExportError(f"the genai file stores {stored:,} numbers for {params:,} unique parameters: a shared weight "
                          "was stored more than once")
    return stored, {"weights": len(weights), "block_weights": sum(ops[0] == "MatMulNBits" for ops in weights.values()),
                    "float_weights": sum(ops[0] == "MatMul" for ops in weights.values()),
                    "reads_of_shared_weights": sum(len(ops) - 1 for ops in weights.values()),
                    "lora_matmuls": sum(len(readers[w]) for w in lora)}
