"""The export stage: ``record = export(model, ExportConfig(...), output)``.

The model is exported with optimum's exporter (TorchScript, which stores a weight that several
layers share once), optionally quantized, and written in the folder layout optimum's
``ORTModelFor*`` classes load (model.onnx, config.json, tokenizer files, ort_config.json when
quantized). Before the folder appears it is loaded back with that very class and checked against
PyTorch on real text at several lengths; an export that disagrees fails and leaves nothing.
No graph optimizer runs: onnxruntime's attention fusion concatenates Q/K/V per layer and so
stores shared weights once per layer again (measured on a shared BERT-base); onnxruntime applies its own basic
optimizations when a session loads the file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..data import calibration_texts
from ..errors import CompressError, ConfigError, ExportError, ModelLoadError, UnsupportedModelError, first_line
from ..io import check_writable, quiet, staged_folder, write_text_atomic
from ..models import LoadedModel, unique_parameters
from ..models.heads import output_heads, pick_task
from ..models.pooling import SentenceEmbedding
from ..onnx_graph import inline_identity_weights, stored_elements, weight_matmuls
from ..quantization.config import QuantizeConfig
from ..record import StageRecord
from .config import ORT_CLASSES, ExportConfig

MODEL_FILE = "model.onnx"
#: Slack on "a shared weight is stored once": the odd folded constant is stored too
#: (quantization scales and zero points are not counted, see `stored_elements`).
_STORAGE_SLACK = 0.01


def export(loaded: LoadedModel, config: ExportConfig, output: str | Path, *, quantize: QuantizeConfig | None = None,
           overwrite: bool = False) -> StageRecord:
    """Export ``loaded`` to the ONNX folder ``output``, quantized if ``quantize`` is given.

    An export hands no model on to a next PyTorch stage, so it returns only its record.

    Returns:
        A record with the model's unique parameters and bytes before, the file's stored numbers
        and bytes after, and in ``metrics``: the task and the optimum class that loads the
        folder, the graph's projections (quantized or not), the check against PyTorch per
        length, and what quantization did.

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
    decoder = task in ("text-generation", "text-generation-with-past")
    if config.optimize and not (task == "feature-extraction" or decoder):
        raise ConfigError(f"--optimize runs onnxruntime's encoder or decoder fusions; {loaded.name} is exported as {task}")
    # an encoder's fused attention holds its projections, which int4 and static int8 do not reach;
    # a decoder's (GroupQueryAttention) takes the projections' outputs, so int4 quantizes its graph
    unsupported = ("int4", "int8-static") if task == "feature-extraction" else ("int8-static",)
    if config.optimize and quantize is not None and quantize.mode in unsupported:
        raise ConfigError(f"--optimize with --quantize {quantize.mode} is not supported for {task}; "
                          f"use {'int8 or fp16' if task == 'feature-extraction' else 'int8, int4 or fp16'}")
    if config.pooling_in_graph and task != "feature-extraction":
        raise ConfigError(f"--pooling-in-graph puts sentence pooling into an encoder's graph; {loaded.name} is "
                          f"exported as {task}")
    # feature-extraction from a model with a head exports its bare Transformer (token states)
    model = (loaded.adapter.base(loaded.model) if task == "feature-extraction" else loaded.model).eval()
    if config.pooling_in_graph:
        model = SentenceEmbedding(model, loaded.pooling, loaded.normalize).eval()
    ffn_down = ffn_down_scopes(loaded, model)
    if next(model.parameters()).dtype != torch.float32:  # export and check in fp32; --fp16 converts after
        model = copy.deepcopy(model).float()
    params, nbytes = unique_parameters(model)
    texts = calibration_texts(config.check_data, text_column=config.text_column, encoding=config.encoding)
    precision = quantize.mode if quantize else "fp32"
    plan = int4_plan(loaded, model, quantize) if quantize is not None and quantize.mode == "int4" else None

    with staged_folder(output, overwrite=overwrite) as tmp:
        try:
            input_names, quantized, stored, matmuls, check = _write(tmp, loaded, model, task, config, quantize, texts,
                                                                   params, ffn_down, plan)
            kv_cache = None
        except OptimumCacheError as e:
            if config.task != "auto":
                raise ExportError(f"--task {task}: {e}") from None
            # optimum cannot run this family's cache: the export it can run, and the record says why
            task, kv_cache = "text-generation", {"exported": False, "reason": str(e)}
            for f in tmp.iterdir():
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            input_names, quantized, stored, matmuls, check = _write(tmp, loaded, model, task, config, quantize, texts,
                                                                   params, ffn_down, plan)
        if plan is not None:
            info = dict(plan.info)
            if "trained_grid" in info:  # blocks a quantization-aware fine-tune trained, stored as they are
                quantized["trained_grid"] = info.pop("trained_grid")
            if info:
                quantized["calibration"] = info
        metrics: dict[str, Any] = {
            "model": loaded.name, "task": task, "ort_class": ORT_CLASSES[task], "precision": precision,
            "opset": config.opset, "inputs": input_names, "file_bytes": (tmp / MODEL_FILE).stat().st_size,
            "stored_numbers": stored, "projections": matmuls, "graph": quantized, "check": check,
            "sharing": bool(loaded.sharing),
        }
        if task.startswith("text-generation"):
            metrics["kv_cache"] = kv_cache or {"exported": task == "text-generation-with-past"}
        record = StageRecord.build("export", {**config.to_dict(), "quantize": quantize.to_dict() if quantize else None},
                                   before=(params, nbytes), after=(stored, metrics["file_bytes"]), metrics=metrics,
                                   started=start)
        record.seconds = round(record.seconds, 2)
        write_text_atomic(tmp / "export_report.json", json.dumps(record.to_dict(), indent=2))
    return record


