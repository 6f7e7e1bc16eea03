"""int8: dynamic (`Int8Dynamic`, weights int8, activations quantized on the fly) and static
(`Int8Static`, activation ranges calibrated on text).

int8 goes through the tools a user of this field already trusts: optimum's ``ORTQuantizer``
with its ``AutoQuantizationConfig`` preset for this CPU (dynamic), and onnxruntime's
``quantize_static`` with the same preset's settings and a calibration reader over real text
(static; optimum's own calibration needs the ``datasets`` package). What we add is the graph
preparation that keeps shared weights quantized and stored once (`compressor.onnx.graph`), the
embedding tables as blocks (`embeddings`) and per-token activation ranges (`onnx.per_token`).

Static ranges fail on one projection per layer: the FFN down-projection, whose input (the
output of GELU / SwiGLU) carries a few outlier features hundreds of times larger than the rest
(Bondarenko et al., 2021, "Understanding and Overcoming the Challenges of Efficient Transformer
Quantization"). One static int8 range over it either clips the outliers or rounds everything
else to zero. Those MatMuls, LoRA branches included, are quantized dynamically instead (int8
weights, a range per call); reports/bench_int8_static.md measures what that keeps.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import onnx

from ..config import check_choice, choice
from ..errors import CompressError, ConfigError, ExportError, first_line
from .config import BlockTables, CalibrationText, QuantMethod, register_method
from .presets import ISAS, host_isa, optimum_preset
from ..io import scratch
from .stage import QuantizeContext

#: Which int8 projection inputs ``per_token`` rounds with a range per token: every one that can
#: take it, or only the FFN down-projections' (the GELU / SwiGLU outputs, whose outlier tokens
#: cost int8 the most).
PER_TOKEN = ("all", "ffn-down")


@dataclass(kw_only=True)
class Int8Activations:
    """Options of int8 weights and dynamically quantized activations.

    Attributes:
        per_channel: One scale per output channel of a weight instead of one per tensor.
            Default: per tensor for ``int8`` (optimum's preset), per channel for ``int8-static``
            (its static ranges leave no room for a coarse weight scale as well).
        isa: The optimum preset (``AutoQuantizationConfig.<isa>``) whose settings to use;
            ``auto`` picks avx512_vnni, avx512, avx2 or arm64 from this CPU.
        per_token: Round the inputs of ``all`` projections, or of the ``ffn-down`` projections
            only, with a range per token (row) instead of one for the whole tensor: a few
            outlier tokens no longer set every token's step (``int8-static``: its dynamic FFN
            down-projections). ``QAttention``'s input and the products of two activations keep
            their one range. Unset: one range per tensor.
    """

    per_channel: bool | None = field(default=None, metadata={"flag": "--per-channel/--per-tensor"})
    isa: str = choice("auto", ISAS)
    per_token: str | None = choice(None, PER_TOKEN)

    def check_int8(self, default_per_channel: bool) -> None:
        check_choice("isa", self.isa, ISAS)
        if self.per_token is not None:
            check_choice("per_token", self.per_token, PER_TOKEN)
        if self.per_channel is None:
            self.per_channel = default_per_channel
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"per_channel must be true or false, got {self.per_channel!r}", option="per_channel")


@dataclass(kw_only=True)
class Int8Dynamic(Int8Activations, BlockTables, CalibrationText, QuantMethod):
    """Dynamic int8: int8 weights, each activation's range computed on the fly (optimum's preset)."""

    name: ClassVar[str] = "int8"
    summary: ClassVar[str] = "int8 weights, activation ranges computed on the fly"
    default_min_cosine: ClassVar[float] = 0.90
    optimize: ClassVar[dict[str, int]] = {"encoder": 2, "decoder": 2}
    every_projection: ClassVar[bool] = True
    #: Static ranges: measured on ``calibration`` text, which is then required.
    static: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self.check_tables()
        # static ranges leave no room for a coarse weight scale as well: per channel by default
        self.check_int8(default_per_channel=self.static)
        if self.static and not self.calibration:
            raise ConfigError(f"--quantize {self.name} needs --calibration DATA (text to measure activation ranges on)",
                              option="calibration")
        self.check_calibration(self.static or bool(self.embedding_hot_share), self.name)


@dataclass(kw_only=True)
class Int8Static(Int8Dynamic):
    """Static int8: activation ranges measured once on ``calibration`` text (required)."""

    name: ClassVar[str] = "int8-static"
    summary: ClassVar[str] = "activation ranges measured on --calibration text"
    optimize: ClassVar[dict[str, int]] = {"encoder": 0, "decoder": 0}
    static: ClassVar[bool] = True


def fused(model: onnx.ModelProto) -> bool:
    """Whether the graph holds onnxruntime's fused (``com.microsoft``) operators."""
    return any(n.domain == "com.microsoft" for n in model.graph.node)


