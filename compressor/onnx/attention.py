"""Each decoder layer's attention in an optimum with-past graph, fused into onnxruntime's
``GroupQueryAttention``.

optimum exports a decoder's attention as the PyTorch code runs it: the cache concatenated with the
new keys and values, the key/value heads repeated for grouped-query attention, two matrix
products, the mask added, a softmax, transposes and reshapes, and the shape arithmetic around
them: about a hundred small operators per layer, which is most of a decode step's time on a
135 M-parameter model (reports/profile_decode_step.md). ``GroupQueryAttention`` does all of that
in one kernel and reads and writes the cache in the same layout as optimum's ``past_key_values``
/ ``present`` (batch, kv heads, sequence, head size), so the graph's inputs and outputs do not
change and ``ORTModelForCausalLM`` generates with it as before.

The fusion is exact by construction rather than by pattern: it starts from what the graph already
computed, not from the model's configuration. The queries and keys it takes are the graph's own,
after whatever the family does to them (rotary embedding of any kind, partial rotary, per-head
norms), so ``do_rotary`` stays off; the mask it adds is the graph's own additive mask (causal,
padding, sliding window) as ``attention_bias``, so left-padded batches stay exact; the scale is the
product of the graph's own scaling constants. Every key position is in range for every row
(``seqlens_k`` is the mask's length minus one), which is what the unfused graph computed too.
A layer whose attention does not read as that sequence (a soft cap, an upcast to float32 around
the softmax, a cache that is not concatenated) stays unfused; the record says how many were fused,
and the export check compares the fused graph with PyTorch as it does every graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import attribute, consumers, drop_unused_initializers, read_values, runtime_schema

_MS = "com.microsoft"


def fuse_group_query_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace each layer's attention in ``model`` (in place) by ``GroupQueryAttention``.

    Returns:
        How many layers were fused.
    """
    names = {i.name for i in model.graph.input}
    if not {"attention_mask", "input_ids"} <= names or not _runtime_takes_it():
        return model, 0
    graph = _Graph(model)
    if any(name.startswith(_Sequence.prefix) for name in graph.producer):
        return model, 0  # fused already
    fused = [match for node in list(model.graph.node) if node.op_type == "Softmax"
             if (match := _match(graph, node)) is not None]
    if not fused:
        return model, 0
    backup = onnx.ModelProto()
    backup.CopyFrom(model)
    seq = _Sequence(model, "attention_mask", "input_ids")
    for i, m in enumerate(fused):
        _replace(model, graph, m, seq, i)
    try:
        _drop_dead_nodes(model)
    except _Cycle:  # a value the fused attention writes is read before it (an unforeseen reader)
        model.CopyFrom(backup)
        return model, 0
    if not any(op.domain == _MS for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return model, len(fused)


#: GroupQueryAttention's inputs the fusion feeds: the mask as ``attention_bias`` and
#: ``query_seqlens`` (without it, a step of several tokens after a cache needs batch 1).
_GQA_INPUTS = {"attention_bias": 10, "query_seqlens": 16}


def _runtime_takes_it() -> bool:
    """Whether this onnxruntime's GroupQueryAttention has the inputs the fusion feeds (1.32 does;
    older releases have no ``attention_bias``): without them the graph is left as it is."""
    schema = runtime_schema("GroupQueryAttention", _MS)
    if schema is None:
        return False
    inputs = [i.name for i in schema.inputs]
    return all(len(inputs) > at and inputs[at] == name for name, at in _GQA_INPUTS.items())


class _Cycle(Exception):
    """The rewritten graph has no topological order."""


class _Graph:
    """Who produces and who consumes each value of a graph, and its constants."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.producer = {out: n for n in model.graph.node for out in n.output}
        self.consumers = consumers(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.inputs = {i.name for i in model.graph.input}
        self.outputs = {o.name for o in model.graph.output}
        self.shapes = {v.name: v.type.tensor_type.shape for v in [*model.graph.output, *model.graph.input]}

    def op(self, name: str, *types: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type in types else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type and name not in self.outputs else None

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.op(name, "Constant")
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, name: str) -> float | None:
        value = self.constant(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None


def _unscaled(graph: _Graph, name: str) -> tuple[str, float]:
    """``name`` with any multiplication or division by a scalar constant before it undone: the
    tensor and the factor."""
    factor = 1.0
    while (node := graph.op(name, "Mul", "Div")) is not None:
        consts = [graph.scalar(x) for x in node.input]
        if node.op_type == "Mul" and consts[1] is not None:
            factor, name = factor * consts[1], node.input[0]
        elif node.op_type == "Mul" and consts[0] is not None:
            factor, name = factor * consts[0], node.input[1]
        elif node.op_type == "Div" and consts[1] is not None:
            factor, name = factor / consts[1], node.input[0]
        else:
            break
    return name, factor


def _cache_concat(graph: _Graph, name: str) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The ``Concat(past, new)`` on the sequence axis that ``name`` is, or repeats as grouped-query
    attention repeats each key/value head (Unsqueeze, Expand, Reshape), and those repeating nodes."""
    repeat = []
    reshape = graph.op(name, "Reshape")
    if reshape is not None:
        expand = graph.op(reshape.input[0], "Expand")
        unsqueeze = graph.op(expand.input[0], "Unsqueeze") if expand is not None else None
        if unsqueeze is None:
            return None
        axes = graph.constant(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else attribute(unsqueeze, "axes")
        if axes is None or [int(a) for a in np.ravel(axes)] != [2]:  # repeat_kv: each head repeated in place
            return None
        repeat, name = [unsqueeze, expand, reshape], unsqueeze.input[0]
    concat = graph.op(name, "Concat")
    if (concat is None or len(concat.input) != 2 or attribute(concat, "axis") not in (2, -2)
            or concat.input[0] not in graph.inputs or concat.output[0] not in graph.outputs):
        return None
    return concat, repeat


def _cache_readers(graph: _Graph, concat: onnx.NodeProto, repeat: list[onnx.NodeProto],
                   attention: set[str]) -> list[tuple[onnx.NodeProto, bool]] | None:
    """The ``Shape`` nodes outside ``attention`` that read the cache or its repeated heads (the
    mask's slice to the key length reads one), each with whether it reads the repeated heads; None
    where anything else reads them, which the fusion could not keep."""
    own = {n.name for n in repeat} | attention
    readers = []
    for value, repeated in [(concat.output[0], False), *[(n.output[0], n is repeat[-1]) for n in repeat]]:
        for user in graph.consumers.get(value, []):
            if user.name in own:
                continue
            if user.op_type != "Shape" or value not in (concat.output[0], repeat[-1].output[0] if repeat else None) \
                    or attribute(user, "start") is not None or attribute(user, "end") is not None:
                return None
            readers.append((user, repeated))
    return readers


def _match(graph: _Graph, softmax: onnx.NodeProto) -> dict | None:
    """One layer's attention around ``softmax``, or None where it is not the plain sequence."""
    if attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    scores, bias = softmax.input[0], ""
    add = graph.op(scores, "Add")
    if add is None:  # no mask: the graph is not causal, GroupQueryAttention always is
        return None
    for a, b in (add.input, reversed(add.input)):
        if graph.op(_unscaled(graph, a)[0], "MatMul") is not None:
            scores, bias = a, b
            break
    else:
        return None
    scores, factor = _unscaled(graph, scores)
    qk = graph.op(scores, "MatMul")
    if qk is None:
        return None
    query, q_factor = _unscaled(graph, qk.input[0])
    keys_t, k_factor = _unscaled(graph, qk.input[1])
    transpose = graph.op(keys_t, "Transpose")
    if transpose is None or list(attribute(transpose, "perm", [])) != [0, 1, 3, 2]:
        return None
    key_cache = _cache_concat(graph, transpose.input[0])
    # the probabilities, through the NaN guard of scaled_dot_product_attention's export
    probs = softmax.output[0]
    users = graph.consumers.get(probs, [])
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
        where = next(u for u in users if u.op_type == "Where")
        isnan = next(u for u in users if u.op_type == "IsNaN")
        if where.input[0] != isnan.output[0] or where.input[2] != probs:
            return None
        probs = where.output[0]
    av = graph.only_consumer(probs, "MatMul")
    if key_cache is None or av is None or av.input[0] != probs:
        return None
    value_cache = _cache_concat(graph, av.input[1])
    back = graph.only_consumer(av.output[0], "Transpose")
    merge = graph.only_consumer(back.output[0], "Reshape") if back is not None else None
    if value_cache is None or merge is None or list(attribute(back, "perm", [])) != [0, 2, 1, 3]:
        return None
    attention = {transpose.name, av.name}
    name = transpose.output[0]
    while (user := graph.only_consumer(name, "Mul") or graph.only_consumer(name, "Div")) is not None and user is not qk:
        attention.add(user.name)
        name = user.output[0]
    readers = [_cache_readers(graph, *cache, attention) for cache in (key_cache, value_cache)]
    heads = _heads(graph, merge.output[0], key_cache[0].output[0])
    if heads is None or None in readers:
        return None
    return {"query": query, "key": key_cache[0].input[1], "value": value_cache[0].input[1],
            "past_key": key_cache[0].input[0], "past_value": value_cache[0].input[0], "bias": bias,
            "output": merge.output[0], "present_key": key_cache[0].output[0],
            "present_value": value_cache[0].output[0], "scale": factor * q_factor * k_factor,
            "num_heads": heads[0], "kv_num_heads": heads[1], "head_size": heads[2],
            "shape_readers": readers[0] + readers[1], "name": softmax.name}


def _heads(graph: _Graph, output: str, present: str) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head size): the cache's static dims give the key/value heads
    and the head size, the output projection's weight the query heads times the head size."""
    dims = graph.shapes[present].dim
    if len(dims) != 4 or not dims[1].dim_value or not dims[3].dim_value:
        return None
    kv_heads, head_size = dims[1].dim_value, dims[3].dim_value
    widths = {graph.inits[n.input[1]].dims[0] if n.op_type == "MatMul" else attribute(n, "K")
              for n in graph.consumers.get(output, []) if n.input[0] == output and n.input[1] in graph.inits
              and n.op_type in ("MatMul", "MatMulNBits")}
    if len(widths) != 1 or next(iter(widths)) % head_size:
        return None
    heads = next(iter(widths)) // head_size
    return (heads, kv_heads, head_size) if heads % kv_heads == 0 else None


class _Sequence:
    """The values every fused layer shares, made once from the inputs' shapes: ``seqlens_k``
    (every row: the mask's length minus one), ``total_sequence_length``, ``query_seqlens`` (every
    row: the new tokens) and the cache's shape for a head count (which the mask's slice to the
    key length reads)."""

    prefix = "gqa/"

    def __init__(self, model: onnx.ModelProto, mask: str, input_ids: str):
        self.model, p = model, self.prefix
        self._nodes([
            ("Shape", [mask], "mask_shape", {}),
            ("Gather", [p + "mask_shape", p + "one"], "total64", {"axis": 0}),
            ("Cast", [p + "total64"], "total", {"to": TensorProto.INT32}),
            ("Sub", [p + "total", p + "one32"], "last", {}),
            ("Gather", [p + "mask_shape", p + "zero"], "batch", {"axis": 0}),
            ("Unsqueeze", [p + "batch", p + "axes"], "batch1", {}),
            ("Expand", [p + "last", p + "batch1"], "seqlens_k", {}),
            ("Unsqueeze", [p + "total64", p + "axes"], "total1", {}),
            ("Shape", [input_ids], "ids_shape", {}),
            ("Gather", [p + "ids_shape", p + "one"], "new64", {"axis": 0}),
            ("Cast", [p + "new64"], "new", {"to": TensorProto.INT32}),
            ("Expand", [p + "new", p + "batch1"], "query_seqlens", {}),
        ])
        self._constants({"one": np.array(1, np.int64), "zero": np.array(0, np.int64),
                         "one32": np.array(1, np.int32), "axes": np.array([0], np.int64)})
        self.seqlens_k, self.total, self.query_seqlens = p + "seqlens_k", p + "total", p + "query_seqlens"
        self.shapes: dict[tuple[int, int], str] = {}

    def cache_shape(self, heads: int, head_size: int) -> str:
        """(batch, heads, mask length, head size) as an int64 vector."""
        if (heads, head_size) not in self.shapes:
            p, tag = self.prefix, f"{heads}x{head_size}"
            self._constants({f"heads{tag}": np.array([heads], np.int64), f"size{tag}": np.array([head_size], np.int64)})
            self._nodes([("Concat", [p + "batch1", p + f"heads{tag}", p + "total1", p + f"size{tag}"],
                          f"cache_shape{tag}", {"axis": 0})])
            self.shapes[heads, head_size] = p + f"cache_shape{tag}"
        return self.shapes[heads, head_size]

    def _nodes(self, specs) -> None:
        # appended; `_drop_dead_nodes` sorts the graph again
        self.model.graph.node.extend(helper.make_node(op, inputs, [self.prefix + out], name=self.prefix + out, **attrs)
                                     for op, inputs, out, attrs in specs)

    def _constants(self, values: dict[str, np.ndarray]) -> None:
        self.model.graph.initializer.extend(numpy_helper.from_array(v, self.prefix + k) for k, v in values.items())


def _split_heads(graph: _Graph, name: str) -> str | None:
    """The (batch, sequence, heads * head size) projection that ``name`` is the reshape to
    (batch, sequence, heads, head size) and transpose of, or None."""
    transpose = graph.op(name, "Transpose")
    reshape = graph.op(transpose.input[0], "Reshape") if transpose is not None else None
    if reshape is None or list(attribute(transpose, "perm", [])) != [0, 2, 1, 3]:
        return None
    shape = graph.constant(reshape.input[1])
    source = graph.producer.get(reshape.input[0])
    if source is None or source.op_type not in ("MatMul", "Add", "MatMulNBits") or (shape is not None and len(shape) != 4):
        return None
    return reshape.input[0]


def _to_3d(model: onnx.ModelProto, graph: _Graph, name: str, tag: str) -> str:
    """A (batch, heads, sequence, head size) tensor as (batch, sequence, heads * head size); the
    projection's own output where ``name`` is just its reshape and transpose."""
    source = _split_heads(graph, name)
    if source is not None:
        return source
    rotary = graph.op(name, "RotaryEmbedding")
    source = _split_heads(graph, rotary.input[0]) if rotary is not None and rotary.domain == _MS else None
    if source is not None:
        # onnxruntime's rotary takes (batch, sequence, hidden) as well: rotate before the heads are split
        rotated = f"{tag}/rotated"
        attrs = {a.name: helper.get_attribute_value(a) for a in rotary.attribute}
        model.graph.node.append(helper.make_node("RotaryEmbedding", [source, *rotary.input[1:]], [rotated],
                                                 name=rotated, domain=_MS, **attrs))
        return rotated
    swapped, merged = f"{tag}/bsnh", f"{tag}/bsd"
    shape = f"{tag}/shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), shape))
    model.graph.node.extend([
        helper.make_node("Transpose", [name], [swapped], name=swapped, perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [swapped, shape], [merged], name=merged),
    ])
    return merged


def _replace(model: onnx.ModelProto, graph: _Graph, m: dict, seq: _Sequence, index: int) -> None:
    """``m``'s attention as one ``GroupQueryAttention`` node, the nodes it replaces left for
    `_drop_dead_nodes` (node messages are edited in place: a protobuf list copies what it is given)."""
    tag = f"gqa/{index}"
    inputs = [""] * (max(_GQA_INPUTS.values()) + 1)
    inputs[:7] = [_to_3d(model, graph, m["query"], tag + "/q"), _to_3d(model, graph, m["key"], tag + "/k"),
                  _to_3d(model, graph, m["value"], tag + "/v"), m["past_key"], m["past_value"], seq.seqlens_k,
                  seq.total]
    inputs[_GQA_INPUTS["attention_bias"]] = m["bias"]
    inputs[_GQA_INPUTS["query_seqlens"]] = seq.query_seqlens
    for reader, repeated in m["shape_readers"]:  # the cache's shape, known without the cache
        shape = seq.cache_shape(m["num_heads"] if repeated else m["kv_num_heads"], m["head_size"])
        reader.op_type, reader.input[0] = "Identity", shape
    for key in ("output", "present_key", "present_value"):  # the GroupQueryAttention node's outputs now
        producer = graph.producer[m[key]]
        producer.output[list(producer.output).index(m[key])] = f"{tag}/replaced/{key}"
    model.graph.node.append(helper.make_node(
        "GroupQueryAttention", inputs, [m["output"], m["present_key"], m["present_value"]],
        name=f"{tag}/GroupQueryAttention", domain=_MS, num_heads=m["num_heads"],
        kv_num_heads=m["kv_num_heads"], scale=float(m["scale"]), do_rotary=0))


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Nodes whose outputs nothing reads, removed until none is left, the graph sorted again, and
    the initializers only they read dropped."""
    needed = {o.name for o in model.graph.output}
    alive = []
    for n in reversed(_topological(list(model.graph.node), model)):
        if any(out in needed for out in n.output):
            alive.append(n)
            needed |= read_values([n])
    del model.graph.node[:]
    model.graph.node.extend(reversed(alive))
    drop_unused_initializers(model)


def _topological(nodes: list[onnx.NodeProto], model: onnx.ModelProto) -> list[onnx.NodeProto]:
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    order, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(x in available for x in n.input):
                order.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise _Cycle(f"{len(rest)} nodes wait on values nothing before them writes")
        pending = rest
    return order