class OptimumCacheError(ExportError):
    """optimum's ORTModelForCausalLM cannot run this family's KV cache (it sizes the cache by
    the query heads for families it does not list as grouped-query: Phi-3, Gemma 2 in
    optimum-onnx 0.1)."""


def int4_plan(loaded: LoadedModel, model, quantize: QuantizeConfig):
    """What int4 needs decided in PyTorch (`gptq.Int4Plan`; ``None``: nothing, round-to-nearest
    in onnxruntime's quantizer), the output head left out (its blocks are
    ``quantize.embedding_bits``, `quantization.tables`):

    * a model whose projections lie on their int4 grids already (a ``--quantize-aware``
      fine-tune's checkpoint; `gptq.trained_blocks`): those blocks, stored as they are (``rtn``,
      ``rtn-asym`` and ``gptq``, which would find no error to move; ``hqq``, which would fit them
      again, and another ``block_size`` than the model's are refused), never taken into
      ``int8_share``, the few off their grid rounded with zero points;
    * GPTQ's blocks and the projections ``int8_share`` keeps (`gptq.plan_int4`), on
      ``quantize.calibration`` (the packaged calibration text by default), one text per forward
      pass (no padding to leave out).
    """
    from ..quantization.gptq import Int4Plan, plan_int4, trained_block_size, trained_blocks

    skip = output_heads(model)  # of the copy traced
    trained = trained_blocks(model, quantize.block_size, skip)
    grid = None
    if trained is None:  # trained for other blocks? rounding them again would undo the training
        size = trained_block_size(model, skip)
        if size is not None and size != quantize.block_size:
            raise ConfigError(f"{loaded.name} was trained for int4 blocks of {size} (finetune --quantize-aware); "
                              f"export it with --block-size {size}")
    else:
        if quantize.int4_method == "hqq":
            raise ConfigError(f"{loaded.name} was trained on its int4 blocks (finetune --quantize-aware), which "
                              "--int4-method hqq would fit again; export with rtn (the default)")
        trained, off = trained
        grid = {"weights": len(trained), "off_grid": off, "block_size": quantize.block_size}
    gptq_blocks = quantize.int4_method == "gptq" and trained is None
    if not (gptq_blocks or quantize.int8_share):
        return None if trained is None else Int4Plan(fitted=trained, info={"trained_grid": grid})
    texts = calibration_texts(quantize.calibration, text_column=quantize.text_column, encoding=quantize.encoding,
                              limit=quantize.calibration_samples)
    batches = []
    for text in texts:
        enc = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=quantize.max_length)
        batches.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    plan = plan_int4(model, batches, quantize.block_size, gptq_blocks=gptq_blocks,
                     int8_share=quantize.int8_share, skip=skip, trained=trained or ())
    plan.info.update(calibration=quantize.calibration or "packaged calibration text", texts=len(texts))
    if trained is not None:
        plan.fitted.update(trained)
        plan.info["trained_grid"] = grid
    return plan


