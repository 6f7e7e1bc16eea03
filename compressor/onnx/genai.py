"""A decoder's graph in onnxruntime-genai's layout, written layer by layer from its weights.

onnxruntime-genai runs a folder holding ``model.onnx`` (+ ``model.onnx.data``) and
``genai_config.json``. Its graph reads ``input_ids``, ``attention_mask`` (and ``position_ids``
where positions are learned) and ``past_key_values.%d.key/value``, and writes ``logits`` and
``present.%d.key/value``; the runtime keeps the cache in one buffer for past and present. This
module writes such a graph from a `Decoder`, a description of the model as arrays that the
export builds from a model through its adapter, with the runtime's fused operators, as
onnxruntime-genai's own builder (``onnxruntime_genai.models.builder``) lays them out:

* ``GroupQueryAttention`` with the cache and the rotary embedding inside (cos/sin tables as
  initializers), the query, key and value projections packed into one matrix;
* ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``: each residual add fused
  into the norm after it;
* ``MatMulNBits`` weight-only blocks with an accuracy level, the gate and up projections packed;
* the output head in blocks too, and an input table tied to it read from the very same blocks
  (``GatherBlockQuantized``).

What the builder does not do and this writer does: a weight that several layers share
(`Projection.key`) is one initializer, quantized once, that every member layer's node reads;
a layer's low-rank delta (LoRA) is two small float MatMuls beside the shared one; pruned widths
and dropped layers are only the shapes and the layer list.

Memory: every initializer's bytes are appended to ``model.onnx.data`` as soon as it is made and
dropped, so writing needs one layer's weights at a time beyond what the caller holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..progress import Progress

MODEL_FILE = "model.onnx"
#: Activations the writer emits (the names transformers' ``ACT2FN`` maps to each).
ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
#: Block sizes onnxruntime's MatMulNBits and GatherBlockQuantized take: powers of two from 16.
BLOCK_SIZES = (16, 32, 64, 128, 256)
_MS = "com.microsoft"


@dataclass
class Norm:
    """A norm over the last axis: ``rms`` (x / rms(x) * weight) or ``layer`` (with the mean
    and a bias). Offsets such as Gemma's ``1 + weight`` are folded into ``weight`` already."""

    kind: str
    weight: np.ndarray
    bias: np.ndarray | None
    eps: float


@dataclass
class Projection:
    """One linear map ``y = x W^T (+ bias) (+ x A^T B^T)``.

    Attributes:
        key: Projections with equal keys have the same ``weight``: it is stored (and quantized)
            once and every node reads that one initializer.
        weight: ``(out, in)`` float32, or a function that makes it (called once per key, when
            the first projection with that key is written).
        bias: ``(out,)`` or ``None``.
        lora: A low-rank delta ``(A (rank, in), B (out, rank))``, its scaling in ``B``; for a
            packed projection, one such pair per packed part (its rows of the output, in order).
    """

    key: Hashable
    weight: np.ndarray | Callable[[], np.ndarray]
    bias: np.ndarray | None = None
    lora: tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]] | None = None


@dataclass
class Layer:
    """One decoder block.

    Attributes:
        attn_norm: The norm before the attention.
        ffn_norm: The norm before the FFN (with ``parallel_residual``, on the block's input).
        qkv: One packed projection (query rows, then key, then value) or three.
        attn_out: The attention's output projection.
        ffn_in: The gate and up projections packed (gate rows first), or the two, or only ``up``
            for a plain FFN.
        ffn_out: The down projection.
        post_attn_norm, post_ffn_norm: Norms on each sublayer's output before the residual add
            (Gemma 2 and 3).
        q_norm, k_norm: Norms over ``head_dim`` on every query / key head (Qwen3, Gemma 3).
        window: Sliding-window attention over this many past tokens; 0: full.
        rotary: Which of `Decoder.rotary`'s tables the layer's rotary embedding reads
            (-1: no rotary embedding).
    """

    attn_norm: Norm
    ffn_norm: Norm
    qkv: list[Projection]
    attn_out: Projection
    ffn_in: list[Projection]
    ffn_out: Projection
    post_attn_norm: Norm | None = None
    post_ffn_norm: Norm | None = None
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    window: int = 0
    rotary: int = 0


