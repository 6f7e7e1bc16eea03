"""Edits and counts on exported ONNX graphs, for weights that several layers share.

The TorchScript exporter stores a shared weight once and feeds its other users through
``Identity`` nodes. onnxruntime's quantizer only quantizes a MatMul whose weight input *is* an
initializer, so it skips every MatMul behind an Identity (20 of 74 MatMuls on a shared
BERT-base, as measured). `inline_identity_weights` points those MatMuls at the initializer itself; the weight
is still stored once, and the quantizer, which caches quantized initializers by name, quantizes
it once for all its users.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..data.text import fit_length

#: Nodes that multiply by a weight matrix (``Attention``: onnxruntime's fused attention, which
#: holds the query, key and value projections as one weight).
WEIGHT_OPS = ("MatMul", "Gemm", "Attention")
#: What those become after int8 quantization (dynamic QOperator, static QOperator or QDQ).
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm",
                 "QAttention", "MatMulNBits")  # the last: int4 weight-only, two 4-bit numbers a byte


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def consumers(nodes) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the ``nodes`` that read it (empty optional inputs left out)."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            if name:
                found.setdefault(name, []).append(node)
    return found


def in_scopes(name: str, scopes: tuple[str, ...]) -> bool:
    """Whether node ``name`` (``/encoder/layer.0/output/dense/MatMul``) lies inside one of the
    modules ``scopes`` (qualified PyTorch names, ``encoder.layer.0.output.dense``): the exporter
    names a node after the module that made it, so dots and slashes are read alike."""
    return name.strip("/").replace("/", ".").startswith(tuple(f"{scope}." for scope in scopes))


def inline_identity_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Feed consumers of ``Identity(initializer)`` from the initializer directly; drop the Identity.

    Returns the number of Identity nodes removed. Identities whose output is a graph output stay.
    """
    inits = initializers(model)
    outputs = {o.name for o in model.graph.output}
    rename = {}
    dropped = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            dropped.append(node)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for node in dropped:
        model.graph.node.remove(node)
    return model, len(dropped)


def merge_identical_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Store initializers with identical contents (type, shape and bytes) once, every node reading
    the first. onnxruntime's attention fusion concatenates each layer's query, key and value
    weights into one new initializer per layer, so the layers of a shared group get copies of the
    same concatenation; this gives them back one. Returns the number of copies removed."""
    import hashlib

    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for init in model.graph.initializer:
        key = (init.data_type, tuple(init.dims), hashlib.sha256(numpy_helper.to_array(init).tobytes()).hexdigest())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
    if not rename:
        return model, 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    keep = [t for t in model.graph.initializer if t.name not in rename]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model, len(rename)


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite ``Gemm(x, W, b)`` on a weight initializer as ``MatMul(x, W) + b``.

    GPT-2's Conv1D exports as Gemm, which onnxruntime's dynamic quantizer does not handle; as a
    MatMul it is quantized like every other projection. A transposed weight (``transB=1``) is
    transposed once in the file, however many Gemms read it. Returns the number rewritten.
    """
    inits = initializers(model)
    transposed: dict[str, str] = {}
    rewritten = 0
    nodes = list(model.graph.node)
    for node in nodes:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            if weight not in transposed:
                name = f"{weight}.T"
                array = numpy_helper.to_array(inits[weight]).T.copy()
                model.graph.initializer.append(numpy_helper.from_array(array, name))
                transposed[weight] = name
            weight = transposed[weight]
        index = list(model.graph.node).index(node)
        product = f"{node.output[0]}.matmul"
        new_nodes = [helper.make_node("MatMul", [node.input[0], weight], [product if len(node.input) > 2 and node.input[2] else node.output[0]],
                                      name=f"{node.name}.MatMul")]
        if len(node.input) > 2 and node.input[2]:
            new_nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.Add"))
        model.graph.node.remove(node)
        for offset, new in enumerate(new_nodes):
            model.graph.node.insert(index + offset, new)
        rewritten += 1
    drop_unused_initializers(model)
    return model, rewritten