def _write(tmp: Path, loaded: LoadedModel, model, task: str, config: ExportConfig, quantize: QuantizeConfig | None,
           texts: list[str], params: int, ffn_down: tuple[str, ...], plan=None):
    """Export, quantize and check into ``tmp``: ``(input names, what quantization did, stored
    numbers, projections, the check)``."""
    try:
        onnx_config = export_onnx(model, task, config.opset, tmp / MODEL_FILE)
    except UnsupportedModelError:
        raise
    except Exception as e:
        if task != "text-generation-with-past":
            raise
        # optimum traces the cache with dummy tensors sized from the config: a pruned head_dim breaks them
        raise OptimumCacheError(f"optimum's exporter cannot trace the KV cache of this {model.config.model_type} "
                                f"model: {first_line(e)}") from None
    input_names = list(onnx_config.inputs)
    model.config.save_pretrained(tmp)  # before quantizing: optimum's quantizer reads it
    loaded.tokenizer.save_pretrained(tmp)
    tied = None
    if quantize is None or quantize.mode == "fp16":
        tied = store_tied_once(tmp / MODEL_FILE, model)
    optimized = None
    if config.optimize:
        from ..quantization.onnx import prepare_graph
        from .optimize import optimize_decoder_graph, optimize_graph

        prepare_graph(tmp / MODEL_FILE)  # weights behind Identity nodes would not match the fusions' patterns
        if task != "feature-extraction":
            optimized = optimize_decoder_graph(tmp, config.optimize, model.config.model_type,
                                               loaded.adapter.max_positions(model.config))
        else:
            optimized = optimize_graph(tmp, config.optimize)
    if quantize is not None:
        from ..quantization import quantize_onnx

        with quiet("", "optimum"):  # onnxruntime's advice to pre-process goes to the root logger
            quantized = quantize_onnx(tmp, quantize, tokenizer=loaded.tokenizer, input_names=input_names,
                                      dynamic_scopes=ffn_down, plan=plan)
    else:
        # only the Identity inlining: it leaves the graph's numbers alone and lets a user's
        # own quantizer (optimum's ORTQuantizer) reach every MatMul on a shared weight
        quantized = {"identity_inlined": _inline_identities(tmp / MODEL_FILE)}

    if tied is not None:
        quantized["tied_head_stored_once"] = tied
    if optimized is not None:
        quantized["optimized"] = optimized
    stored, matmuls = check_storage(tmp / MODEL_FILE, model, params, quantize)

    try:
        with _ort_errors_quiet(optimized is not None):  # a failing fused graph: our one line, not onnxruntime's too
            check = check_export(tmp, model, loaded.tokenizer, task, input_names, config, quantize, texts, loaded.adapter)
    except Exception as e:
        if optimized is None or isinstance(e, CompressError):
            raise
        # a fusion whose pattern matched a graph it does not fit (Gemma's rotary at level 2)
        raise ExportError(f"the graph onnxruntime's optimizer fused (--optimize {config.optimize}: "
                          f"{', '.join(optimized['fused']) or 'nothing'}) does not run: {first_line(e)}; "
                          f"export with {'--optimize 1' if config.optimize == 2 else 'no --optimize'}") from None
    if task == "feature-extraction":  # sentence-transformers loads the folder with the model's own pooling
        from .sentence import check_sentence_transformers, write_sentence_layout

        modules = write_sentence_layout(tmp, loaded, loaded.geometry.hidden_size,
                                        max_positions(loaded.adapter, model, loaded.tokenizer))
        check["sentence_transformers"] = {"modules": modules, **check_sentence_transformers(
            tmp, model, loaded, texts, quantize.min_cosine if quantize else None)}
        if config.pooling_in_graph:
            from .sentence import check_pooled_graph

            check["sentence_embedding"] = check_pooled_graph(tmp / MODEL_FILE, model, loaded, texts,
                                                             quantize.min_cosine if quantize else None)
    return input_names, quantized, stored, matmuls, check


