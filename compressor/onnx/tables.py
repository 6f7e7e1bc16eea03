"""Embedding tables and output heads as weight-only blocks (int4 exports; int8 ones with ``--embedding-bits``).

A language model's vocabulary matrix is its largest: 49,152 x 576 in SmolLM2-135M, a fifth of the
parameters, and most small decoders tie it, using the one matrix for the lookup of the input
tokens and for the output head. The exporter writes it twice (a ``Gather`` table and a ``MatMul``
weight, transposed) and onnxruntime's quantizers keep both: int8 with one scale for the whole
tensor each, 57 MB of a 108 MB file for SmolLM2 with 8 of its 30 blocks dropped. Here the matrix is
quantized once, in blocks along the hidden dimension with one scale each (symmetric, as
``MatMulNBits`` reads them by default), and both uses read those same bytes: the head through
``MatMulNBits`` (N = vocabulary, K = hidden: its weight layout is the table's own rows), the
lookup through ``GatherBlockQuantized`` (onnxruntime's block-quantized Gather, which dequantizes
only the rows it gathers). A table nothing ties to a head gets the same blocks, read by its own
``GatherBlockQuantized``.

The head's activations stay in the precision ``accuracy_level`` gives every MatMulNBits, not
the one scale per call that dynamic int8 gives them.

Scales are rounded to float16 (`half_scales`), and a table that only lookups read stores them so,
behind a ``Cast`` that onnxruntime folds when it loads the file: 2 bytes a block instead of 4, a
tenth of a 4-bit table in blocks of 32, for a change in each scale of at most 2^-11 of it.

A table looked up by the token ids can keep its most used rows in 8 bits and the rest in 4
(``hot_rows``): a token's error costs in proportion to how often it is read, and a vocabulary's
use is steep (the 2,000 most used of MiniLM's cut 17,805 tokens are 80% of its suite's text), so
8-bit blocks where most of the text is read take most of the 4-bit table's loss away for a share
of the 8-bit table's bytes. The lookup then gathers each id's slot (hot rows first), reads both
tables and keeps the one the slot belongs to.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..grids.rows import hot_row_order, quantize_rows
from .graph import attribute, drop_unused_initializers, read_values, runtime_schema


def supported() -> bool:
    """Whether this onnxruntime's GatherBlockQuantized reads uint8 blocks with a ``bits``
    attribute (older versions take only the int4 types, which need opset 21)."""
    schema = runtime_schema("GatherBlockQuantized")
    return schema is not None and "bits" in schema.attributes


def block_quantize_tables(model: onnx.ModelProto, *, bits: int, block_size: int, accuracy_level: int,
                          heads: set[str] | None = None, row_counts: np.ndarray | None = None,
                          hot_share: float = 0.0, ids_input: str = "input_ids") -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Store ``model``'s embedding tables and output heads as ``bits``-bit blocks, in place.

    Args:
        model: The graph, changed in place.
        bits: 4 or 8.
        block_size: Weights per scale along the hidden dimension.
        accuracy_level: The heads' MatMulNBits ``accuracy_level``.
        heads: Names of the MatMul nodes that are output heads (those that write a graph
            output); a MatMul whose weight equals a table's transpose is a tied head too. ``None``:
            the tables only.
        row_counts: How often text uses each token id, for ``hot_share``.
        hot_share: Share of the token table's rows (the table gathered by graph input
            ``ids_input``) to store in 8-bit blocks while the rest take ``bits`` (4): the most
            used tokens by ``row_counts`` (`hot_row_order`). Only for a table no head reads.
        ids_input: The graph input that holds the token ids.

    A head whose weight is the transpose of a table (tied) and that table share one set of
    blocks. Left as they are (the int8 path takes them): tables and heads whose hidden size is
    not a whole number of blocks, Gathers on another axis, non-fp32 weights, and a weight that
    some other node reads too (replacing it would store it twice).
    Returns what was done: tables, lookups, heads and tied pairs stored as blocks, and the hot
    rows kept.
    """
    blocks = _Blocks(model, bits, block_size)
    tables, head_nodes, table_of = _replaceable(model, blocks, heads)
    replaced, tied = {}, 0  # a replaced node's first output -> the nodes in its place
    for head in head_nodes:
        rows_of = table_of.get(head.input[1])
        tied += rows_of is not None
        blob, scale, n, k = blocks.stored_for(rows_of, False) if rows_of else blocks.stored_for(head.input[1], True)
        replaced[head.output[0]] = [helper.make_node(
            "MatMulNBits", [head.input[0], blob, scale], list(head.output), name=f"{head.name}_Q{bits}",
            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)]
    headless = {g.input[0] for g in tables} - {table_of.get(n.input[1]) for n in head_nodes}  # tables no head reads
    hot_table, hot_rows, counts = None, None, None
    if hot_share and row_counts is not None and bits < 8:
        token_tables = {g.input[0] for g in tables if g.input[1] == ids_input and g.input[0] in headless}
        if len(token_tables) == 1:
            hot_table = next(iter(token_tables))
            counts = np.zeros(blocks.inits[hot_table].dims[0], dtype=np.int64)
            used = np.asarray(row_counts)[: len(counts)]
            counts[: len(used)] = used
            hot_rows = hot_row_order(counts, hot_share)
            hot_table = hot_table if len(hot_rows) else None
    for table in tables:
        name = table.input[0]
        if name == hot_table:
            nodes, k = blocks.hot_lookup(table, hot_rows)
        else:
            nodes, k = blocks.lookup(table, lookup_only=name in headless)
        replaced[table.output[0]] = nodes + blocks.reshaped(table, k)
    if not replaced:
        return model, {}
    blocks.write(replaced)
    return model, {"bits": bits, "block_size": block_size, "tables": len({t.input[0] for t in tables}),
                   "lookups": len(tables), "heads": len(head_nodes), "tied": tied,
                   "stored_matrices": len(blocks.stored) + len(blocks.split),
                   **({"hot_rows": blocks.split[hot_table][3], "hot_bits": 8,
                       "hot_tokens_read": float(counts[hot_rows].sum() / max(1, counts.sum()))} if blocks.split else {}),
                   "operators": dict(Counter(n.op_type for ns in replaced.values() for n in ns
                                             if n.op_type in ("MatMulNBits", "GatherBlockQuantized")))}


