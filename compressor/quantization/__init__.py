"""Quantization of ONNX exports, one method per config class: `Int8Dynamic` and `Int8Static`
(onnxruntime / optimum int8), `Int4` (weight-only MatMulNBits blocks), `Fp16` (for GPUs).

``export(model, ExportConfig(), out, quantize=Int4(block_size=16))``; a method is added with
`register_method` (see `config`). Weights that layers share stay stored once: the exporter's
Identity nodes are inlined first (`compressor.onnx.graph`), so every MatMul on a shared weight
is quantized.
"""

from .config import METHODS, QuantMethod, method_config, methods, register_method
# in this order: the order --quantize lists the methods in
from .int8 import Int8Dynamic, Int8Static  # noqa: I001
from .int4 import Int4
from .fp16 import Fp16

__all__ = ["METHODS", "Fp16", "Int4", "Int8Dynamic", "Int8Static", "QuantMethod", "method_config", "methods",
           "quantize", "quantize_onnx", "register_method"]


def __getattr__(name):  # onnx and onnxruntime load on first use
    if name in ("quantize", "quantize_onnx"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)
