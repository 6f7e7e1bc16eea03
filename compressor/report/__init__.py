"""The size / speed / accuracy report: the original, optimum's plain ONNX routes and each
compressed variant, measured side by side in one process."""

from .config import ReportConfig

__all__ = ["ReportConfig", "report"]


def __getattr__(name):  # torch and onnxruntime load on first use
    if name == "report":
        from .stage import report

        return report
    raise AttributeError(name)