def _replaceable(model: onnx.ModelProto, blocks: _Blocks, heads: set[str] | None):
    """The lookups and heads to store as blocks: ``(table Gathers, head MatMuls, tied head weight
    -> the table it is the transpose of)``. One initializer both gathered and multiplied by is
    left alone (its rows and its columns would need blocks of their own), and a weight is replaced
    only when every node that reads it is: otherwise its float copy would stay beside the blocks."""
    inits = blocks.inits
    # how many nodes read each value (a node's subgraphs included: such a reader is never replaced)
    readers = Counter(name for node in model.graph.node for name in read_values([node]))
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and attribute(n, "axis", 0) == 0
               and blocks.fits(n.input[0], 1)]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.output and blocks.fits(n.input[1], 0)]
    table_of = {}  # a tied head's weight -> the table it is the transpose of
    if heads is not None:
        shapes: dict[tuple, list[str]] = {}  # GPT-2's token and position tables can have one shape
        for g in gathers:
            if g.input[0] not in shapes.setdefault(tuple(inits[g.input[0]].dims), []):
                shapes[tuple(inits[g.input[0]].dims)].append(g.input[0])
        for node in matmuls:
            weight = node.input[1]
            for table in shapes.get(tuple(inits[weight].dims)[::-1], []):
                if weight != table and weight not in table_of and np.array_equal(blocks.array(table),
                                                                                  blocks.array(weight).T):
                    table_of[weight] = table
    head_nodes = [n for n in matmuls if heads is not None and (n.name in heads or n.input[1] in table_of)]
    looked_up = {g.input[0] for g in gathers}
    head_nodes = [n for n in head_nodes if n.input[1] not in looked_up]
    users = Counter(g.input[0] for g in gathers) + Counter(n.input[1] for n in head_nodes)
    whole = {name for name, count in users.items() if count == readers[name]}
    tables = [g for g in gathers if g.input[0] in whole]
    kept_tables = {g.input[0] for g in tables}
    head_nodes = [n for n in head_nodes if n.input[1] in whole and (n.input[1] not in table_of
                                                                     or table_of[n.input[1]] in kept_tables)]
    return tables, head_nodes, table_of


