"""Quantize an exported ONNX folder in place.

int8 goes through the tools a user of this field already trusts: optimum's ``ORTQuantizer``
with its ``AutoQuantizationConfig`` preset for this CPU (dynamic), and onnxruntime's
``quantize_static`` with the same preset's settings and a calibration reader over real text
(static; optimum's own calibration needs the ``datasets`` package). What we add is the graph
preparation that keeps shared weights quantized and stored once (`compressor.onnx_graph`).
fp16 uses onnxruntime's float16 converter with float32 inputs and outputs kept.

Static ranges fail on one projection per layer: the FFN down-projection, whose input (the
output of GELU / SwiGLU) carries a few outlier features hundreds of times larger than the rest
(Bondarenko et al., 2021, "Understanding and Overcoming the Challenges of Efficient Transformer
Quantization"). One static int8 range over it either clips the outliers or rounds everything
else to zero. Those MatMuls, LoRA branches included, are quantized dynamically instead (int8
weights, a range per call); on the bundled MiniLM, with per-channel weight scales, this lifts
the mean cosine to PyTorch from 0.88 to 0.98 (reports/bench_int8_static.md).
"""

from __future__ import annotations

import itertools
import platform
from collections import Counter
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import calibration_texts
from ..data.text import fit_length
from ..errors import ExportError, first_line
from ..onnx_graph import attribute, gemm_to_matmul, in_scopes, inline_identity_weights
from .config import QuantizeConfig
from .tables import block_quantize_tables
from .tables import supported as supported_tables
from .zero_points import fold_float_zero_points

MODEL_FILE = "model.onnx"


def host_isa() -> str:
    """The best optimum quantization preset this CPU runs: avx512_vnni, avx512, avx2 or arm64."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    for isa in ("avx512_vnni", "avx512f"):
        if isa in flags:
            return isa.replace("avx512f", "avx512")
    return "avx2"


def optimum_preset(isa: str, *, is_static: bool, per_channel: bool = False):
    """``AutoQuantizationConfig.<isa>(is_static=..., per_channel=...)``: what optimum users run."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    return getattr(AutoQuantizationConfig, host_isa() if isa == "auto" else isa)(is_static=is_static,
                                                                                   per_channel=per_channel)


def prepare_graph(path: Path) -> dict[str, int]:
    """Inline Identity-fed weights and turn Gemm on weights into MatMul, in the file at ``path``."""
    model = onnx.load(str(path))
    done = {"identity_inlined": inline_identity_weights(model), "gemm_rewritten": gemm_to_matmul(model)}
    if any(done.values()):
        onnx.save(model, str(path))
    return done


