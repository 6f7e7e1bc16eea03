"""int4: weight-only blocks of the projections (onnxruntime's ``MatMulNBits``), the embedding
tables and the output head as blocks too.

The blocks are fitted by round-to-nearest (``rtn``, symmetric; ``rtn-asym`` with zero points),
HQQ (Badri & Shaji, 2023: scales and zero points optimized against the weights' own error, no
data; its zero points are floats, which onnxruntime's CPU MatMulNBits runs off its int8 fast
path, so they are carried as a block-sum offset beside symmetric blocks instead:
`onnx.zero_points`) or GPTQ (Frantar et al., 2022: each projection's blocks fitted to its inputs
on calibration text, with integer zero points: the fast kernel; `grids.gptq`). A model trained
on its blocks (``finetune --quantize-aware``) has them stored as they are. (onnxruntime's
k-quant prints to stdout and fails on the exported graphs in 1.32.)
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import onnx

from ..config import check_choice, check_share, choice
from ..errors import ConfigError, ExportError, first_line
from .config import ACCURACY_LEVELS, BlockTables, CalibrationText, QuantMethod, register_method
from .stage import QuantizeContext

#: How int4 blocks are fitted (see the module's docstring).
INT4_METHODS = ("rtn", "rtn-asym", "hqq", "gptq")


@dataclass(kw_only=True)
class Int4(BlockTables, CalibrationText, QuantMethod):
    """Weight-only int4: the projections in blocks of ``block_size`` 4-bit numbers with one scale
    each (onnxruntime's MatMulNBits); the embeddings and the output head in ``embedding_bits``
    blocks (8 when not given).

    Attributes:
        int4_method: How the blocks are fitted: ``rtn``, ``rtn-asym``, ``hqq`` or ``gptq``.
        accuracy_level: The type onnxruntime's MatMulNBits computes block products in (4: int8,
            the fastest on CPUs; 1: fp32).
        int8_share: Keep this share of the projections' parameters in 8-bit blocks: those whose
            int4 loses most of their output on the calibration text (0: none).
    """

    name: ClassVar[str] = "int4"
    summary: ClassVar[str] = "weight-only 4-bit blocks"
    default_min_cosine: ClassVar[float] = 0.80
    # a decoder's fused attention (GroupQueryAttention) takes the projections' outputs, so the
    # fused graph's projections are all there; an encoder's fused Attention holds them
    optimize: ClassVar[dict[str, int]] = {"encoder": 0, "decoder": 2}

    int4_method: str = choice("rtn", INT4_METHODS)
    accuracy_level: int = choice(4, ACCURACY_LEVELS)
    int8_share: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.check_tables()
        check_choice("int4_method", self.int4_method, INT4_METHODS)
        check_choice("accuracy_level", self.accuracy_level, ACCURACY_LEVELS)
        check_share("int8_share", self.int8_share)
        self.check_calibration(self.calibrated or bool(self.embedding_hot_share), f"{self.name} {self.int4_method}")

    @property
    def calibrated(self) -> bool:
        """Whether int4 runs the PyTorch model on calibration text first: GPTQ fits its blocks to
        it, ``int8_share`` ranks the projections on it."""
        return self.int4_method == "gptq" or bool(self.int8_share)


def int4_plan(loaded, model, quantize: Int4):
    """What int4 needs decided in PyTorch (`grids.gptq.Int4Plan`; ``None``: nothing, round-to-nearest
    in onnxruntime's quantizer), the output head left out (its blocks are
    ``quantize.embedding_bits``, `embeddings`):

    * a model whose projections lie on their int4 grids already (a ``--quantize-aware``
      fine-tune's checkpoint; `grids.gptq.trained_blocks`): those blocks, stored as they are (``rtn``,
      ``rtn-asym`` and ``gptq``, which would find no error to move; ``hqq``, which would fit them
      again, and another ``block_size`` than the model's are refused), never taken into
      ``int8_share``, the few off their grid rounded with zero points;
    * GPTQ's blocks and the projections ``int8_share`` keeps (`grids.gptq.plan_int4`), on
      ``quantize.calibration`` (the packaged calibration text by default), one text per forward
      pass (no padding to leave out).
    """
    from ..data import calibration_texts
    from ..grids.gptq import Int4Plan, plan_int4, trained_block_size, trained_blocks
    from ..models.heads import output_heads

    skip = output_heads(model)  # of the copy traced
    trained = trained_blocks(model, quantize.block_size, skip)
    grid = None
    if trained is None:  # trained for other blocks? rounding them again would undo the training
        size = trained_block_size(model, skip)
        if size is not None and size != quantize.block_size:
            raise ConfigError(f"{loaded.name} was trained for int4 blocks of {size} (finetune --quantize-aware); "
                              f"export it with --block-size {size}")
    else:
        if quantize.int4_method == "hqq":
            raise ConfigError(f"{loaded.name} was trained on its int4 blocks (finetune --quantize-aware), which "
                              "--int4-method hqq would fit again; export with rtn (the default)")
        trained, off = trained
        grid = {"weights": len(trained), "off_grid": off, "block_size": quantize.block_size}
    gptq_blocks = quantize.int4_method == "gptq" and trained is None
    if not (gptq_blocks or quantize.int8_share):
        return None if trained is None else Int4Plan(fitted=trained, info={"trained_grid": grid})
    texts = calibration_texts(quantize.calibration, text_column=quantize.text_column, encoding=quantize.encoding,
                              limit=quantize.calibration_samples)
    batches = []
    for text in texts:
        enc = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=quantize.max_length)
        batches.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    plan = plan_int4(model, batches, quantize.block_size, gptq_blocks=gptq_blocks,
                     int8_share=quantize.int8_share, skip=skip, trained=trained or ())
    plan.info.update(calibration=quantize.calibration or "packaged calibration text", texts=len(texts))
    if trained is not None:
        plan.fitted.update(trained)
        plan.info["trained_grid"] = grid
    return plan


#: Without ``--embedding-bits``, an int4 graph with no output head stores its tables as 4-bit
#: blocks when they hold at least this share of its float weights: an encoder's vocabulary matrix
#: (half of MiniLM's numbers, more once its layers are shared) is then most of what int4 leaves of
#: the file. A graph with a head (a decoder's logits, which 4 bits move most, often through a
#: tied table) keeps 8-bit blocks.
TABLE_SHARE_FOR_4_BITS = 0.25


def default_table_bits(model: onnx.ModelProto, heads: set[str]) -> tuple[int, float]:
    """The tables' bits when ``--embedding-bits`` is not given, and the tables' share of the
    graph's float weights it was chosen on (`TABLE_SHARE_FOR_4_BITS`)."""
    import numpy as np
    import onnx

    floats = {t.name: tuple(t.dims) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    sizes = {name: int(np.prod(dims)) for name, dims in floats.items()}
    tables = {n.input[0] for n in model.graph.node
              if n.op_type == "Gather" and n.input and len(floats.get(n.input[0], ())) == 2}
    total = sum(sizes.values())
    share = sum(sizes[t] for t in tables) / total if total else 0.0
    return (4 if not heads and share >= TABLE_SHARE_FOR_4_BITS else 8), share


@register_method(Int4, calibrate=int4_plan)
def quantize_int4(model: onnx.ModelProto, config: Int4, context: QuantizeContext) -> tuple[onnx.ModelProto, dict]:
    """Weight-only int4 of the projections (onnxruntime's ``MatMulNBitsQuantizer``: blocks of
    ``config.block_size`` along the input dimension, ``MatMulNBits`` nodes that compute at
    ``config.accuracy_level``); the embedding tables and the output head in
    ``config.embedding_bits`` blocks (`embeddings`: a tied head and its table stored once); and
    dynamic int8 of projections narrower than a block (LoRA factors) and of any table or head the
    blocks cannot take. A weight that layers share is one initializer, quantized once for all its
    MatMuls. With a plan (``context.plan``, `grids.gptq.Int4Plan`), the projections it keeps in
    int8 get 8-bit blocks, and its GPTQ (or trained) blocks replace the ones onnxruntime fitted.

    Raises:
        ExportError: a graph the quantizer cannot take (one line, the export writes nothing).
    """
    from .embeddings import quantize_tables

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
    except ImportError as e:  # onnxruntime's int4 quantizer needs onnx-ir
        raise ExportError(f"--quantize int4 needs onnxruntime's MatMulNBits quantizer: {first_line(e)} "
                          "(pip install onnx-ir)") from None
    plan = context.plan
    outputs = {o.name for o in model.graph.output}
    # the embedding tables and the output head (whose logits int4 moves most) as blocks, a tied
    # pair stored once (a MatMul on a table's transpose is a tied head wherever it is)
    heads = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.output and n.output[0] in outputs}
    table_bits, table_share = config.embedding_bits, None
    if table_bits is None:
        table_bits, table_share = default_table_bits(model, heads)
    tables_done = quantize_tables(model, config, table_bits, heads=heads, tokenizer=context.tokenizer,
                                  accuracy_level=config.accuracy_level)
    narrow, eight, tables, keys = _int4_nodes(model, config, plan, outputs)
    try:
        model, offsets, replaced = _matmul_nbits(model, config, plan, narrow, eight, keys)
        if narrow + tables:  # (an empty nodes_to_quantize would mean every MatMul, the zero-point offsets too)
            model = _dynamic_int8(model, narrow + tables, context)
    except Exception as e:  # noqa: BLE001  (whatever the quantizer meets in the graph)
        raise ExportError(f"onnxruntime's int4 quantizer cannot quantize this graph: {first_line(e, with_type=True)}") from None
    bits = Counter(_bits(n) for n in model.graph.node if n.op_type == "MatMulNBits")
    for name, count in tables_done.get("operators", {}).items():  # the heads', counted apart
        if name == "MatMulNBits":
            bits[table_bits] -= count
    if bits[8] != len(eight):
        raise ExportError(f"onnxruntime's 8-bit MatMulNBits quantizer took {bits[8]} of the {len(eight)} projections "
                          f"--int8-share keeps")
    done = {"int4_matmuls": bits[4], "int8_matmuls": len(narrow), "int8_block_matmuls": bits[8],
            "block_size": config.block_size, "accuracy_level": config.accuracy_level, "method": config.int4_method,
            "embeddings": f"{table_bits}-bit blocks" if tables_done.get("tables") else "int8 (dynamic Gather)"}
    if table_share is not None:  # the default, and why
        done["table_bits_default"] = {"bits": table_bits, "tables_share_of_weights": round(table_share, 3)}
    if offsets:
        done["zero_point_offsets"] = offsets
    if tables_done:
        done["tables"] = tables_done
    if replaced is not None:
        done["gptq_weights"] = replaced
    return model, done


def _bits(node) -> int:
    from ..onnx.graph import attribute

    return attribute(node, "bits", 4)


def _int4_nodes(model, config: Int4, plan, outputs: set[str]):
    """Which MatMuls go where: ``(narrow: dynamic int8, eight: 8-bit blocks, tables: the Gathers
    left to dynamic int8, keys: weight name -> content key for the plan's blocks)``."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    # int8 instead of int4: a projection narrower than one block (a LoRA factor's rank side),
    # which would be mostly padding, and an output head the table blocks did not take
    on_weights = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                  and len(inits[n.input[1]].dims) == 2]
    narrow = [n.name for n in on_weights if inits[n.input[1]].dims[0] < config.block_size or n.output[0] in outputs]
    keys = {}
    if plan is not None:
        from ..grids.gptq import weight_key

        keys = {n.input[1]: weight_key(numpy_helper.to_array(inits[n.input[1]])) for n in on_weights
                if n.name not in narrow}
    # the projections the plan keeps at 8 bits: weight-only blocks as for int4 (MatMulNBits,
    # bits 8), not dynamic int8, whose per-tensor activation scale costs a decoder far more
    # (optimum's dynamic int8 of SmolLM2 doubles its perplexity)
    eight = [n.name for n in on_weights if plan is not None and keys.get(n.input[1]) in plan.int8]
    tables = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2]
    return narrow, eight, tables, keys


def _matmul_nbits(model, config: Int4, plan, narrow: list[str], eight: list[str], keys: dict[str, str]):
    """onnxruntime's MatMulNBits quantizer at 4 bits (and 8 for ``eight``): ``(model, zero-point
    offsets folded, the plan's blocks used or None)``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from ..grids.gptq import pack_matmul_nbits
    from ..onnx.nbits import replace_blocks, set_accuracy_level
    from ..onnx.zero_points import fold_float_zero_points

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size,
                                     # a trained grid's blocks have zero points (`grids.gptq.trained_blocks`)
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
    model, _ = set_accuracy_level(quantizer.model.model, config.accuracy_level)
    model, offsets = fold_float_zero_points(model)  # HQQ's float zero points, on the fast kernel
    replaced = None
    if plan is not None and plan.fitted:
        # GPTQ's (or trained) blocks in place of onnxruntime's, found by the weight's content
        packed = {name: pack_matmul_nbits(*plan.fitted[key], config.block_size) for name, key in keys.items()
                  if key in plan.fitted}
        try:
            model, replaced = replace_blocks(model, packed)
        except ValueError as e:
            raise ExportError(f"GPTQ's {e}") from None
    return model, offsets, replaced


def _dynamic_int8(model, nodes: list[str], context: QuantizeContext):
    """Dynamic int8 (one scale per tensor) of ``nodes``: the projections too narrow for a block
    and the tables and heads the blocks did not take."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..io import scratch

    with scratch(context.folder) as tmp:
        path = tmp / "model.onnx"
        onnx.save(model, str(path))
        logging.disable(logging.WARNING)  # onnxruntime's advice to pre-process, on the root logger
        try:
            quantize_dynamic(str(path), str(path), op_types_to_quantize=["Gather", "MatMul"],
                             nodes_to_quantize=nodes, weight_type=QuantType.QInt8, per_channel=False,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(str(path))


def _int4_algorithm(config: Int4):
    """onnxruntime's algorithm config for ``config.int4_method`` (``None``: its default, RTN)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if config.int4_method == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    return None
