"""The export stage: ``record = export(model, ExportConfig(...), output, quantize=Int8Dynamic())``.

The model is traced with optimum's exporter (`optimum`), its graph loaded once and rewritten in
memory by the passes of `compressor.onnx` (the tied head, onnxruntime's fusions) and the
quantization method's handler (`compressor.quantization`), then written once, in the folder
layout optimum's ``ORTModelFor*`` classes load (model.onnx, config.json, tokenizer files,
ort_config.json when quantized). Before the folder appears it is verified (`verify`): loaded back
with that very class and checked against PyTorch on real text at several lengths; an export that
disagrees fails and leaves nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from ..data import calibration_texts
from ..errors import CompressError, ConfigError, ExportError, ModelLoadError, UnsupportedModelError, first_line
from ..io import check_writable, quiet, staged_folder, write_text_atomic
from ..models import LoadedModel, unique_parameters
from ..models.heads import pick_task
from ..models.pooling import SentenceEmbedding
from ..onnx.graph import save_model
from ..quantization.config import QuantMethod, methods
from ..record import StageRecord
from .config import ORT_CLASSES, ExportConfig
from .optimum import export_onnx
from .verify import OptimumCacheError, check_export, check_storage, max_positions, ort_errors_quiet

MODEL_FILE = "model.onnx"


def export(loaded: LoadedModel, config: ExportConfig, output: str | Path, *, quantize: QuantMethod | None = None,
           overwrite: bool = False, release: bool = False) -> StageRecord:
    """Export ``loaded`` to the ONNX folder ``output``, quantized if ``quantize`` is given.

    An export hands no model on to a next PyTorch stage, so it returns only its record. With
    ``release`` the caller hands ``loaded`` over: a genai export drops its weights once PyTorch's
    side of the check is computed, before the runtime loads the graph (a decoder's bf16 weights
    and its int4 graph are then never in memory together); ``loaded`` no longer computes after.

    Returns:
        A record with the model's unique parameters and bytes before, the file's stored numbers
        and bytes after, and in ``metrics``: the task and the optimum class that loads the
        folder, the graph's projections (quantized or not), the check against PyTorch per
        length, and what the passes and quantization did.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is not set.
        ExportError: the export disagrees with PyTorch past the tolerance, stores a shared weight
            more than once, or leaves a projection unquantized.
    """
    start = time.perf_counter()
    output = check_writable(output, overwrite=overwrite, folder=True)
    if loaded.tokenizer is None:
        raise ModelLoadError(f"{loaded.name} ships no tokenizer; an export needs one to be checked and used")
    task = pick_task(loaded, config.task)
    if config.task == "auto" and task == "text-generation":
        task = "text-generation-with-past"  # what a user generating with optimum expects
    check_options(loaded.name, task, config, quantize)
    from .genai import choose_layout, export_genai

    layout, reason = choose_layout(loaded, task, config, quantize)
    # a quantized genai graph reads the weights a layer at a time, in float32 as it writes them:
    # a bf16 model stays bf16 (no float32 copy of the whole model beside it)
    model, ffn_down = traced_model(loaded, task, config, keep_dtype=layout == "genai" and quantize is not None)
    if layout == "genai":
        return export_genai(loaded, model, config, output, quantize, overwrite=overwrite, reason=reason, start=start,
                            release=release)
    params, nbytes = unique_parameters(model)
    texts = calibration_texts(config.check_data, text_column=config.text_column, encoding=config.encoding)
    plan = None
    if quantize is not None:
        from ..quantization.stage import calibrate

        plan = calibrate(quantize, loaded, model)
    job = _Job(loaded, model, task, config, quantize, texts, params, ffn_down, plan, reason)

    with staged_folder(output, overwrite=overwrite) as tmp:
        kv_cache = None
        try:
            written = _write(tmp, job)
        except OptimumCacheError as e:
            if config.task != "auto":
                raise ExportError(f"--task {task}: {e}") from None
            # optimum cannot run this family's cache: the export it can run, and the record says why
            job.task, kv_cache = "text-generation", {"exported": False, "reason": str(e)}
            for f in tmp.iterdir():
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            written = _write(tmp, job)
        file_bytes = sum(f.stat().st_size for f in (tmp / MODEL_FILE, tmp / f"{MODEL_FILE}.data") if f.is_file())
        record = _record(job, written, kv_cache, file_bytes, nbytes, start)
        write_text_atomic(tmp / "export_report.json", json.dumps(record.to_dict(), indent=2))
    return record


def check_options(name: str, task: str, config: ExportConfig, quantize: QuantMethod | None) -> None:
    """Refuse, before any work, options the task or the quantization method does not support
    (what a method supports it declares: `QuantMethod.optimize`)."""
    decoder = task in ("text-generation", "text-generation-with-past")
    if config.optimize and not (task == "feature-extraction" or decoder):
        raise ConfigError(f"--optimize runs onnxruntime's encoder or decoder fusions; {name} is exported as {task}")
    kind = "decoder" if decoder else "encoder"
    if quantize is not None and config.optimize > quantize.optimize.get(kind, 0):
        able = [n for n, cls in methods().items() if cls.optimize.get(kind, 0) >= config.optimize]
        use = ", ".join(able[:-1]) + " or " + able[-1] if len(able) > 1 else "".join(able) or "no --quantize"
        raise ConfigError(f"--optimize with --quantize {quantize.name} is not supported for {task}; use {use}")
    if config.pooling_in_graph and task != "feature-extraction":
        raise ConfigError(f"--pooling-in-graph puts sentence pooling into an encoder's graph; {name} is "
                          f"exported as {task}")


def traced_model(loaded: LoadedModel, task: str, config: ExportConfig, *, keep_dtype: bool = False
                 ) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The module the exporter traces and its FFN down-projections' names (`ffn_down_scopes`):
    the bare Transformer for feature extraction from a model with a head (token states), with the
    pooling inside for ``pooling_in_graph``, in float32 (export and check in fp32; fp16 converts
    after) unless ``keep_dtype``."""
    model = (loaded.adapter.base(loaded.model) if task == "feature-extraction" else loaded.model).eval()
    if config.pooling_in_graph:
        model = SentenceEmbedding(model, loaded.pooling, loaded.normalize).eval()
    ffn_down = ffn_down_scopes(loaded, model)  # on the model's own modules, before a float copy
    if not keep_dtype and next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    return model, ffn_down


