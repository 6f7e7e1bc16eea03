"""fp16: half-precision weights and compute, for GPU targets (onnxruntime's float16 converter,
float32 inputs and outputs kept)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import onnx

from .config import QuantMethod, register_method
from .stage import QuantizeContext


@dataclass(kw_only=True)
class Fp16(QuantMethod):
    """Half precision: every float weight and operation in float16; inputs and outputs float32."""

    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "half precision, for GPUs"
    default_min_cosine: ClassVar[float] = 0.999
    optimize: ClassVar[dict[str, int]] = {"encoder": 2, "decoder": 2}
    float_weights: ClassVar[bool] = True


@register_method(Fp16)
def quantize_fp16(model: onnx.ModelProto, config: Fp16, context: QuantizeContext) -> tuple[onnx.ModelProto, dict]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True), {}