@dataclass
class Decoder:
    """A decoder-only model as the writer needs it (see the module docstring).

    Attributes:
        embed: The input token table ``(vocab, hidden)``.
        head: The output head; ``None``: tied to ``embed``.
        positions: A learned position table ``(positions, hidden)`` added to the token rows
            (GPT-2, OPT: offset already removed), read with ``position_ids``; ``None``: none.
        rotary: ``(cos, sin)`` tables, each ``(context, rotary_dim / 2)``.
        activation: One of `ACTIVATIONS`' values.
        gated: The FFN multiplies ``activation(gate)`` by ``up``.
        parallel_residual: Attention and FFN both read the block's input (GPT-NeoX).
        scale: The attention's scale on query-key products.
        softcap: ``softcap * tanh(scores / softcap)`` on the attention scores (0: none).
        logit_softcap: The same on the logits.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    embed: np.ndarray | Callable[[], np.ndarray]
    embed_scale: float
    final_norm: Norm
    head: Projection | None
    activation: str
    gated: bool
    scale: float
    positions: np.ndarray | None = None
    rotary: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    rotary_interleaved: bool = False
    parallel_residual: bool = False
    softcap: float = 0.0
    logit_softcap: float = 0.0


@dataclass
class Blocks:
    """A weight as MatMulNBits stores it: ``packed`` ``(out, blocks, block_size * bits / 8)``
    uint8, ``scales`` ``(out, blocks)``, ``zero_points`` packed as onnxruntime's quantizer packs
    them or ``None`` (the symmetric middle code, 2^(bits-1))."""

    bits: int
    block_size: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.bits, self.block_size, self.zero_points is not None)


@dataclass(frozen=True)
class BlockLayout:
    """What a node reading a stored weight needs of its blocks, without their data (the writer
    keeps one per stored weight: keeping the `Blocks` held every packed weight of the model in
    memory until the end, a gigabyte at 1.7 B parameters)."""

    bits: int
    block_size: int
    zero_points: bool


#: How the writer stores a projection's weight: ``encode(key, weight (out, in))`` returns blocks
#: or ``None`` for float32.
Encoder = Callable[[Hashable, np.ndarray], "Blocks | None"]


class _ExternalData:
    """``model.onnx.data``, appended to as initializers are made (each 64-byte aligned)."""

    def __init__(self, folder: Path):
        self.name = f"{MODEL_FILE}.data"
        self.file = open(folder / self.name, "wb")  # noqa: SIM115  (closed by `close`)
        self.bytes = 0

    def tensor(self, array: np.ndarray, name: str) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = -self.file.tell() % 64
        self.file.write(b"\0" * pad)
        offset = self.file.tell()
        raw = array.tobytes()
        self.file.write(raw)
        self.bytes += len(raw)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(len(raw)))):
            t.external_data.add(key=k, value=v)
        return t

    def close(self) -> None:
        self.file.close()


class GenaiGraph:
    """Builds the graph of a `Decoder`, layer by layer, into ``folder``.

    Use: ``record = GenaiGraph(folder, decoder, encode, accuracy_level).write(layers)``.
    """

    def __init__(self, folder: str | Path, decoder: Decoder, encode: Encoder, accuracy_level: int = 4,
                 opset: int = 17):
        self.folder, self.d, self.encode = Path(folder), decoder, encode
        self.accuracy_level, self.opset = accuracy_level, opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.consts: dict[tuple, str] = {}
        self.stored: dict[Hashable, tuple[str, BlockLayout | None, tuple[int, int]]] = {}
        self.counts = {"projections": 0, "stored_weights": 0, "block_weights": 0, "float_weights": 0,
                       "lora_deltas": 0, "bits": {}, "rotary_numbers": 0}
        self.data: _ExternalData | None = None
        self._float_table: np.ndarray | None = None

    # --- small helpers ---------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], name: str, outputs: int | Sequence[str] = 1, domain: str = "",
             **attrs) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs

    def init(self, array: np.ndarray, name: str) -> str:
        """An initializer: in ``model.onnx.data`` from 1 KiB up, else in the graph."""
        if array.nbytes >= 1024:
            self.inits.append(self.data.tensor(array, name))
        else:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: Sequence[int] | int, dtype=np.int64) -> str:
        key = (str(np.dtype(dtype)), tuple(np.atleast_1d(values).tolist()), np.ndim(values))
        if key not in self.consts:
            name = f"/model/constants/{key[0]}/{list(key[1]) if key[2] else key[1][0]}"
            self.consts[key] = self.init(np.array(values, dtype=dtype), name)
        return self.consts[key]

    # --- projections -----------------------------------------------------------------------
    def weight(self, projection: Projection, name: str) -> tuple[str, BlockLayout | None, tuple[int, int]]:
        """The stored weight of ``projection``, made the first time its key is seen."""
        if projection.key in self.stored:
            return self.stored[projection.key]
        w = projection.weight() if callable(projection.weight) else projection.weight
        w = np.asarray(w, dtype=np.float32)
        blocks = self.encode(projection.key, w)
        if blocks is None:
            stored = (self.init(np.ascontiguousarray(w.T), f"{name}.weight"), None, w.shape)
            self.counts["float_weights"] += 1
        else:
            self.init(blocks.packed, f"{name}.weight_Q{blocks.bits}")
            self.init(blocks.scales.reshape(-1).astype(np.float32), f"{name}.weight_scales")
            if blocks.zero_points is not None:
                self.init(blocks.zero_points.reshape(-1), f"{name}.weight_zp")
            stored = (name, blocks.layout, w.shape)
            self.counts["block_weights"] += 1
            bits = self.counts["bits"]
            bits[str(blocks.bits)] = bits.get(str(blocks.bits), 0) + 1
        self.counts["stored_weights"] += 1
        self.stored[projection.key] = stored
        return stored

    def project(self, x: str, projection: Projection, name: str) -> str:
        """``x`` through ``projection``: MatMulNBits (or MatMul), its bias, its low-rank delta."""
        stored, blocks, (n, k) = self.weight(projection, name)
        self.counts["projections"] += 1
        if blocks is None:
            (y,) = self.node("MatMul", [x, stored], f"{name}/MatMul")
        else:
            inputs = [x, f"{stored}.weight_Q{blocks.bits}", f"{stored}.weight_scales"]
            if blocks.zero_points:
                inputs.append(f"{stored}.weight_zp")
            (y,) = self.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=_MS, K=k, N=n, bits=blocks.bits,
                             block_size=blocks.block_size, accuracy_level=self.accuracy_level)
        if projection.bias is not None:
            (y,) = self.node("Add", [y, self.init(projection.bias.astype(np.float32), f"{name}.bias")], f"{name}/Add")
        if projection.lora is not None:
            (y,) = self.node("Add", [y, self._delta(x, projection.lora, name)], f"{name}/lora/Add")
        return y

    def _delta(self, x: str, lora, name: str) -> str:
        """A low-rank delta ``x A^T B^T``; for a packed projection the parts' ``A``s in one
        MatMul, its output split by rank, each part's ``B``, the results concatenated."""
        self.counts["lora_deltas"] += 1
        pairs = [lora] if isinstance(lora, tuple) else list(lora)
        a = np.concatenate([p[0] for p in pairs])
        (low,) = self.node_matmul(x, a, f"{name}.lora_A", f"{name}/lora_A")
        if len(pairs) == 1:
            return self.node_matmul(low, pairs[0][1], f"{name}.lora_B", f"{name}/lora_B")[0]
        ranks = [p[0].shape[0] for p in pairs]
        parts = self.node("Split", [low, self.const(ranks)], f"{name}/lora_A/Split", outputs=len(pairs), axis=-1)
        outs = [self.node_matmul(part, b, f"{name}.lora_B.{j}", f"{name}/lora_B.{j}")[0]
                for j, (part, (_, b)) in enumerate(zip(parts, pairs))]
        return self.node("Concat", outs, f"{name}/lora_B/Concat", axis=-1)[0]

    def node_matmul(self, x: str, w: np.ndarray, weight: str, name: str) -> list[str]:
        """``x w^T`` for a delta's factor ``w`` ``(out, in)``, stored as the encoder says (its key:
        ``("lora", weight)``): 8-bit blocks beside int4 projections, else float32."""
        blocks = self.encode(("lora", weight), np.asarray(w, np.float32))
        if blocks is None:
            return self.node("MatMul", [x, self.init(np.ascontiguousarray(w.T, np.float32), weight)], f"{name}/MatMul")
        inputs = [x, self.init(blocks.packed, f"{weight}_Q{blocks.bits}"),
                  self.init(blocks.scales.reshape(-1).astype(np.float32), f"{weight}_scales")]
        return self.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=_MS, K=w.shape[1], N=w.shape[0],
                         bits=blocks.bits, block_size=blocks.block_size, accuracy_level=self.accuracy_level)

    # --- norms -----------------------------------------------------------------------------
    def norm(self, x: str, norm: Norm, name: str) -> str:
        scale = self.init(norm.weight.astype(np.float32), f"{name}.weight")
        if norm.kind == "rms":
            return self.node("SimplifiedLayerNormalization", [x, scale], name, outputs=1, axis=-1,
                             epsilon=norm.eps, stash_type=1)[0]
        bias = self.init(_bias(norm), f"{name}.bias")
        return self.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=norm.eps, stash_type=1)[0]

    def skip_norm(self, x: str, residual: str, norm: Norm, name: str) -> tuple[str, str]:
        """``norm(x + residual)`` and ``x + residual``, in one fused node."""
        scale = self.init(norm.weight.astype(np.float32), f"{name}.weight")
        if norm.kind == "rms":
            out = self.node("SkipSimplifiedLayerNormalization", [x, residual, scale], name, outputs=4, domain=_MS,
                            epsilon=norm.eps)
        else:
            out = self.node("SkipLayerNormalization", [x, residual, scale, self.init(_bias(norm), f"{name}.bias")],
                            name, outputs=4, domain=_MS, epsilon=norm.eps)
        return out[0], out[3]

    def head_norm(self, x: str, norm: Norm, heads: int, name: str) -> str:
        """A norm over ``head_dim`` on every head of ``x`` ``(batch, seq, heads * head_dim)``."""
        d = self.d.head_dim
        (split,) = self.node("Reshape", [x, self.const([0, 0, heads, d])], f"{name}/Reshape")
        normed = self.norm(split, norm, name)
        return self.node("Reshape", [normed, self.const([0, 0, heads * d])], f"{name}/Reshape_back")[0]

    # --- the model -------------------------------------------------------------------------
    def write(self, layers: Iterable[Layer], count: int = 0) -> dict[str, Any]:
        """Write ``model.onnx`` and ``model.onnx.data`` from ``layers`` (``count`` of them, for the
        progress lines); what was stored, as a record."""
        d = self.d
        self.data = _ExternalData(self.folder)
        try:
            hidden, residual = self._embeddings()
            self._attention_inputs()
            n = 0
            with Progress("writing the graph", count, "layers") as progress:
                for i, layer in enumerate(layers):
                    hidden, residual = self._layer(i, layer, hidden, residual)
                    n += 1
                    progress.update()
            logits = self._logits(hidden, residual)
        finally:
            self.data.close()
        self._save(n, logits)
        return {**self.counts, "layers": n, "data_bytes": self.data.bytes}

    def _embeddings(self) -> tuple[str, None]:
        d = self.d
        tied = d.head is None
        lookup = self._head_blocks() if tied else self._table_blocks()
        if lookup is not None:
            stored, blocks, (v, k) = lookup
            scales = self.node("Reshape", [f"{stored}.weight_scales", self.const([v, -1, 1])],
                               "/model/embed_tokens/scales/Reshape")[0]
            inputs = [f"{stored}.weight_Q{blocks.bits}", "input_ids", scales]
            if blocks.zero_points:
                raise ValueError("a tied head's blocks carry zero points, which the table lookup does not read")
            (rows,) = self.node("GatherBlockQuantized", inputs, "/model/embed_tokens/GatherBlockQuantized",
                                domain=_MS, bits=blocks.bits, block_size=blocks.block_size, gather_axis=0,
                                quantize_axis=2)
            (x,) = self.node("Reshape", [rows, self.const([0, 0, -1])], "/model/embed_tokens/Reshape")
            if k != d.hidden_size:  # blocks padded the rows
                (x,) = self.node("Slice", [x, self.const([0]), self.const([d.hidden_size]), self.const([-1])],
                                 "/model/embed_tokens/Slice")
        else:
            table = self._table()
            (x,) = self.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")
        if d.embed_scale != 1.0:
            scale = self.init(np.array(d.embed_scale, np.float32), "/model/embed_tokens/scale")
            (x,) = self.node("Mul", [x, scale], "/model/embed_tokens/Mul")
        if d.positions is not None:
            table = self.init(np.asarray(d.positions, np.float32), "model.embed_positions.weight")
            (pos,) = self.node("Gather", [table, "position_ids"], "/model/embed_positions/Gather")
            (x,) = self.node("Add", [x, pos], "/model/embed_positions/Add")
        return x, None

    def _table(self) -> str:
        """The float input table (tied: the head's float weight is its transpose)."""
        d = self.d
        if d.head is None:
            stored, blocks, _ = self.weight(self._tied_projection(), "lm_head")
            return self.node("Transpose", [stored], "/model/embed_tokens/Transpose", perm=[1, 0])[0]
        table, self._float_table = self._float_table, None
        return self.init(table, "model.embed_tokens.weight")

    def _tied_projection(self) -> Projection:
        return Projection(key=("tied_embeddings",), weight=self.d.embed)

    def _table_blocks(self):
        """An untied token table in blocks (as the encoder stores ``("embed_tokens",)``), or
        ``None`` to keep it float."""
        d = self.d
        table = np.asarray(d.embed() if callable(d.embed) else d.embed, np.float32)
        blocks = self.encode(("embed_tokens",), table)
        if blocks is None:
            self._float_table = table
            return None
        name = "model.embed_tokens"
        self.init(blocks.packed, f"{name}.weight_Q{blocks.bits}")
        self.init(blocks.scales.reshape(-1).astype(np.float32), f"{name}.weight_scales")
        self.counts["block_weights"] += 1
        self.counts["stored_weights"] += 1
        return name, blocks.layout, table.shape

    def _head_blocks(self):
        stored = self.weight(self._tied_projection(), "lm_head")
        return stored if stored[1] is not None else None

    def _attention_inputs(self) -> None:
        """``seqlens_k`` (tokens so far, less one, per row) and ``total_sequence_length``."""
        (total,) = self.node("ReduceSum", ["attention_mask", self.const([1])], "/model/attn_mask/ReduceSum",
                             keepdims=0)
        (less,) = self.node("Sub", [total, self.const(1)], "/model/attn_mask/Sub")
        self.node("Cast", [less], "/model/attn_mask/seqlens_k", outputs=["seqlens_k"], to=TensorProto.INT32)
        (shape,) = self.node("Shape", ["attention_mask"], "/model/attn_mask/Shape")
        (length,) = self.node("Gather", [shape, self.const(1)], "/model/attn_mask/Gather", axis=0)
        self.node("Cast", [length], "/model/attn_mask/total_seq_len", outputs=["total_seq_len"], to=TensorProto.INT32)
        for i, (cos, sin) in enumerate(self.d.rotary):
            self.counts["rotary_numbers"] += cos.size + sin.size
            self.init(np.asarray(cos, np.float32), f"cos_cache.{i}" if i else "cos_cache")
            self.init(np.asarray(sin, np.float32), f"sin_cache.{i}" if i else "sin_cache")

    def _layer(self, i: int, layer: Layer, hidden: str, residual: str | None) -> tuple[str, str]:
        base = f"/model/layers.{i}"
        if residual is None:  # the first layer: the embeddings are the residual stream
            x, residual = self.norm(hidden, layer.attn_norm, f"{base}/input_layernorm"), hidden
        else:
            x, residual = self.skip_norm(hidden, residual, layer.attn_norm, f"{base}/input_layernorm")
        attn = self._attention(i, layer, x)
        if layer.post_attn_norm is not None:
            attn = self.norm(attn, layer.post_attn_norm, f"{base}/post_attention_norm")
        if self.d.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            h = self.norm(residual, layer.ffn_norm, f"{base}/post_attention_layernorm")
            ffn = self._ffn(i, layer, h)
            (both,) = self.node("Add", [attn, ffn], f"{base}/parallel/Add")
            return both, residual
        x, residual = self.skip_norm(attn, residual, layer.ffn_norm, f"{base}/post_attention_layernorm")
        ffn = self._ffn(i, layer, x)
        if layer.post_ffn_norm is not None:
            ffn = self.norm(ffn, layer.post_ffn_norm, f"{base}/post_feedforward_norm")
        return ffn, residual

    def _attention(self, i: int, layer: Layer, x: str) -> str:
        d, base = self.d, f"/model/layers.{i}/attn"
        q_width, kv_width = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        if len(layer.qkv) == 1:
            packed = self.project(x, layer.qkv[0], f"{base}/qkv_proj")
            if layer.q_norm is None and layer.k_norm is None:
                q, k, v = packed, "", ""
            else:
                q, k, v = self.node("Split", [packed, self.const([q_width, kv_width, kv_width])], f"{base}/qkv/Split",
                                    outputs=3, axis=-1)
        else:
            q, k, v = (self.project(x, p, f"{base}/{n}_proj") for p, n in zip(layer.qkv, "qkv"))
        if layer.q_norm is not None:
            q = self.head_norm(q, layer.q_norm, d.num_heads, f"{base}/q_norm")
        if layer.k_norm is not None:
            k = self.head_norm(k, layer.k_norm, d.num_kv_heads, f"{base}/k_norm")
        cos, sin = ("", "") if layer.rotary < 0 else (
            ("cos_cache", "sin_cache") if layer.rotary == 0 else (f"cos_cache.{layer.rotary}", f"sin_cache.{layer.rotary}"))
        inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_seq_len", cos,
                  sin]
        attrs = dict(num_heads=d.num_heads, kv_num_heads=d.num_kv_heads, scale=float(d.scale),
                     local_window_size=layer.window or -1, do_rotary=int(layer.rotary >= 0),
                     rotary_interleaved=int(d.rotary_interleaved), softcap=float(d.softcap))
        outs = self.node("GroupQueryAttention", inputs, f"{base}/GroupQueryAttention", domain=_MS,
                         outputs=[f"{base}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                         **attrs)
        return self.project(outs[0], layer.attn_out, f"{base}/o_proj")

    def _ffn(self, i: int, layer: Layer, x: str) -> str:
        d, base = self.d, f"/model/layers.{i}/mlp"
        if d.gated and len(layer.ffn_in) == 1:
            both = self.project(x, layer.ffn_in[0], f"{base}/gate_up_proj")
            gate, up = self.node("Split", [both, self.const([2])], f"{base}/gate_up/Split", outputs=2, axis=-1,
                                 num_outputs=2) if self.opset >= 18 else self.node(
                "Split", [both], f"{base}/gate_up/Split", outputs=2, axis=-1)
        elif d.gated:
            gate, up = (self.project(x, p, f"{base}/{n}_proj") for p, n in zip(layer.ffn_in, ("gate", "up")))
        else:
            gate, up = self.project(x, layer.ffn_in[0], f"{base}/up_proj"), None
        act = self._activation(gate, f"{base}/act")
        if up is not None:
            (act,) = self.node("Mul", [act, up], f"{base}/gate/Mul")
        return self.project(act, layer.ffn_out, f"{base}/down_proj")

    def _activation(self, x: str, name: str) -> str:
        kind = self.d.activation
        if kind == "silu":
            (s,) = self.node("Sigmoid", [x], f"{name}/Sigmoid")
            return self.node("Mul", [x, s], f"{name}/Mul")[0]
        if kind == "gelu":
            return self.node("Gelu", [x], f"{name}/Gelu", domain=_MS)[0]
        if kind == "gelu_tanh":
            return self.node("FastGelu", [x], f"{name}/FastGelu", domain=_MS)[0]
        if kind == "relu":
            return self.node("Relu", [x], f"{name}/Relu")[0]
        raise ValueError(f"activation {kind!r}")

    def _logits(self, hidden: str, residual: str) -> str:
        d = self.d
        x, _ = self.skip_norm(hidden, residual, d.final_norm, "/model/norm/final")
        head = d.head or self._tied_projection()
        logits = self.project(x, head, "lm_head")
        if d.logit_softcap:
            c = self.init(np.array(d.logit_softcap, np.float32), "/lm_head/softcap")
            (logits,) = self.node("Div", [logits, c], "/lm_head/softcap/Div")
            (logits,) = self.node("Tanh", [logits], "/lm_head/softcap/Tanh")
            (logits,) = self.node("Mul", [logits, c], "/lm_head/softcap/Mul")
        self.nodes[-1].output[0] = "logits"
        return "logits"

    def _save(self, layers: int, logits: str) -> None:
        d = self.d
        kv = ["batch_size", d.num_kv_heads, "past_sequence_length", d.head_dim]
        present = ["batch_size", d.num_kv_heads, "total_sequence_length", d.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"])]
        if d.positions is not None:
            inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                        ["batch_size", "sequence_length"]))
        outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT,
                                                 ["batch_size", "sequence_length", d.vocab_size])]
        for i in range(layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
        graph = helper.make_graph(self.nodes, "main_graph", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset),
                                                        helper.make_opsetid(_MS, 1)],
                                  producer_name="compress")
        model.ir_version = 8
        onnx.save_model(model, str(self.folder / MODEL_FILE))


def _bias(norm: Norm) -> np.ndarray:
    return (norm.bias if norm.bias is not None else np.zeros_like(norm.weight)).astype(np.float32)


def rotary_tables(cos: np.ndarray, sin: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
    """``(cos, sin)`` as GroupQueryAttention reads them, ``(positions, rotary_dim / 2)``, from a
    rotary embedding's full-width tables ``(positions, rotary_dim)``, and whether their halves
    are interleaved (GPT-J: each frequency twice in a row) rather than stacked (``rotate_half``:
    the first half's frequencies again in the second).

    Raises:
        ValueError: tables that are neither.
    """
    half = cos.shape[-1] // 2
    if np.allclose(cos[:, :half], cos[:, half:]) and np.allclose(sin[:, :half], sin[:, half:]):
        return (cos[:, :half], sin[:, :half]), False
    if np.allclose(cos[:, 0::2], cos[:, 1::2]) and np.allclose(sin[:, 0::2], sin[:, 1::2]):
        return (cos[:, 0::2], sin[:, 0::2]), True
    raise ValueError("its rotary tables repeat their frequencies neither by halves nor in pairs")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