def quantize_int4(path: Path, config: QuantizeConfig, plan=None, tokenizer=None) -> dict[str, Any]:
    """Weight-only int4 of the projections (onnxruntime's ``MatMulNBitsQuantizer``: blocks of
    ``config.block_size`` along the input dimension, symmetric for ``rtn``, with zero points otherwise, ``MatMulNBits`` nodes that compute at
    ``config.accuracy_level``; HQQ's float zero points carried as block-sum offsets beside
    symmetric blocks, `zero_points.fold_float_zero_points`, so that the fast kernel runs them); the embedding tables and the output head in
    ``config.embedding_bits`` blocks (`tables`: a tied head and its table stored once), and
    dynamic int8 of projections narrower than a block (LoRA factors) and of any table or head
    the blocks cannot take (an onnxruntime without uint8 GatherBlockQuantized, a hidden size
    that is not whole blocks). A weight that layers share is one initializer, quantized once for all its MatMuls. With a `gptq.Int4Plan`, the projections it
    keeps in int8 join the int8 ones, and its GPTQ blocks replace the ones onnxruntime fitted for
    the same weights.

    Raises:
        ExportError: a graph the quantizer cannot take (one line, the export writes nothing).
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # onnxruntime's int4 quantizer needs onnx-ir
        raise ExportError(f"--quantize int4 needs onnxruntime's MatMulNBits quantizer: {first_line(e)} "
                          "(pip install onnx-ir)") from None
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    table_bits = config.embedding_bits or 8
    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    # the embedding tables and the output head (whose logits int4 moves most) as blocks, a tied
    # pair stored once (`tables`; a MatMul on a table's transpose is a tied head wherever it is)
    heads = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.output and n.output[0] in outputs}
    tables_done = _tables(model, config, table_bits, heads=heads, tokenizer=tokenizer)
    inits = {t.name: t for t in model.graph.initializer}
    # int8 instead of int4: a projection narrower than one block (a LoRA factor's rank side),
    # which would be mostly padding, and an output head the blocks above did not take
    on_weights = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                  and len(inits[n.input[1]].dims) == 2]
    narrow = [n.name for n in on_weights if inits[n.input[1]].dims[0] < config.block_size or n.output[0] in outputs]
    keys, replaced = {}, None
    if plan is not None:
        from .gptq import weight_key

        keys = {n.input[1]: weight_key(numpy_helper.to_array(inits[n.input[1]])) for n in on_weights
                if n.name not in narrow}
    # the projections the plan keeps at 8 bits: weight-only blocks as for int4 (MatMulNBits,
    # bits 8), not dynamic int8, whose per-tensor activation scale costs a decoder far more
    # (optimum's dynamic int8 of SmolLM2 doubles its perplexity)
    eight = [n.name for n in on_weights if plan is not None and keys.get(n.input[1]) in plan.int8]
    tables = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2]
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size,
                                         # a trained grid's blocks have zero points (`gptq.trained_blocks`)
                                         is_symmetric=config.int4_method == "rtn" and not (plan and plan.fitted),
                                         accuracy_level=config.accuracy_level,
                                         nodes_to_exclude=narrow + eight, algo_config=_int4_algorithm(config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer.process()
            if eight:
                quantizer = MatMulNBitsQuantizer(quantizer.model.model, bits=8, block_size=config.block_size,
                                                 is_symmetric=True, accuracy_level=config.accuracy_level,
                                                 nodes_to_include=eight, nodes_to_exclude=narrow)
                quantizer.process()
        _set_accuracy_level(quantizer.model.model, config.accuracy_level)
        offsets = fold_float_zero_points(quantizer.model.model)  # HQQ's float zero points, on the fast kernel
        if plan is not None and plan.fitted:
            replaced = _use_fitted_blocks(quantizer.model.model, keys, plan.fitted, config.block_size)
        onnx.save(quantizer.model.model, str(path))
        if narrow + tables:  # (an empty nodes_to_quantize means every MatMul, the zero-point offsets too)
            logging.disable(logging.WARNING)  # onnxruntime's advice to pre-process, on the root logger
            try:
                quantize_dynamic(str(path), str(path), op_types_to_quantize=["Gather", "MatMul"],
                                 nodes_to_quantize=narrow + tables, weight_type=QuantType.QInt8, per_channel=False,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            finally:
                logging.disable(logging.NOTSET)
    except Exception as e:  # noqa: BLE001  (whatever the quantizer meets in the graph)
        raise ExportError(f"onnxruntime's int4 quantizer cannot quantize this graph: {first_line(e, with_type=True)}") from None
    graph = onnx.load(str(path), load_external_data=False)
    bits = Counter(attribute(n, "bits", 4) for n in graph.graph.node if n.op_type == "MatMulNBits")
    for name, count in tables_done.get("operators", {}).items():  # the heads', counted apart
        if name == "MatMulNBits":
            bits[table_bits] -= count
    if bits[8] != len(eight):
        raise ExportError(f"onnxruntime's 8-bit MatMulNBits quantizer took {bits[8]} of the {len(eight)} projections "
                          f"--int8-share keeps")
    done = {"int4_matmuls": bits[4], "int8_matmuls": len(narrow), "int8_block_matmuls": bits[8],
            "block_size": config.block_size, "accuracy_level": config.accuracy_level, "method": config.int4_method,
            "embeddings": f"{table_bits}-bit blocks" if tables_done.get("tables") else "int8 (dynamic Gather)"}
    if offsets:
        done["zero_point_offsets"] = offsets
    if tables_done:
        done["tables"] = tables_done
    if replaced is not None:
        done["gptq_weights"] = replaced
    return done


def _tables(model, config: QuantizeConfig, bits: int, heads: set[str] | None = None, tokenizer=None) -> dict[str, Any]:
    """`tables.block_quantize_tables` on ``model`` with ``config``'s blocks; ``{}`` where this
    onnxruntime cannot read such tables or none fits, unless ``--embedding-bits`` asked for them.
    With ``--embedding-hot-share``, ``tokenizer`` counts the calibration text's tokens.

    Raises:
        ExportError: ``--embedding-bits`` given and no table could take it, or hot rows asked
            for and no table could keep them; or the rewrite failed.
    """
    asked = config.embedding_bits is not None
    if not supported_tables():
        if asked:
            import onnxruntime

            raise ExportError("--embedding-bits needs an onnxruntime whose GatherBlockQuantized reads uint8 blocks "
                              f"with a bits attribute; this one ({onnxruntime.__version__}) does not")
        return {}
    counts = None
    if config.embedding_hot_share:
        if tokenizer is None:
            raise ExportError("--embedding-hot-share needs the model's tokenizer to count the calibration text's tokens")
        counts = token_counts(tokenizer, calibration_texts(config.calibration, text_column=config.text_column,
                                                           encoding=config.encoding), config.max_length)
    try:
        done = block_quantize_tables(model, bits=bits, block_size=config.block_size,
                                     accuracy_level=config.accuracy_level, heads=heads, row_counts=counts,
                                     hot_share=config.embedding_hot_share)
    except Exception as e:  # noqa: BLE001  (whatever the graph holds that the rewrite did not expect)
        raise ExportError(f"storing the embedding tables as {bits}-bit blocks failed: {first_line(e, with_type=True)}") from None
    if asked and not done.get("tables"):
        raise ExportError(f"--embedding-bits {bits}: no embedding table of this graph is a float matrix whose width "
                          f"is whole --block-size {config.block_size} blocks and that only lookups read")
    if config.embedding_hot_share and "hot_rows" not in done:
        if counts is not None and round(config.embedding_hot_share * len(counts)) < 1:
            raise ExportError(f"--embedding-hot-share {config.embedding_hot_share:g} keeps no row of a "
                              f"{len(counts):,}-token table; give a larger share")
        raise ExportError("--embedding-hot-share: no token table here that only lookups of the input ids read "
                          "(a table an output head reads too keeps one precision)")
    if counts is not None:
        done["hot_rows_counted_on"] = config.calibration or "packaged calibration text"
    return done


def token_counts(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """How often ``texts`` use each token id, special tokens included, each text cut to
    ``max_length`` tokens as the model reads it."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for start in range(0, len(texts), 1000):  # a thousand texts a call, not a whole data set's ids at once
        ids = tokenizer(texts[start:start + 1000], truncation=True, max_length=max_length)["input_ids"]
        counts += np.bincount(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64), minlength=len(counts))
    return counts