class _Blocks:
    """The block tables being written into one graph: each distinct matrix's blocks stored once,
    each stored scale's float32 3-d form made once, the new initializers in the order made."""

    def __init__(self, model: onnx.ModelProto, bits: int, block_size: int):
        self.model, self.bits, self.block_size = model, bits, block_size
        self.inits = {t.name: t for t in model.graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}
        self.new_inits: list = []
        # (initializer, whether its rows are the transpose) -> (blocks, scales, rows, hidden)
        self.stored: dict[tuple[str, bool], tuple[str, str, int, int]] = {}
        self.split: dict[str, tuple] = {}  # the hot table -> (slots, hot blocks, cold blocks, hot count)
        self.scales_3d: dict[str, str] = {}  # a stored scale -> its float32, 3-d form
        self.scale_halved: dict[str, bool] = {}  # a stored scale -> kept as float16 behind a Cast

    def fits(self, name: str, hidden_axis: int) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 \
            and t.dims[hidden_axis] % self.block_size == 0

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.inits[name])
        return self.arrays[name]

    def stored_for(self, name: str, transposed: bool) -> tuple[str, str, int, int]:
        """The blocks of ``name`` (its transpose's rows for an untied head), made on first use."""
        key = (name, transposed)
        if key not in self.stored:
            rows = self.array(name).T if transposed else self.array(name)
            codes, scales, _ = quantize_rows(rows, self.bits, self.block_size)
            base = f"{name}_B{self.bits}{'T' if transposed else ''}"
            self.new_inits.extend([numpy_helper.from_array(codes, base),
                                   numpy_helper.from_array(scales, f"{base}_scale")])
            self.stored[key] = (base, f"{base}_scale", rows.shape[0], rows.shape[1])
        return self.stored[key]

    def scale_input(self, scale: str, n: int, k: int) -> tuple[str, list]:
        """A stored scale as GatherBlockQuantized reads it (float32, the blocks' rank; onnxruntime
        folds the Cast and Reshape at load) and the nodes that make it, the first time."""
        if scale in self.scales_3d:
            return self.scales_3d[scale], []
        nodes, source = [], scale
        if self.scale_halved.get(scale):
            nodes.append(helper.make_node("Cast", [scale], [f"{scale}/float"], name=f"{scale}/float",
                                          to=onnx.TensorProto.FLOAT))
            source = f"{scale}/float"
        self.new_inits.append(numpy_helper.from_array(np.array([n, k // self.block_size, 1], dtype=np.int64),
                                                      f"{scale}/shape3"))
        nodes.append(helper.make_node("Reshape", [source, f"{scale}/shape3"], [f"{scale}/3d"], name=f"{scale}/3d"))
        self.scales_3d[scale] = f"{scale}/3d"
        return self.scales_3d[scale], nodes

    def lookup(self, table: onnx.NodeProto, lookup_only: bool) -> tuple[list, int]:
        """The nodes of a lookup from one block table: ``(nodes up to the blocks, hidden size)``."""
        blob, scale, n, k = self.stored_for(table.input[0], False)
        self.scale_halved.setdefault(scale, lookup_only)
        scale3, nodes = self.scale_input(scale, n, k)
        nodes.append(helper.make_node("GatherBlockQuantized", [blob, table.input[1], scale3],
                                      [f"{table.output[0]}/blocks"], name=f"{table.output[0]}_Q{self.bits}",
                                      domain="com.microsoft", bits=self.bits, block_size=self.block_size,
                                      gather_axis=0, quantize_axis=2))
        return nodes, k

    def hot_lookup(self, table: onnx.NodeProto, hot_rows: np.ndarray) -> tuple[list, int]:
        """The nodes of a lookup from the hot (8-bit) and cold tables: each id's slot says which."""
        name, base, bits = table.input[0], table.output[0], self.bits
        if name not in self.split:
            self.split[name] = _split_blocks(self.array(name), hot_rows, bits, self.block_size, name, self.new_inits)
            for part in self.split[name][1:3]:
                self.scale_halved[part[1]] = True
        slots, hot, cold, _ = self.split[name]
        k = hot[3]
        hot_scale, nodes = self.scale_input(hot[1], hot[2], k)
        cold_scale, more = self.scale_input(cold[1], cold[2], k)
        nodes += more
        slot, in_hot, first, rest, hot_q, cold_q = (f"{base}/{s}" for s in ("slot", "in_hot", "hot_id", "cold_id",
                                                                              "hot_blocks", "cold_blocks"))
        return nodes + [
            helper.make_node("Gather", [slots, table.input[1]], [f"{slot}/stored"], name=f"{slot}/stored"),
            helper.make_node("Cast", [f"{slot}/stored"], [slot], name=slot, to=onnx.TensorProto.INT32),
            helper.make_node("Less", [slot, f"{slots}/hot"], [f"{in_hot}/ids"], name=f"{in_hot}/ids"),
            helper.make_node("Unsqueeze", [f"{in_hot}/ids", f"{slots}/axes"], [in_hot], name=in_hot),
            helper.make_node("Min", [slot, f"{slots}/last_hot"], [first], name=first),
            helper.make_node("Sub", [slot, f"{slots}/hot"], [f"{rest}/shifted"], name=f"{rest}/shifted"),
            helper.make_node("Max", [f"{rest}/shifted", f"{slots}/zero"], [rest], name=rest),
            helper.make_node("GatherBlockQuantized", [hot[0], first, hot_scale], [hot_q], name=f"{base}_Q8",
                             domain="com.microsoft", bits=8, block_size=self.block_size, gather_axis=0, quantize_axis=2),
            helper.make_node("GatherBlockQuantized", [cold[0], rest, cold_scale], [cold_q], name=f"{base}_Q{bits}",
                             domain="com.microsoft", bits=bits, block_size=self.block_size, gather_axis=0,
                             quantize_axis=2),
            helper.make_node("Where", [in_hot, hot_q, cold_q], [f"{base}/blocks"], name=f"{base}/blocks"),
        ], k

    def reshaped(self, table: onnx.NodeProto, k: int) -> list:
        """The gathered blocks back in the lookup's own shape: (index shape..., hidden)."""
        base = table.output[0]
        names = {s: f"{base}/{s}" for s in ("index_shape", "out_shape", "blocks", "hidden")}
        self.new_inits.append(numpy_helper.from_array(np.array([k], dtype=np.int64), names["hidden"]))
        return [
            helper.make_node("Shape", [table.input[1]], [names["index_shape"]], name=names["index_shape"]),
            helper.make_node("Concat", [names["index_shape"], names["hidden"]], [names["out_shape"]],
                             name=names["out_shape"], axis=0),
            helper.make_node("Reshape", [names["blocks"], names["out_shape"]], list(table.output), name=f"{base}/rows"),
        ]

    def write(self, replaced: dict[str, list]) -> None:
        """The replaced nodes swapped for theirs, the new initializers added (a lookup-only
        table's scales as float16, behind their Cast), the old ones no node reads dropped."""
        model = self.model
        for init in self.new_inits:
            if self.scale_halved.get(init.name):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
        nodes = []
        for node in model.graph.node:
            nodes.extend(replaced.get(node.output[0] if node.output else None, [node]))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(self.new_inits)
        drop_unused_initializers(model)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _split_blocks(rows: np.ndarray, hot: np.ndarray, bits: int, block_size: int, name: str, new_inits: list) -> tuple:
    """``rows`` as two block tables, the ``hot`` rows in 8 bits and the others in ``bits``, and
    the slot table that maps a row's id to its place: ``(slots, (hot blocks, scales, rows,
    hidden), (cold ...), hot count)``, the initializers added to ``new_inits``. Slots below the
    hot count are rows of the hot table; the others, less the hot count, rows of the cold one."""
    n, k = rows.shape
    is_hot = np.zeros(n, dtype=bool)
    is_hot[hot] = True
    cold = np.flatnonzero(~is_hot)
    order = np.concatenate([hot, cold])
    # int16 slots where they fit (any vocabulary under 32,768 rows: half the bytes), cast to the
    # int32 indices GatherBlockQuantized takes after the lookup
    slots = np.empty(n, dtype=np.int16 if n <= np.iinfo(np.int16).max else np.int32)
    slots[order] = np.arange(n)
    parts = []
    for part, part_bits, tag in ((hot, 8, "hot"), (cold, bits, "cold")):
        codes, scales, _ = quantize_rows(rows[part], part_bits, block_size)
        base = f"{name}_B{part_bits}{tag}"
        new_inits.extend([numpy_helper.from_array(codes, base), numpy_helper.from_array(scales, f"{base}_scale")])
        parts.append((base, f"{base}_scale", len(part), k))
    s = f"{name}_slots"
    new_inits.extend([numpy_helper.from_array(slots, s),
                      numpy_helper.from_array(np.array(len(hot), dtype=np.int32), f"{s}/hot"),
                      numpy_helper.from_array(np.array(len(hot) - 1, dtype=np.int32), f"{s}/last_hot"),
                      numpy_helper.from_array(np.array(0, dtype=np.int32), f"{s}/zero"),
                      numpy_helper.from_array(np.array([-2, -1], dtype=np.int64), f"{s}/axes")])
    return s, parts[0], parts[1], len(hot)

