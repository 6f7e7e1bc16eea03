"""onnxruntime's transformer graph optimizations on an export, with shared weights kept shared.

``ORTOptimizer`` (optimum's wrapper of ``onnxruntime.transformers.optimizer``) at level 2 fuses
attention, LayerNorm (with the residual add: ``SkipLayerNormalization``) and GELU, which is what
makes optimum's O2 route 1.5x faster than its plain int8 export on MiniLM. The attention fusion
concatenates each layer's query, key and value weights into a new initializer per layer, so the
members of a shared group would each store a copy; `merge_identical_initializers` stores them
once again. A layer with its own LoRA delta keeps it: its attention does not match the fusion's
pattern and stays unfused (the record counts what was fused), the rest of the graph is fused.

optimum's optimizer takes no Llama-style decoder, so `optimize_decoder_graph` calls
onnxruntime's own (``onnxruntime.transformers.optimizer``) with its decoder fusions: RMSNorm
(``SimplifiedLayerNormalization``, with the residual add: ``SkipSimplifiedLayerNormalization``) and,
at level 2, rotary embeddings (``RotaryEmbedding``); GPT-2's LayerNorm and GELU. onnxruntime's own
decoder attention fusion is left off (it expects its own exporter's graphs and cache layout);
at level 2 each layer's attention becomes ``GroupQueryAttention`` by `attention.py`, which reads
and writes optimum's cache layout. The graph's inputs and outputs do not change, so optimum
still generates with it.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from ..errors import ExportError, first_line
from ..io import quiet, scratch
from .graph import merge_identical_initializers, stored_elements

#: The fused operators an optimized graph is described by.
FUSED_OPS = ("Attention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "EmbedLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
             "RotaryEmbedding", "GroupQueryAttention")


def optimize_graph(model: onnx.ModelProto, level: int, folder: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """An encoder's graph optimized at ``level`` (1 or 2) by optimum's ``ORTOptimizer``, and the
    copies the fusions made of shared weights merged. ``folder`` holds the export's config.json
    (which optimum reads); its optimizer's ``ort_config.json`` is written there.

    Returns:
        The optimized model and ``{"level", "fused": {op: count}, "copies_merged",
        "numbers_merged"}``: the copies are initializers with another's contents (the fused
        weights of shared layers, and the optimizer's own repeated shape constants), the numbers
        what merging them saved.

    Raises:
        ExportError: onnxruntime's optimizer cannot handle this model type.
    """
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    with scratch(folder) as tmp:  # optimum reads and writes files
        onnx.save(model, str(tmp / "model.onnx"))
        shutil.copy(folder / "config.json", tmp / "config.json")
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet("", "optimum", "onnxruntime"):
                warnings.simplefilter("ignore")
                optimizer = ORTOptimizer.from_pretrained(tmp, file_names=["model.onnx"])
                optimizer.optimize(OptimizationConfig(optimization_level=level), save_dir=tmp / "out")
        except Exception as e:  # noqa: BLE001 - optimum's refusal of a model type, onnxruntime's of a graph
            raise ExportError(f"onnxruntime's graph optimizer (level {level}) cannot optimize this model: "
                              f"{first_line(e)}") from None
        model = onnx.load(str(next((tmp / "out").glob("*_optimized.onnx"))))
        if (tmp / "out" / "ort_config.json").is_file():
            shutil.move(tmp / "out" / "ort_config.json", folder / "ort_config.json")
    before = stored_elements(model)
    model, merged = merge_identical_initializers(model)
    return model, _described(model, level, merged, before)


def optimize_decoder_graph(model: onnx.ModelProto, level: int, model_type: str, positions: int | None,
                           folder: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fuse a decoder's normalizations (and, at level 2, its rotary embeddings and attention)
    with onnxruntime's optimizer (which reads a file: it is written in a scratch folder inside
    ``folder``), and merge the copies of shared weights; what `optimize_graph` returns.

    The rotary fusion stores cos/sin tables for 131,072 positions (34 MB at head size 64); they
    are cut to the model's ``positions``, which is exact for every position the model takes.

    Raises:
        ExportError: onnxruntime's optimizer fails on the graph.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = "gpt2" if model_type == "gpt2" else "qwen3"  # onnxruntime's RMSNorm + rotary decoder fusions
    options = FusionOptions(kind)
    options.enable_attention = False  # expects onnxruntime's own exports; ours is `attention.py`
    options.enable_embed_layer_norm = False  # would change the graph's inputs
    options.enable_rotary_embeddings = level >= 2
    try:
        with scratch(folder) as tmp, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), quiet("", "onnxruntime"):
            warnings.simplefilter("ignore")
            path = tmp / "model.onnx"
            onnx.save(model, str(path))
            optimizer = optimize_model(str(path), model_type=kind, num_heads=0, hidden_size=0, opt_level=0,
                                       optimization_options=options)
    except Exception as e:  # noqa: BLE001 - onnxruntime's optimizer on a graph it does not know
        raise ExportError(f"onnxruntime's graph optimizer (level {level}) cannot optimize this decoder: "
                          f"{first_line(e)}") from None
    model = optimizer.model
    if any(n.domain == "com.microsoft" for n in model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        # the fusions' nodes need it declared, or shape inference (the quantizers') refuses the graph
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    if positions:
        _cut_rotary_tables(model, positions)
    if level >= 2:
        from .attention import fuse_group_query_attention

        model, _ = fuse_group_query_attention(model)
    before = stored_elements(model)
    model, merged = merge_identical_initializers(model)
    return model, _described(model, level, merged, before)


def _cut_rotary_tables(model, positions: int) -> None:
    """The rows past ``positions`` of the ``RotaryEmbedding`` nodes' cos and sin tables, dropped."""
    from onnx import numpy_helper

    tables = {name for n in model.graph.node if n.op_type == "RotaryEmbedding" for name in n.input[2:4]}
    for init in model.graph.initializer:
        if init.name in tables and init.dims and init.dims[0] > positions:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:positions].copy(), init.name))


def _described(model, level: int, merged: int, before: int) -> dict[str, Any]:
    counts = Counter(n.op_type for n in model.graph.node)
    return {"level": level, "fused": {op: counts[op] for op in FUSED_OPS if counts[op]}, "copies_merged": merged,
            "numbers_merged": before - stored_elements(model)}