def _use_fitted_blocks(model, keys: dict[str, str], fitted: dict, block_size: int) -> dict[str, int]:
    """GPTQ's blocks in place of onnxruntime's on each MatMulNBits whose weight GPTQ fitted
    (onnxruntime names a weight's blocks ``<weight>_Q4``); how many weights were and were not."""
    from .gptq import pack_matmul_nbits

    inits = {t.name: t for t in model.graph.initializer}
    done, missing = set(), set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[1].endswith("_Q4"):
            continue
        weight = node.input[1].removesuffix("_Q4")
        blocks = fitted.get(keys.get(weight))
        if blocks is None:
            missing.add(weight)
            continue
        if weight in done:
            continue
        for name, array in zip(node.input[1:4], pack_matmul_nbits(*blocks, block_size)):
            if tuple(inits[name].dims) != array.shape:
                raise ExportError(f"GPTQ's blocks for {weight} have shape {array.shape}, onnxruntime's "
                                  f"{tuple(inits[name].dims)}")
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        done.add(weight)
    return {"fitted": len(done), "left_to_rtn": len(missing)}


def _set_accuracy_level(model, level: int) -> None:
    """``accuracy_level`` on every MatMulNBits node that lacks it (onnxruntime's HQQ writes none,
    whatever it is asked), so that the option means the same for every method."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def _int4_algorithm(config: QuantizeConfig):
    """onnxruntime's algorithm config for ``config.int4_method`` (``None``: its default, RTN)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if config.int4_method == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    return None


def quantize_onnx(folder: str | Path, config: QuantizeConfig, *, tokenizer=None, input_names=(),
                  dynamic_scopes: tuple[str, ...] = (), plan=None) -> dict[str, Any]:
    """Replace ``folder/model.onnx`` by its quantized version; returns what was done.

    Args:
        folder: An export folder (model.onnx, config.json, tokenizer files).
        config: The quantization options.
        tokenizer: Tokenizes calibration text (``int8-static``; ``embedding_hot_share`` counts its tokens).
        input_names: The model's input names (``int8-static`` only).
        dynamic_scopes: Qualified module names (``encoder.layer.0.output.dense``) of the FFN
            down-projections, whose inputs have outliers: ``int8-static`` gives their MatMuls
            dynamic activation ranges instead of static ones, ``per_token="ffn-down"`` ranges
            per token.
        plan: ``int4`` only: what calibration decided (`gptq.plan_int4`): GPTQ's blocks, the
            projections kept in int8.
    """
    folder = Path(folder)
    path = folder / MODEL_FILE
    done: dict[str, Any] = {"mode": config.mode, **prepare_graph(path)}
    if config.mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))
        return done
    if config.mode == "int4":
        done.update(quantize_int4(path, config, plan, tokenizer))
        return done
    was_fused = fused(path)  # before the tables' blocks, which are com.microsoft nodes too
    if config.embedding_bits is not None:  # the tables as blocks, before int8 of the rest
        model = onnx.load(str(path))
        tables = _tables(model, config, config.embedding_bits, tokenizer=tokenizer)
        if tables:
            onnx.save(model, str(path))
            done["tables"] = tables
        del model
    preset = optimum_preset(config.isa, is_static=config.mode == "int8-static", per_channel=config.per_channel)
    done.update(preset=f"AutoQuantizationConfig.{host_isa() if config.isa == 'auto' else config.isa}"
                       f"(is_static={preset.is_static}, per_channel={preset.per_channel})",
                format=preset.format.name, weights=preset.weights_dtype.name, activations=preset.activations_dtype.name)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        if config.mode == "int8" and (was_fused or "tables" in done):
            # optimum's ORTQuantizer cannot type a graph with com.microsoft nodes in it
            done.update(_quantize_fused(path, Path(tmp), preset, "fused graph" if was_fused else "graph with block tables"))
        elif config.mode == "int8":
            from optimum.onnxruntime import ORTQuantizer

            quantizer = ORTQuantizer.from_pretrained(folder, file_name=MODEL_FILE)
            quantizer.quantize(preset, save_dir=tmp)
            shutil.move(Path(tmp) / "model_quantized.onnx", path)
            shutil.move(Path(tmp) / "ort_config.json", folder / "ort_config.json")
        else:
            done.update(_quantize_static(path, Path(tmp), preset, config, tokenizer, input_names, dynamic_scopes))
    if config.per_token:
        from .per_token import per_token_inputs

        model = onnx.load(str(path))
        done["per_token_inputs"] = per_token_inputs(model, dynamic_scopes if config.per_token == "ffn-down" else None)
        done["per_token"] = config.per_token
        onnx.save(model, str(path))
    return done


