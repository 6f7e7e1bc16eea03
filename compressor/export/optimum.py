"""optimum's side of the export: its exporter traces the model (TorchScript, which stores a
weight that several layers share once), and its ``ORTModelFor*`` classes load the folder."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from ..errors import UnsupportedModelError
from ..io import quiet
from ..models.pooling import SentenceEmbedding
from .config import ORT_CLASSES


def export_onnx(model, task: str, opset: int, path: Path):
    """optimum's exporter on ``model`` itself (not a reloaded copy: shared modules stay shared)."""
    from optimum.exporters.onnx import export as onnx_export
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor("onnx", model, task=task, library_name="transformers")
    except (KeyError, ValueError):
        # optimum's message lists every architecture it knows (thousands of characters)
        raise UnsupportedModelError(f"optimum's ONNX exporter has no configuration for {model.config.model_type} "
                                    f"({task}); export is not possible for this family") from None
    if task.endswith("-with-past"):  # the decoder with its KV cache, in optimum's merged layout
        onnx_config = constructor(model.config, task=task.removesuffix("-with-past"), use_past=True,
                                  use_past_in_inputs=True)
    elif isinstance(model, SentenceEmbedding):
        onnx_config = _with_sentence_embedding(type(constructor(model.config, task=task)))(model.config, task=task)
    else:
        onnx_config = constructor(model.config, task=task)
    # the exporter's tracer warnings and optimum's progress lines say nothing a user can act on
    with warnings.catch_warnings(), quiet("optimum", "transformers"), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_export(model, onnx_config, path, opset=opset, device="cpu")
    return onnx_config


def _with_sentence_embedding(config_class):
    """optimum's ONNX config for the family, with ``sentence_embedding`` as a second output."""

    class SentenceEmbeddingConfig(config_class):
        @property
        def outputs(self):
            return {**super().outputs, "sentence_embedding": {0: "batch_size"}}

    return SentenceEmbeddingConfig


def load_ort(folder: str | Path, task: str, **kwargs):
    """The folder through the optimum class a user would load it with."""
    import optimum.onnxruntime as ort

    cls = getattr(ort, ORT_CLASSES[task])
    if task == "text-generation":
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("use_io_binding", False)
    elif task == "text-generation-with-past":
        kwargs.setdefault("use_io_binding", False)
    with warnings.catch_warnings(), quiet("optimum"):
        warnings.simplefilter("ignore")
        return cls.from_pretrained(folder, **kwargs)
