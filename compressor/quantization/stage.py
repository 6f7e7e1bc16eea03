"""The quantization stage: ``model, record = quantize(model, Int8Dynamic(...), context)`` on an
exported ONNX graph, dispatched to the method's handler through the registry (`config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

from .config import QuantMethod, calibrator_for, handler_for

MODEL_FILE = "model.onnx"


@dataclass
class QuantizeContext:
    """What a method's handler may need besides the graph.

    Attributes:
        folder: The export's folder being written (config.json and the tokenizer are in it;
            optimum's quantizer writes its ``ort_config.json`` there).
        tokenizer: Tokenizes calibration text.
        input_names: The graph's input names.
        dynamic_scopes: Qualified module names (``encoder.layer.0.output.dense``) of the FFN
            down-projections, whose inputs have outliers: ``int8-static`` gives their MatMuls
            dynamic ranges, ``per_token="ffn-down"`` ranges per token.
        plan: What the method's ``calibrate`` decided on the PyTorch model (int4: GPTQ's
            blocks, the projections kept in 8 bits).
    """

    folder: Path
    tokenizer: Any = None
    input_names: tuple[str, ...] = ()
    dynamic_scopes: tuple[str, ...] = ()
    plan: Any = None


def calibrate(config: QuantMethod, loaded, model) -> Any:
    """The method's work on the PyTorch model before it is traced (``None`` where it has none)."""
    calibrator = calibrator_for(config)
    return None if calibrator is None else calibrator(loaded, model, config)


def prepare(model: onnx.ModelProto) -> dict[str, int]:
    """Weights behind the exporter's Identity nodes inlined and Gemm on weights turned into
    MatMul, so that every projection on a shared weight is quantized, once (`onnx.graph`)."""
    from ..onnx.graph import gemm_to_matmul, inline_identity_weights

    return {"identity_inlined": inline_identity_weights(model)[1], "gemm_rewritten": gemm_to_matmul(model)[1]}


def quantize(model: onnx.ModelProto, config: QuantMethod, context: QuantizeContext) -> tuple[onnx.ModelProto, dict]:
    """Quantize ``model`` with the method ``config`` is the options of.

    Returns:
        The quantized model and what was done (``mode`` first, then the method's record).
    """
    done: dict[str, Any] = {"mode": config.name, **prepare(model)}
    model, record = handler_for(config)(model, config, context)
    done.update(record)
    return model, done


def quantize_onnx(folder: str | Path, config: QuantMethod, **context: Any) -> dict[str, Any]:
    """`quantize` on ``folder/model.onnx``, written back in place; returns what was done
    (``context``: the `QuantizeContext` fields other than the folder)."""
    import onnx

    folder = Path(folder)
    path = folder / MODEL_FILE
    model, done = quantize(onnx.load(str(path)), config, QuantizeContext(folder, **context))
    onnx.save(model, str(path))
    return done