@dataclass
class _Job:
    """What one export works on (the task may fall back to no KV cache)."""

    loaded: LoadedModel
    model: torch.nn.Module
    task: str
    config: ExportConfig
    quantize: QuantMethod | None
    texts: list[str]
    params: int
    ffn_down: tuple[str, ...]
    plan: Any
    layout_reason: str = ""


@dataclass
class _Written:
    """What writing the folder gave: the graph's inputs, what the passes and the quantization
    did, the stored numbers and projections, and the check against PyTorch."""

    input_names: list[str]
    graph: dict[str, Any]
    stored: int
    projections: dict[str, int]
    check: dict[str, Any]


def _write(tmp: Path, job: _Job) -> _Written:
    """Trace, rewrite (once, in memory), write and verify the export in ``tmp``."""
    try:
        onnx_config = export_onnx(job.model, job.task, job.config.opset, tmp / MODEL_FILE)
    except UnsupportedModelError:
        raise
    except Exception as e:
        if job.task != "text-generation-with-past":
            raise
        # optimum traces the cache with dummy tensors sized from the config: a pruned head_dim breaks them
        raise OptimumCacheError(f"optimum's exporter cannot trace the KV cache of this {job.model.config.model_type} "
                                f"model: {first_line(e)}") from None
    input_names = list(onnx_config.inputs)
    job.model.config.save_pretrained(tmp)  # before quantizing: optimum's quantizer reads it
    job.loaded.tokenizer.save_pretrained(tmp)
    graph, done = graph_passes(onnx.load(str(tmp / MODEL_FILE)), tmp, job, input_names)
    if save_model(graph, tmp / MODEL_FILE):  # the one write; a graph past protobuf's 2 GB keeps its data beside it
        done["external_data"] = f"{MODEL_FILE}.data"
    del graph
    stored, matmuls = check_storage(tmp / MODEL_FILE, job.model, job.params, job.quantize)
    check = _verify(tmp, job, input_names, done.get("optimized"))
    return _Written(input_names, done, stored, matmuls, check)


def graph_passes(graph: onnx.ModelProto, folder: Path, job: _Job, input_names: list[str]) -> tuple[onnx.ModelProto, dict]:
    """The exported graph's rewrites, in order: the tied head stored once (float graphs),
    onnxruntime's fusions (``--optimize``), then the quantization method's handler, or for an
    fp32 export only the Identity inlining (it leaves the numbers alone and lets a user's own
    quantizer reach every MatMul on a shared weight)."""
    from ..onnx.graph import inline_identity_weights

    quantize, config = job.quantize, job.config
    tied = None
    if quantize is None or quantize.float_weights:
        tied = _store_tied_once(graph, job.model)
    optimized = None
    if config.optimize:
        from ..onnx.optimize import optimize_decoder_graph, optimize_graph
        from ..quantization.stage import prepare

        prepare(graph)  # weights behind Identity nodes would not match the fusions' patterns
        if job.task != "feature-extraction":
            graph, optimized = optimize_decoder_graph(graph, config.optimize, job.model.config.model_type,
                                                      job.loaded.adapter.max_positions(job.model.config), folder)
        else:
            graph, optimized = optimize_graph(graph, config.optimize, folder)
    if quantize is not None:
        from ..quantization.stage import QuantizeContext
        from ..quantization.stage import quantize as quantize_graph

        context = QuantizeContext(folder, job.loaded.tokenizer, tuple(input_names), job.ffn_down, job.plan)
        with quiet("", "optimum"):  # onnxruntime's advice to pre-process goes to the root logger
            graph, done = quantize_graph(graph, quantize, context)
    else:
        graph, inlined = inline_identity_weights(graph)
        done = {"identity_inlined": inlined}
    if tied is not None:
        done["tied_head_stored_once"] = tied
    if optimized is not None:
        done["optimized"] = optimized
    return graph, done