@register_method(Int8Static)
@register_method(Int8Dynamic)
def quantize_int8(model: onnx.ModelProto, config: Int8Dynamic, context: QuantizeContext) -> tuple[onnx.ModelProto, dict]:
    """int8 of every projection (and the tables, as blocks where ``embedding_bits`` says), with
    the preset's settings; per-token ranges after, where ``per_token`` says."""
    import onnx

    from .embeddings import quantize_tables

    static = config.static
    done: dict[str, Any] = {}
    was_fused = fused(model)  # before the tables' blocks, which are com.microsoft nodes too
    if config.embedding_bits is not None:  # the tables as blocks, before int8 of the rest
        tables = quantize_tables(model, config, config.embedding_bits, tokenizer=context.tokenizer)
        if tables:
            done["tables"] = tables
    preset = optimum_preset(config.isa, is_static=static, per_channel=config.per_channel)
    done.update(preset=f"AutoQuantizationConfig.{host_isa() if config.isa == 'auto' else config.isa}"
                       f"(is_static={preset.is_static}, per_channel={preset.per_channel})",
                format=preset.format.name, weights=preset.weights_dtype.name, activations=preset.activations_dtype.name)
    with scratch(context.folder) as tmp:
        path = tmp / "model.onnx"
        onnx.save(model, str(path))
        try:
            if static:
                done.update(_quantize_static(path, tmp, preset, config, context))
            elif was_fused or "tables" in done:
                # optimum's ORTQuantizer cannot type a graph with com.microsoft nodes in it
                done.update(_quantize_fused(path, tmp, preset, "fused graph" if was_fused else "graph with block tables"))
            else:
                _quantize_optimum(path, tmp, preset, context.folder)
        except CompressError:
            raise
        except Exception as e:  # noqa: BLE001  (whatever onnxruntime's quantizer meets in the graph)
            raise ExportError(f"onnxruntime's {config.name} quantizer cannot quantize this graph: "
                              f"{first_line(e, with_type=True)}") from None
        model = onnx.load(str(path))
    if config.per_token:
        from ..onnx.per_token import per_token_inputs

        model, done["per_token_inputs"] = per_token_inputs(
            model, context.dynamic_scopes if config.per_token == "ffn-down" else None)
        done["per_token"] = config.per_token
    return model, done


def _quantize_optimum(path: Path, tmp: Path, preset, folder: Path) -> None:
    """optimum's ``ORTQuantizer`` on the model at ``path`` (in ``tmp``, beside a copy of the
    export's config.json, which it reads); its ``ort_config.json`` goes into ``folder``."""
    from optimum.onnxruntime import ORTQuantizer

    shutil.copy(folder / "config.json", tmp / "config.json")
    quantizer = ORTQuantizer.from_pretrained(tmp, file_name=path.name)
    out = tmp / "quantized"
    quantizer.quantize(preset, save_dir=out)
    shutil.move(out / "model_quantized.onnx", path)
    shutil.move(out / "ort_config.json", folder / "ort_config.json")


def _quantize_fused(path: Path, tmp: Path, preset, what: str = "fused graph") -> dict[str, Any]:
    """Dynamic int8 of a graph onnxruntime's optimizer fused (or one holding other com.microsoft
    nodes, such as the tables' lookups), with the preset's settings.

    optimum's ``ORTQuantizer`` fails on such graphs in its shape inference; onnxruntime's own
    ``quantize_dynamic`` quantizes them (fused ``Attention`` becomes ``QAttention``) once told the
    type of tensors its inference cannot type.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / "model_quantized.onnx"
    quantize_dynamic(str(path), str(out), per_channel=preset.per_channel, reduce_range=preset.reduce_range,
                     weight_type=QuantType.QInt8 if preset.weights_dtype.name == "QInt8" else QuantType.QUInt8,
                     op_types_to_quantize=list(preset.operators_to_quantize),
                     extra_options={"WeightSymmetric": preset.weights_symmetric,
                                    "DefaultTensorType": onnx.TensorProto.FLOAT})
    shutil.move(out, path)
    return {"quantizer": f"onnxruntime.quantization.quantize_dynamic (on the {what})"}


def _quantize_static(path: Path, tmp: Path, preset, config: Int8Static, context: QuantizeContext) -> dict[str, int]:
    """onnxruntime's ``quantize_static`` over ``config.calibration`` text, the FFN
    down-projections (``context.dynamic_scopes``) left to dynamic ranges."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quantize_dynamic, quantize_static
    from optimum.onnxruntime.configuration import ORTConfig

    from ..data import calibration_texts
    from ..onnx.graph import graph_inputs, model_inputs, scoped_matmuls

    texts = calibration_texts(config.calibration, text_column=config.text_column, encoding=config.encoding,
                              limit=config.calibration_samples)
    graph = onnx.load(str(path), load_external_data=False)
    inputs = graph_inputs(graph)  # a KV cache needs its shapes
    feeds = [model_inputs(context.tokenizer, [t], config.max_length, inputs) for t in texts]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    dynamic = scoped_matmuls(graph, context.dynamic_scopes)
    del graph
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
    ORTConfig(quantization=preset).save_pretrained(context.folder)
    return {"calibration_samples": len(feeds), "dynamic_matmuls": len(dynamic)}
