"""Measure the original, optimum's baselines and the compressed variants side by side.

Everything runs in one process with the same thread count, on the same inputs: latency in
turns (one timed run per row, then the next row, and round again), so that a noisy machine
slows every row alike and the ratios hold; the task metric is the one `compress evaluate`
computes, on the same seeded split, with each row's own tokenizer.
"""

from __future__ import annotations

import contextlib
import io
import math
import platform
import shutil
import statistics
import subprocess
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.text import batches, embed_by_length
from ..errors import CompressError
from ..models import LoadedModel
from ..models.pooling import pool
from .config import ReportConfig
from .generation import generation, peak_memory
from .backends import Backend, GenaiBackend, OnnxBackend, TorchBackend, load_backend

#: Row labels of the baselines.
BASELINE_FP32, BASELINE_INT8 = "optimum ONNX fp32", "optimum ONNX int8"
BASELINE_GENAI = "onnxruntime-genai builder int4"
BASELINE_O2_FP32, BASELINE_O2_INT8 = "optimum O2 fp32", "optimum O2 int8"


def optimum_baselines(original: LoadedModel, folder: Path, task: str) -> dict[str, Path]:
    """The original exported and quantized the way optimum's documentation does it:
    ``main_export`` (what ``optimum-cli export onnx`` runs), then ``ORTQuantizer`` with the
    dynamic ``AutoQuantizationConfig`` preset for this CPU. Nothing of ours touches the graphs.
    A causal LM is exported with its KV cache (``text-generation-with-past``, what a user who
    generates picks), or without it for a family optimum exports no cache for."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer

    from ..quantization.presets import optimum_preset

    fp32, int8 = folder / "optimum-fp32", folder / "optimum-int8"
    from ..io import quiet

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet("optimum", "transformers"):
        warnings.simplefilter("ignore")
        if task == "text-generation":
            try:
                main_export(original.source, output=fp32, task="text-generation-with-past",
                            library_name="transformers", do_validation=False)
                _check_baseline_cache(fp32, original)
            except Exception:  # noqa: BLE001 - optimum's own refusal; its route without a cache remains
                shutil.rmtree(fp32, ignore_errors=True)
                main_export(original.source, output=fp32, task=task, library_name="transformers", do_validation=False)
        else:
            main_export(original.source, output=fp32, task=task, library_name="transformers", do_validation=False)
        ORTQuantizer.from_pretrained(fp32).quantize(optimum_preset("auto", is_static=False), save_dir=int8)
    (int8 / "model_quantized.onnx").replace(int8 / "model.onnx")  # one model file, as every row has
    baselines = {BASELINE_FP32: fp32, BASELINE_INT8: int8}
    if task != "text-generation":
        baselines.update(optimized_baselines(fp32, folder))
    return baselines


def genai_builder_baseline(original: LoadedModel, folder: Path, config: ReportConfig) -> tuple[Path | None, str]:
    """onnxruntime-genai's own int4 build of the original (``config.genai_builder``), and what
    was done: the folder, or ``None`` and why the row is left out.

    Raises:
        CompressError: a builder named in ``config.genai_builder`` that fails.
    """
    import sys

    python = config.genai_builder or sys.executable
    probe = subprocess.run([python, "-c", "import onnxruntime_genai.models.builder"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["it does not import"])[-1]
        if config.genai_builder:
            raise CompressError(f"--genai-builder {python}: onnxruntime-genai's builder does not import: {why}")
        return None, f"onnxruntime-genai's builder does not import here ({why}); give --genai-builder PYTHON"
    if not Path(original.source).is_dir():
        return None, f"onnxruntime-genai's builder runs on a local folder; {original.source} is not one"
    out = folder / "genai-builder-int4"
    done = subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", original.source, "-o", str(out),
                           "-p", "int4", "-e", "cpu", "-c", str(folder / "genai-builder-cache")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if config.genai_builder:
            raise CompressError(f"onnxruntime-genai's builder failed on {original.source}: {why}")
        return None, f"onnxruntime-genai's builder failed: {why}"
    return out, f"{python} -m onnxruntime_genai.models.builder -i {original.source} -p int4 -e cpu"


def _check_baseline_cache(folder: Path, original: LoadedModel) -> None:
    """optimum's ``ORTModelForCausalLM`` runs a prefill and a cached step on its own with-past
    export (it does not for Phi-3 and Gemma 2 in optimum-onnx 0.1: it sizes their cache by the
    query heads), as our own export checks itself; raises when it cannot."""
    from ..data import calibration_texts
    from ..export.optimum import load_ort
    from ..export.verify import probe_cache

    ort_model = load_ort(folder, "text-generation-with-past")
    probe_cache(ort_model, original.tokenizer, calibration_texts(None, limit=4), original.model.config.model_type)


def optimized_baselines(fp32: Path, folder: Path) -> dict[str, Path]:
    """optimum's strongest CPU route for an encoder: ``ORTOptimizer`` at level 2 (attention,
    LayerNorm and GELU fusion), then dynamic int8 of the optimized graph (onnxruntime's
    ``quantize_dynamic``: optimum's ``ORTQuantizer`` fails on optimized graphs in shape
    inference, so a careful user calls onnxruntime's own quantizer on it). None for a model type
    optimum's optimizer does not handle (that route does not exist for it)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    from ..io import quiet

    o2, o2_int8 = folder / "optimum-o2-fp32", folder / "optimum-o2-int8"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet("", "optimum", "onnxruntime"):
        warnings.simplefilter("ignore")
        try:
            ORTOptimizer.from_pretrained(fp32).optimize(OptimizationConfig(optimization_level=2), save_dir=o2)
        except Exception:  # noqa: BLE001 - optimum's optimizer knows some model types only: no such route exists
            shutil.rmtree(o2, ignore_errors=True)
            return {}
        (o2 / "model_optimized.onnx").replace(o2 / "model.onnx")
        shutil.copytree(o2, o2_int8, ignore=shutil.ignore_patterns("model.onnx"))
        quantize_dynamic(o2 / "model.onnx", o2_int8 / "model.onnx", weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {BASELINE_O2_FP32: o2, BASELINE_O2_INT8: o2_int8}


#: A timed latency run lasts at least this long: a batch-1 call of a small encoder (a few ms) is
#: repeated within the run and timed as the mean of its calls, so that a timer's grain and one
#: interrupted call do not decide the median.
MIN_TIMED_SECONDS = 0.05


def latency(runners: list[Backend], config: ReportConfig, texts: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``label -> batch size -> {p50_ms, p90_ms, throughput, calls_per_run}`` at ``config.seq_len``
    tokens; each timed run makes ``calls_per_run`` calls (`MIN_TIMED_SECONDS`), rows taking turns."""
    torch.set_num_threads(config.threads)
    result: dict[str, dict[str, dict[str, float]]] = {r.label: {} for r in runners}
    for b in config.batch_sizes:
        rows = [(texts * (b // len(texts) + 1))[:b]]
        inputs = [r.tokenizer(rows[0], padding="max_length", truncation=True, max_length=config.seq_len,
                              return_tensors="pt") for r in runners]
        times: dict[str, list[float]] = {r.label: [] for r in runners}
        calls = dict.fromkeys(times, 1)
        for rep in range(config.warmup + config.repeats):
            for runner, enc in zip(runners, inputs):
                start = time.perf_counter()
                for _ in range(calls[runner.label]):
                    runner(enc)
                seconds = (time.perf_counter() - start) / calls[runner.label]
                if rep >= config.warmup:
                    times[runner.label].append(seconds)
                elif rep == config.warmup - 1:  # the last warm-up sets how many calls a timed run makes
                    calls[runner.label] = max(1, math.ceil(MIN_TIMED_SECONDS / max(seconds, 1e-6)))
        for label, ts in times.items():
            p50 = statistics.median(ts)
            p90 = statistics.quantiles(ts, n=10)[-1] if len(ts) > 1 else ts[0]
            result[label][str(b)] = {"p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "throughput": b / p50,
                                     "calls_per_run": calls[label]}
    return result


def sentence_embeddings(runner: Backend, texts: list[str], config: ReportConfig) -> torch.Tensor:
    """L2-normalized pooled embeddings of ``texts`` in their order, batched shortest first (as
    `compress evaluate` batches them)."""
    def one_batch(enc):
        hidden = runner(dict(enc)).float()
        return F.normalize(pool(hidden, enc["attention_mask"], runner.pooling), dim=-1)

    return torch.stack(embed_by_length(one_batch, runner.tokenizer, texts, config.batch_size, config.max_length))


def task_metric(runner: Backend, split, config: ReportConfig) -> dict[str, Any]:
    """The metric `compress evaluate` reports for the row's task (probe accuracy, classifier
    accuracy or perplexity), plus what fidelity needs (embeddings or predictions)."""
    from types import SimpleNamespace

    from ..evaluation.probe import probe_accuracy
    from ..models.heads import class_indices

    tr_x, tr_y, te_x, te_y = split
    if runner.task == "feature-extraction":
        test = sentence_embeddings(runner, te_x, config)
        acc = probe_accuracy(sentence_embeddings(runner, tr_x, config), tr_y, test, te_y)
        return {"metric": "probe accuracy", "value": acc["accuracy"], "outputs": test[: config.fidelity_size]}
    if runner.task == "text-classification":
        gold = class_indices(SimpleNamespace(config=SimpleNamespace(id2label=runner.id2label)), te_y)
        if gold is None:
            raise CompressError(f"the labels of {config.data} do not match the classes of {runner.label}")
        pred = torch.cat([runner(dict(e)).argmax(-1) for e in batches(runner.tokenizer, te_x, config.batch_size,
                                                                       config.max_length, "cpu")])
        return {"metric": "accuracy", "value": float((pred == gold).float().mean()), "outputs": pred[: config.fidelity_size]}
    nll, count = 0.0, 0
    for enc in batches(runner.tokenizer, te_x, max(1, config.batch_size // 8), config.max_length, "cpu"):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits = runner(dict(enc))[:, :-1].float()
        keep = (mask[:, 1:] * mask[:, :-1]).bool()
        nll += float(F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum"))
        count += int(keep.sum())
    return {"metric": "perplexity", "value": float(torch.tensor(nll / max(count, 1)).exp()), "outputs": None}


def check_request(original: LoadedModel, config: ReportConfig) -> str:
    """The original's task, once the options are known to fit it (before any work).

    Raises:
        CompressError: a sequence, or a prompt and its new tokens, past the model's positions;
            the suite asked of a model that makes no sentence embeddings.
    """
    from ..export.verify import max_positions
    from ..models.heads import pick_task

    task = pick_task(original, "auto")
    limit = max_positions(original.adapter, original.model, original.tokenizer)
    if limit and config.seq_len > limit:
        raise CompressError(f"--seq-len {config.seq_len} is longer than {original.name} reads ({limit} tokens)")
    if config.suite and task != "feature-extraction":
        raise CompressError(f"--suite scores sentence embeddings; {original.name} is a {task} model")
    if task == "text-generation" and limit and config.prompt_tokens + config.new_tokens > limit:
        raise CompressError(f"--prompt-tokens {config.prompt_tokens} + --new-tokens {config.new_tokens} is longer "
                            f"than {original.name} reads ({limit} positions); shorten the prompt")
    return task


def step_generation(runners: list[Backend], rows: list[dict[str, Any]], config: ReportConfig, step) -> None:
    """A causal LM's generation figures into ``row["generation"]``: speed in turns, then each
    row's peak memory in a fresh process."""
    step(f"generation of {len(runners)} rows, taking turns: batch 1, {config.prompt_tokens}-token prompt, "
         f"{config.new_tokens} new tokens, greedy, {config.generation_repeats} timed runs each")
    speeds = generation(runners, config)
    for runner, row in zip(runners, rows):
        row["generation"] = speeds[runner.label]
        if config.peak_memory:
            step(f"{runner.label}: peak memory in a fresh process")
            row["generation"].update(peak_memory(runner, config))


def step_suite(runners: list[Backend], rows: list[dict[str, Any]], config: ReportConfig, step) -> None:
    """Score every row on the quality suite (the same texts for all) into ``row["suite"]``; the
    first row, the original, is the reference of neighbour agreement and retained (against
    itself: 1.0, computed, not assumed)."""
    from ..evaluation.suite import compare, load_suite, suite_scores

    data = load_suite(config)
    reference = None
    for runner, row in zip(runners, rows):
        step(f"{runner.label}: quality suite ({len(data.tasks)} tasks, {len(data.pool)} texts for neighbours)")
        scores = suite_scores(lambda texts, r=runner: sentence_embeddings(r, texts, config), data, config)
        reference = reference or scores
        row["suite"] = compare(scores, reference).to_dict()


def fidelity_to(original: dict, row: dict, task: str) -> float | None:
    """Embedding cosine to the original (encoders) or agreement of predictions (classifiers)."""
    a, b = original.get("outputs"), row.get("outputs")
    if a is None or b is None:
        return None
    if task == "feature-extraction":
        return float((a * b).sum(-1).mean())
    return float((a == b).float().mean())


def provenance(config: ReportConfig) -> dict[str, Any]:
    """What a reader needs to trust or reproduce the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("compress", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    root = Path(__file__).resolve().parents[2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    import os

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "packages": packages,
            "git_commit": (commit + ("+changes" if dirty else "")) or None, "cpu": cpu,
            "cpus_visible": os.cpu_count(), "threads": config.threads, "python": platform.python_version()}


def report(original: LoadedModel, variants: list[tuple[str, str]], config: ReportConfig, *,
           work: Path, log=None) -> dict[str, Any]:
    """Measure the original, the baselines (in ``work``) and ``variants`` (label, path).

    A variant path is an export folder (measured in onnxruntime) or a model folder (in PyTorch).
    ``log``, an `EventLog`, gets a ``report_step`` event as each step starts (it takes minutes).

    Returns:
        ``{"rows": [...], "config", "provenance", "task", "metric"}``; each row has label, kind,
        path, size_bytes, parameters, latency per batch size, the task metric, its share of the
        original's (``of_original``), fidelity, and speed and size against optimum's int8 (and
        O2 int8); with ``config.suite``, ``suite``; for a causal LM, ``generation``.
    """
    from ..evaluation import EvaluateConfig, load_split

    start = time.perf_counter()
    generates = check_request(original, config) == "text-generation"

    def step(text: str) -> None:
        if log is not None:
            log.emit("report_step", step=text)

    runners: list[Backend] = [TorchBackend(original, "original")]
    task = runners[0].task
    if config.baselines:
        step("exporting the baselines the way optimum does (ONNX fp32, then int8)")
        for label, folder in optimum_baselines(original, work / "baselines", task).items():
            if not config.fp32_baselines and not generates and label in (BASELINE_FP32, BASELINE_O2_FP32):
                continue
            runners.append(OnnxBackend(folder, label, threads=config.threads, pooling=original.pooling))
    notes: dict[str, str] = {}
    if config.baselines and generates:
        step("building the original with onnxruntime-genai's builder (int4, its defaults)")
        builder, notes[BASELINE_GENAI] = genai_builder_baseline(original, work / "baselines", config)
        if builder is not None:
            runners.append(GenaiBackend(builder, BASELINE_GENAI, threads=config.threads))
    for label, path in variants:
        runner = load_backend(path, label, threads=config.threads, pooling=original.pooling)
        if runner.task != task:
            raise CompressError(f"{label} computes {runner.task}, the original {task}; compare like with like")
        runners.append(runner)
    if len({r.label for r in runners}) != len(runners):
        raise CompressError("two rows have the same name; name the variants apart (--names)")

    split = load_split(EvaluateConfig(data=config.data, train_size=config.train_size, test_size=config.test_size,
                                      max_length=config.max_length), need_labels=task != "text-generation")
    step(f"latency of {len(runners)} rows, taking turns: batch {', '.join(map(str, config.batch_sizes))}, "
         f"sequence {config.seq_len}, {config.warmup} warm-up + {config.repeats} timed runs each")
    timings = latency(runners, config, split[2][:64])
    rows = []
    for runner in runners:
        step(f"{runner.label}: task metric on {config.data}")
        metric = task_metric(runner, split, config)
        rows.append({"label": runner.label, "kind": runner.kind, "path": runner.path, "size_bytes": runner.size_bytes,
                     "parameters": runner.parameters, "latency": timings[runner.label], **metric})
    if config.suite:
        step_suite(runners, rows, config, step)
    if generates:
        step_generation(runners, rows, config, step)
    compare(rows, task, largest=str(max(config.batch_sizes)))
    return {"task": task, "metric": rows[0]["metric"], "rows": rows, "config": config.to_dict(),
            "provenance": {**provenance(config), "baselines": notes}, "seconds": round(time.perf_counter() - start, 1)}


def compare(rows: list[dict[str, Any]], task: str, *, largest: str) -> None:
    """Each row against the first (the original): fidelity and its share of the task metric;
    and against optimum's int8, where there is one: speed at the ``largest`` batch, and size;
    a causal LM's decode speed and size also against optimum's fp32 (with its KV cache).
    The rows' raw outputs are dropped once compared."""
    base = rows[0]
    int8 = next((r for r in rows if r["label"] == BASELINE_INT8), None)
    fp32 = next((r for r in rows if r["label"] == BASELINE_FP32), None)
    best = next((r for r in rows if r["label"] == BASELINE_O2_INT8), None)
    for row in rows:
        row["fidelity"] = (None if row is base else row["generation"]["greedy_agreement"] if "generation" in row
                           else fidelity_to(base, row, task))
        higher_is_better = row["metric"] != "perplexity"
        row["of_original"] = (row["value"] / base["value"]) if higher_is_better else (base["value"] / row["value"])
        if int8 is not None:
            row["speedup_vs_optimum_int8"] = int8["latency"][largest]["p50_ms"] / row["latency"][largest]["p50_ms"]
            row["size_vs_optimum_int8"] = row["size_bytes"] / int8["size_bytes"]
        if best is not None:  # the strongest baseline: what a careful user ships without compress
            row["speedup_vs_optimum_o2_int8"] = best["latency"][largest]["p50_ms"] / row["latency"][largest]["p50_ms"]
            row["speedups_vs_optimum_o2_int8"] = {b: best["latency"][b]["p50_ms"] / lat["p50_ms"]
                                                  for b, lat in row["latency"].items()}
            row["size_vs_optimum_o2_int8"] = row["size_bytes"] / best["size_bytes"]
        if fp32 is not None and "generation" in row:  # a causal LM's targets are set against optimum's fp32 with past
            rate, fp32_rate = row["generation"]["decode_tokens_per_s"], fp32["generation"]["decode_tokens_per_s"]
            row["generation"]["decode_vs_optimum_fp32"] = rate / fp32_rate
            row["generation"]["size_vs_optimum_fp32"] = row["size_bytes"] / fp32["size_bytes"]
    for row in rows:
        row.pop("outputs", None)