def _store_tied_once(graph: onnx.ModelProto, model) -> bool | None:
    """`onnx.tied_head.store_tied_once` where the model ties its head to its input embeddings;
    ``None``: nothing tied."""
    from ..onnx.tied_head import store_tied_once

    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight.data_ptr() != embeddings.weight.data_ptr():
        return None
    return store_tied_once(graph, embeddings.weight.detach().float().numpy())[1]


def _verify(tmp: Path, job: _Job, input_names: list[str], optimized: dict | None) -> dict[str, Any]:
    """`verify.check_export` on the written folder; for an encoder, the sentence-transformers
    layout written and checked too (and the pooled output of ``pooling_in_graph``)."""
    loaded, model, config, quantize = job.loaded, job.model, job.config, job.quantize
    try:
        with ort_errors_quiet(optimized is not None):  # a failing fused graph: our one line, not onnxruntime's too
            check = check_export(tmp, model, loaded.tokenizer, job.task, input_names, config, quantize, job.texts,
                                 loaded.adapter)
    except Exception as e:
        if optimized is None or isinstance(e, CompressError):
            raise
        # a fusion whose pattern matched a graph it does not fit (Gemma's rotary at level 2)
        raise ExportError(f"the graph onnxruntime's optimizer fused (--optimize {config.optimize}: "
                          f"{', '.join(optimized['fused']) or 'nothing'}) does not run: {first_line(e)}; "
                          f"export with {'--optimize 1' if config.optimize == 2 else 'no --optimize'}") from None
    if job.task == "feature-extraction":  # sentence-transformers loads the folder with the model's own pooling
        from .sentence import check_pooled_graph, check_sentence_transformers, write_sentence_layout

        min_cosine = quantize.min_cosine if quantize else None
        modules = write_sentence_layout(tmp, loaded, loaded.geometry.hidden_size,
                                        max_positions(loaded.adapter, model, loaded.tokenizer))
        check["sentence_transformers"] = {"modules": modules, **check_sentence_transformers(
            tmp, model, loaded, job.texts, min_cosine)}
        if config.pooling_in_graph:
            check["sentence_embedding"] = check_pooled_graph(tmp / MODEL_FILE, model, loaded, job.texts, min_cosine)
    return check


def _record(job: _Job, written: _Written, kv_cache: dict | None, file_bytes: int, nbytes: int,
            start: float) -> StageRecord:
    graph = written.graph
    if job.plan is not None:
        info = dict(job.plan.info)
        if "trained_grid" in info:  # blocks a quantization-aware fine-tune trained, stored as they are
            graph["trained_grid"] = info.pop("trained_grid")
        if info:
            graph["calibration"] = info
    quantize = job.quantize
    metrics: dict[str, Any] = {
        "model": job.loaded.name, "task": job.task, "layout": "optimum", "layout_reason": job.layout_reason, "ort_class": ORT_CLASSES[job.task],
        "precision": quantize.name if quantize else "fp32", "opset": job.config.opset,
        "inputs": written.input_names, "file_bytes": file_bytes, "stored_numbers": written.stored,
        "projections": written.projections, "graph": graph, "check": written.check,
        "sharing": bool(job.loaded.sharing),
    }
    if job.task.startswith("text-generation"):
        metrics["kv_cache"] = kv_cache or {"exported": job.task == "text-generation-with-past"}
    record = StageRecord.build("export", {**job.config.to_dict(), "quantize": quantize.to_dict() if quantize else None},
                               before=(job.params, nbytes), after=(written.stored, file_bytes), metrics=metrics,
                               started=start)
    record.seconds = round(record.seconds, 2)
    return record


def ffn_down_scopes(loaded: LoadedModel, root: torch.nn.Module) -> tuple[str, ...]:
    """Qualified names, under the exported ``root``, of every block's FFN down-projection."""
    adapter = loaded.adapter
    if "ffn_out" not in adapter.linears:
        return ()
    names = {id(module): name for name, module in root.named_modules()}
    found = (names.get(id(adapter.linear(block, "ffn_out"))) for block in adapter.blocks(loaded.model))
    return tuple(name for name in found if name)
