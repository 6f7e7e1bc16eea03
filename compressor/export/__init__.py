"""ONNX export in the layout optimum loads, checked against PyTorch, with shared weights kept once."""

from .config import ExportConfig

__all__ = ["ExportConfig", "export"]


def __getattr__(name):  # torch, onnx and optimum load on first use
    if name == "export":
        from .stage import export

        return export
    raise AttributeError(name)