def read_values(nodes) -> set[str]:
    """Every value ``nodes`` read, those their subgraphs (If, Loop) read from outside included."""
    read = set()
    for node in nodes:
        read.update(node.input)
        for a in node.attribute:
            for graph in ([a.g] if a.HasField("g") else list(a.graphs)):
                read |= read_values(graph.node)
    return read


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Initializers no node (or subgraph) reads and no graph output is, removed."""
    used = read_values(model.graph.node) | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


#: ``doc_string`` of the float MatMuls that carry int4 blocks' float zero points
#: (`zero_points`): quantization parameters, not projections.
ZERO_POINT_OFFSET = "compress: int4 blocks' float zero points as a block-sum offset"


#: Inputs of quantization ops that hold scales and zero points rather than the model's numbers.
_QUANT_PARAM_INPUTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "MatMulInteger": (2, 3),
                       "DynamicQuantizeMatMul": (2, 3), "QLinearMatMul": (1, 2, 4, 5, 6, 7), "MatMulNBits": (2, 3),
                       "GatherBlockQuantized": (2, 3), "QAttention": (3, 4, 6, 7)}


def stored_elements(model: onnx.ModelProto) -> int:
    """The model's numbers stored in the file's initializers (a shared weight counts once).

    Quantization scales and zero points are left out (those at the scale and zero-point inputs
    of quantization ops, the products that carry float zero points (`ZERO_POINT_OFFSET`), and
    those onnxruntime's quantizer names ``*_scale`` / ``*_zero_point``):
    per-channel scales would otherwise count one number per output channel of every weight.
    """
    params = {name for node in model.graph.node for i, name in enumerate(node.input)
              if i in _QUANT_PARAM_INPUTS.get(node.op_type, ())}
    # the block sums' 0/1 matrices and the blocks' offsets stand in for float zero points
    params |= {node.input[1] for node in model.graph.node if node.doc_string == ZERO_POINT_OFFSET}
    # int4 blocks: the weight's own N x K numbers (the packed tensor pads K to whole blocks)
    packed = {node.input[1]: attribute(node, "N") * attribute(node, "K")
              for node in model.graph.node if node.op_type == "MatMulNBits"}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # block-quantized tables: bits-bit numbers packed in bytes
        if node.op_type == "GatherBlockQuantized" and node.input[0] in inits and node.input[0] not in packed:
            size = int(np.prod(inits[node.input[0]].dims, dtype=np.int64))
            packed[node.input[0]] = size * 8 // attribute(node, "bits", 4)
    return int(sum(packed.get(t.name, np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
                   if t.name not in params and not t.name.endswith(("_scale", "_zero_point"))))


def runtime_schema(op_type: str, domain: str = "com.microsoft"):
    """This onnxruntime's schema of ``domain``'s operator ``op_type`` (its inputs and attributes
    say what the installed version takes), or ``None`` where it has none."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C
    except ImportError:
        return None
    return next((s for s in C.get_all_operator_schema() if s.name == op_type and s.domain == domain), None)


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def weight_matmuls(model: onnx.ModelProto) -> dict[str, int]:
    """How many projections the graph has and how many still multiply by a weight stored in float.

    ``matmuls``: float MatMul/Gemm nodes; ``quantized``: int8 ones (QDQ MatMuls reading a
    dequantized int8 weight included); ``on_weights``: nodes of either kind that multiply by a
    weight (the projections, as opposed to attention's activation products);
    ``float_on_weights``: those whose weight is stored in floating point, read directly or
    through Identity, DequantizeLinear or DynamicQuantizeLinear nodes. The last case is what
    onnxruntime's quantizer does to a weight behind an Identity: it keeps it in fp32 and
    quantizes it anew on every call. After int8 quantization ``float_on_weights`` must be 0.
    """
    inits = initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    counts = Counter(n.op_type for n in model.graph.node if n.doc_string != ZERO_POINT_OFFSET)
    passes = ("Identity", "DequantizeLinear", "DynamicQuantizeLinear")

    def stored(name: str) -> onnx.TensorProto | None:
        """The initializer a node input comes from, through pass-through and (de)quantize nodes."""
        while name not in inits and name in producers and producers[name].op_type in passes:
            name = producers[name].input[0]
        weight = inits.get(name)
        return weight if weight is not None and len(weight.dims) >= 2 else None

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    on_weights = float_on_weights = qdq = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS + QUANTIZED_OPS or node.doc_string == ZERO_POINT_OFFSET:
            continue
        # MatMulNBits: its weight is input 1 (the scales and zero points after it are not weights)
        inputs = node.input[1:2] if node.op_type == "MatMulNBits" else node.input
        weights = [w for w in map(stored, inputs) if w is not None]
        if not weights:
            continue
        on_weights += 1
        if any(w.data_type in floats for w in weights):
            float_on_weights += 1
        elif node.op_type in WEIGHT_OPS:  # QDQ: a MatMul on DequantizeLinear(int8 weight) runs as an int8 kernel
            qdq += 1
    return {"matmuls": sum(counts[op] for op in WEIGHT_OPS), "quantized": sum(counts[op] for op in QUANTIZED_OPS) + qdq,
            "on_weights": on_weights, "float_on_weights": float_on_weights}


# ---- feeding a graph -------------------------------------------------------------------------


def scoped_matmuls(model: onnx.ModelProto, scopes: tuple[str, ...]) -> list[str]:
    """Names of the MatMul nodes inside the modules ``scopes`` (qualified PyTorch names;
    `in_scopes`)."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and in_scopes(n.name, scopes)]


def model_inputs(tokenizer, texts: list[str], max_length: int, input_names, *, padding: bool | str = True) -> dict[str, np.ndarray]:
    """The ONNX feed for ``texts`` (see `onnx_feed`)."""
    enc = tokenizer(texts, truncation=True, max_length=fit_length(tokenizer, max_length), padding=padding, return_tensors="np")
    return onnx_feed(enc, input_names)


def graph_inputs(graph) -> dict[str, tuple[list[int | None], np.dtype]]:
    """A graph's inputs: name -> (dims, a named or unknown dim as ``None``; numpy dtype)."""
    from onnx import helper

    inputs = {}
    for value in graph.graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        inputs[value.name] = (dims, helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return inputs


def onnx_feed(arrays, inputs) -> dict[str, np.ndarray]:
    """The model's named inputs as int64 arrays from a tokenizer's output: token types filled
    with zeros where the tokenizer gives none, position ids as optimum's ORTModelForCausalLM
    computes them (counting real tokens only), and an empty KV cache for a decoder exported with
    one (``past_key_values.*``: the prefill step).

    Args:
        arrays: The tokenizer's output.
        inputs: The graph's input names, or `graph_inputs` (needed for a KV cache's shapes).
    """
    feed = {k: np.asarray(v, dtype=np.int64) for k, v in arrays.items() if k in inputs}
    if "token_type_ids" in inputs and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    if "position_ids" in inputs:
        mask = feed.get("attention_mask", np.ones_like(feed["input_ids"]))
        feed["position_ids"] = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1).astype(np.int64)
    for name in inputs:
        if name.startswith("past_key_values."):
            if not isinstance(inputs, dict):
                raise ValueError(f"{name}: give graph_inputs(graph) to feed a KV cache")
            dims, dtype = inputs[name]
            # (batch, key/value heads, past length 0, head dim)
            shape = [feed["input_ids"].shape[0], dims[1] or 1, 0, dims[3] or 1]
            feed[name] = np.zeros(shape, dtype=dtype)
    return feed


#: Protobuf's limit on one serialized message: a graph whose weights come near it keeps them in
#: an external data file beside the model instead.
PROTO_LIMIT = 2**31 - 2**24


def save_model(model: onnx.ModelProto, path, limit: int = PROTO_LIMIT) -> bool:
    """Write ``model`` to ``path``: one file, or, when its initializers reach ``limit`` bytes,
    the graph there and every tensor over 1 KiB in ``<name>.data`` beside it (onnxruntime and
    optimum read both). Returns whether the data went to its own file."""
    from pathlib import Path

    path = Path(path)
    if sum(t.ByteSize() for t in model.graph.initializer) < limit:
        onnx.save(model, str(path))
        return False
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=1024)
    return True