def fused(path: Path) -> bool:
    """Whether the graph at ``path`` holds onnxruntime's fused (``com.microsoft``) operators."""
    return any(n.domain == "com.microsoft" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _quantize_fused(path: Path, tmp: Path, preset, what: str = "fused graph") -> dict[str, Any]:
    """Dynamic int8 of a graph onnxruntime's optimizer fused (or one holding other com.microsoft
    nodes, such as `tables`' lookups), with the preset's settings.

    optimum's ``ORTQuantizer`` fails on such graphs in its shape inference; onnxruntime's own
    ``quantize_dynamic`` quantizes them (fused ``Attention`` becomes ``QAttention``) once told the
    type of tensors its inference cannot type.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / "model_quantized.onnx"
    quantize_dynamic(str(path), str(out), per_channel=preset.per_channel, reduce_range=preset.reduce_range,
                     weight_type=QuantType.QInt8 if preset.weights_dtype.name == "QInt8" else QuantType.QUInt8,
                     op_types_to_quantize=list(preset.operators_to_quantize),
                     extra_options={"WeightSymmetric": preset.weights_symmetric,
                                    "DefaultTensorType": onnx.TensorProto.FLOAT})
    shutil.move(out, path)
    return {"quantizer": f"onnxruntime.quantization.quantize_dynamic (on the {what})"}


def _quantize_static(path: Path, tmp: Path, preset, config: QuantizeConfig, tokenizer, input_names,
                     dynamic_scopes: tuple[str, ...]) -> dict[str, int]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quantize_dynamic, quantize_static
    from optimum.onnxruntime.configuration import ORTConfig

    texts = calibration_texts(config.calibration, text_column=config.text_column, encoding=config.encoding,
                              limit=config.calibration_samples)
    inputs = graph_inputs(onnx.load(str(path), load_external_data=False))  # a KV cache needs its shapes
    feeds = [model_inputs(tokenizer, [t], config.max_length, inputs) for t in texts]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    dynamic = scoped_matmuls(onnx.load(str(path), load_external_data=False), dynamic_scopes)
    static = tmp / "model_static.onnx"
    quantize_static(
        str(path), str(static), Reader(), quant_format=preset.format,
        # projections and embeddings: quantizing LayerNorm, Softmax inputs and the like with
        # static ranges costs far more accuracy than it buys speed on transformers
        op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=dynamic,
        per_channel=config.per_channel, reduce_range=preset.reduce_range,
        activation_type=preset.activations_dtype, weight_type=preset.weights_dtype,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": preset.weights_symmetric, "ActivationSymmetric": preset.activations_symmetric,
                       "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    quantized = static
    if dynamic:  # the FFN down-projections, left out above
        quantized = tmp / "model_quantized.onnx"
        quantize_dynamic(str(static), str(quantized), op_types_to_quantize=["MatMul"], nodes_to_quantize=dynamic,
                         per_channel=config.per_channel, reduce_range=preset.reduce_range,
                         weight_type=preset.weights_dtype, extra_options={"WeightSymmetric": preset.weights_symmetric})
    shutil.move(quantized, path)
    ORTConfig(quantization=preset).save_pretrained(path.parent)
    return {"calibration_samples": len(feeds), "dynamic_matmuls": len(dynamic)}


def scoped_matmuls(model: onnx.ModelProto, scopes: tuple[str, ...]) -> list[str]:
    """Names of the MatMul nodes inside the modules ``scopes`` (qualified PyTorch names;
    `onnx_graph.in_scopes`)."""
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