@contextlib.contextmanager
def _ort_errors_quiet(quiet_now: bool):
    """onnxruntime's own log lines of a failing kernel kept off stderr for the block."""
    import onnxruntime as ort

    if quiet_now:
        ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        if quiet_now:
            ort.set_default_logger_severity(2)  # onnxruntime's default, warnings


def check_storage(path: Path, model, params: int, quantize: QuantizeConfig | None) -> tuple[int, dict[str, int]]:
    """The numbers the file stores and its projections, counted from the graph; an export that
    stores a shared weight twice, or leaves a projection float after int8, fails here.

    Raises:
        ExportError: either of those.
    """
    graph = onnx.load(str(path), load_external_data=False)
    stored, matmuls = stored_elements(graph), weight_matmuls(graph)
    del graph
    allowed = params + sum(b.numel() for b in model.buffers()) + _tied_output_embeddings(model)
    if stored > allowed * (1 + _STORAGE_SLACK) + 1024:
        raise ExportError(f"the ONNX file stores {stored:,} numbers for {params:,} unique parameters: "
                          "a shared weight was stored more than once")
    if quantize is not None and quantize.mode.startswith("int8") and matmuls["float_on_weights"]:
        raise ExportError(f"{matmuls['float_on_weights']} of {matmuls['on_weights']} projections kept a float weight "
                          "after int8 quantization")
    return stored, matmuls


def store_tied_once(path: Path, model) -> bool | None:
    """Store an LM head tied to the input embeddings once. The exporter writes the table twice,
    once for the lookup (``Gather``) and once transposed for the head (``MatMul``); as optimum's
    own post-processing does, the head then reads a ``Transpose`` of the lookup's table (which
    onnxruntime folds when it loads the file). ``None``: nothing tied; else whether it worked.
    Left out for int8, whose quantizer would keep a float copy for the Transpose, and int4, which
    stores the pair once as blocks of its own (`quantization.tables`)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight.data_ptr() != embeddings.weight.data_ptr():
        return None
    graph = onnx.load(str(path))
    inits = {t.name: t for t in graph.graph.initializer}
    table = embeddings.weight.detach().float().numpy()
    lookup = next((n.input[0] for n in graph.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and tuple(inits[n.input[0]].dims) == table.shape), None)
    heads = [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and tuple(inits[n.input[1]].dims) == table.shape[::-1]]
    heads = [n for n in heads if np.array_equal(onnx.numpy_helper.to_array(inits[n.input[1]]), table.T)]
    if lookup is None or not heads:
        return False
    transposed = f"{lookup}_transposed"
    graph.graph.node.insert(0, onnx.helper.make_node("Transpose", [lookup], [transposed], name="/tied_head/Transpose",
                                                     perm=[1, 0]))
    duplicates = {n.input[1] for n in heads}
    for node in heads:
        node.input[1] = transposed
    if not any(i in duplicates for n in graph.graph.node for i in n.input):
        keep = [t for t in graph.graph.initializer if t.name not in duplicates]
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(keep)
    onnx.save(graph, str(path))
    return True


def _tied_output_embeddings(model) -> int:
    """Numbers of an LM head tied to the input embeddings. The exporter stores it twice (once
    for the lookup, once transposed for the head), as optimum's plain export does; that is the
    exporter's doing, not a shared layer coming apart, so the storage check allows for it."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight.data_ptr() != embeddings.weight.data_ptr():
        return 0
    return head.weight.numel()


