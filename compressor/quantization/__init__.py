"""Quantization of ONNX exports: int8 (dynamic or static) through onnxruntime, fp16 for GPUs.

Weights that layers share stay stored once: the exporter's Identity nodes are inlined first
(`compressor.onnx_graph`), so every MatMul on a shared weight is quantized.
"""

from .config import MODES, QuantizeConfig

__all__ = ["MODES", "QuantizeConfig", "quantize_onnx"]


def __getattr__(name):  # onnxruntime and optimum load on first use
    if name == "quantize_onnx":
        from .onnx import quantize_onnx

        return quantize_onnx
    raise AttributeError(name)