def _inline_identities(path: Path) -> int:
    graph = onnx.load(str(path))
    removed = inline_identity_weights(graph)
    if removed:
        onnx.save(graph, str(path))
    return removed


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


def check_batches(tokenizer, texts: list[str], lengths: list[int], max_positions: int | None) -> list[tuple[int, dict]]:
    """One batch per length: four real texts truncated to the length, 3/4, 1/2 and 1/4 of it,
    right-padded, so that the attention mask is exercised as well."""
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its padding side and pad token
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; pad with EOS as their users do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    long_text = " ".join(texts)
    batches = []
    for length in dict.fromkeys(min(n, max_positions or n) for n in lengths):
        rows = []
        for i, n in enumerate((length, length * 3 // 4, length // 2, length // 4)):
            start = len(long_text) * i // 4
            rows.append(tokenizer(long_text[start:] + " " + long_text, truncation=True, max_length=max(n, 2)))
        with quiet("transformers"):  # a hint to call the tokenizer on a batch, which cannot truncate per row
            batches.append((length, tokenizer.pad(rows, padding=True, return_tensors="pt")))
    return batches


def max_positions(adapter, model, tokenizer) -> int | None:
    """The longest input the model and its tokenizer take (the adapter knows reserved positions)."""
    limit = adapter.max_positions(model.config)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limit = min(limit, tok_limit) if limit else tok_limit
    return limit


def check_export(folder: Path, model, tokenizer, task: str, input_names: list[str], config: ExportConfig,
                 quantize: QuantizeConfig | None, texts: list[str], adapter) -> dict[str, Any]:
    """Compare the folder, loaded through optimum, with PyTorch on every check batch.

    fp32 must match elementwise (``atol + rtol * |reference|``); a quantized export must reach
    a mean cosine of ``quantize.min_cosine`` per output vector (token state or logits row).

    Raises:
        ExportError: a batch past the tolerance; the message names the length and the numbers.
    """
    ort_model = load_ort(folder, task)
    if task == "text-generation-with-past":
        probe_cache(ort_model, tokenizer, texts, model.config.model_type)
    # ORTModelForCausalLM computes position ids itself; the other classes take them from the caller
    forward_names = [n for n in input_names if n != "position_ids" or not task.startswith("text-generation")]
    forward_names = [n for n in forward_names if not n.startswith("past_key_values.")]
    results = []
    for length, batch in check_batches(tokenizer, texts, config.check_lengths, max_positions(adapter, model, tokenizer)):
        inputs = {k: v for k, v in batch.items() if k in forward_names}
        if "position_ids" in forward_names:
            mask = batch["attention_mask"]
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0) * mask + (1 - mask)
        with torch.no_grad():
            ref = model(**inputs)
            got = ort_model(**inputs)
        key = "last_hidden_state" if task == "feature-extraction" else "logits"
        r, g = ref[key].float().numpy(), np.asarray(got[key], dtype=np.float32)
        if r.ndim == 3:  # per token: only the real ones, not the padding
            keep = batch["attention_mask"].numpy().astype(bool)
            r, g = r[keep], g[keep]
        diff = np.abs(g - r)
        cos = (g * r).sum(-1) / np.maximum(np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1), 1e-12)
        row = {"length": length, "tokens": int(batch["attention_mask"].sum()), "max_abs_diff": float(diff.max()),
               "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
        if quantize is None:
            bad = diff > config.atol + config.rtol * np.abs(r)
            row["mismatched"] = int(bad.sum())
            if bad.any():
                raise ExportError(f"the ONNX export does not match PyTorch at length {length}: {int(bad.sum())} of "
                                  f"{bad.size} outputs differ by up to {diff.max():.2e} (tolerance {config.atol:g} + "
                                  f"{config.rtol:g} x |output|)")
        elif cos.mean() < quantize.min_cosine:
            raise ExportError(f"the {quantize.mode} export strays from PyTorch at length {length}: mean cosine "
                              f"{cos.mean():.4f} < {quantize.min_cosine} (--min-cosine)")
        results.append(row)
    generation = None
    # fp32 must decode as PyTorch does token for token; a quantized export may pick other tokens
    # (its prefill and cached step are checked above, its logits by their cosine)
    if task == "text-generation-with-past" and config.generation_check and quantize is None:
        generation = check_generation(ort_model, model, tokenizer, texts, config.generation_check, exact=True)
    return {"loaded_with": f"optimum.onnxruntime.{ORT_CLASSES[task]}", "batches": results, "generation": generation,
            "max_abs_diff": max(r["max_abs_diff"] for r in results),
            "mean_cosine": float(np.mean([r["mean_cosine"] for r in results])),
            "min_cosine": min(r["min_cosine"] for r in results),
            "tolerance": ({"atol": config.atol, "rtol": config.rtol} if quantize is None
                          else {"min_mean_cosine": quantize.min_cosine})}


def probe_cache(ort_model, tokenizer, texts: list[str], model_type: str) -> None:
    """One prefill and one cached step through optimum's class, as ``generate`` runs them.

    Raises:
        OptimumCacheError: optimum cannot feed this graph's cache (it sizes the cache from the
            config: by the query heads for grouped-query families it does not list, by
            ``hidden_size / heads`` after heads were pruned).
    """
    enc = tokenizer([" ".join(texts[:4]) or "a probe text"], truncation=True, max_length=8, return_tensors="pt")
    ids, mask = enc["input_ids"][:, :4], enc["attention_mask"][:, :4]
    if ids.shape[1] < 2:  # a prefill and one step need two tokens
        ids, mask = ids.repeat(1, 2), mask.repeat(1, 2)
    try:
        with torch.no_grad():
            out = ort_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1])
            ort_model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=out.past_key_values)
    except Exception as e:  # noqa: BLE001  (onnxruntime's InvalidArgument, torch's shape errors: optimum's sizing)
        raise OptimumCacheError(f"optimum's ORTModelForCausalLM cannot run the KV cache of this {model_type} "
                                f"export: {first_line(e)}") from None


def check_generation(ort_model, model, tokenizer, texts: list[str], new_tokens: int, *, exact: bool) -> dict[str, Any]:
    """Greedy decoding through optimum's ``generate`` (the prefill, then one cached step per
    token) against PyTorch's, on two left-padded prompts of different lengths.

    Raises:
        ExportError: an fp32 export (``exact``) whose tokens differ from PyTorch's.
    """
    import copy as copy_module

    tok = copy_module.copy(tokenizer)
    tok.padding_side = "left"
    prompts = sorted(texts[:8], key=len)
    enc = tok([prompts[0], prompts[-1]], padding=True, truncation=True, max_length=32, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": tok.pad_token_id}
    with torch.no_grad(), warnings.catch_warnings(), quiet("transformers", "optimum"):
        warnings.simplefilter("ignore")
        ref = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
        got = ort_model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
    agree = float((ref == got).float().mean())
    if exact and not torch.equal(ref, got):
        step = int((ref != got).any(0).nonzero()[0])
        raise ExportError(f"the ONNX export's greedy decoding with its KV cache leaves PyTorch's at new token {step + 1} "
                          f"of {new_tokens}: the cached decode steps do not compute what the model does")
    return {"new_tokens": new_tokens, "prompts": 2, "token_agreement": agree, "passed": agree == 1.0 or not exact}


def ffn_down_scopes(loaded: LoadedModel, root: torch.nn.Module) -> tuple[str, ...]:
    """Qualified names, under the exported ``root``, of every block's FFN down-projection."""
    adapter = loaded.adapter
    if "ffn_out" not in adapter.linears:
        return ()
    names = {id(module): name for name, module in root.named_modules()}
    found = (names.get(id(adapter.linear(block, "ffn_out"))) for block in adapter.blocks(loaded.model))
    return tuple(name for name in found if name)
