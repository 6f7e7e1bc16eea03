"""Generation figures of a causal LM: time to first token, decode tokens/s, peak memory and
greedy agreement with the original, for every row of a report.

Batch 1, greedy, a prompt of ``config.prompt_tokens`` real tokens and ``config.new_tokens`` new
ones. Each run is split where its first token's logits arrive: time to first token is the time
until then (the prefill), decode tokens/s the other ``new_tokens - 1`` over the rest of the same
run. Both halves come from one run (a separate one-token run and a difference of medians can be
noise alone, even negative, for a model whose steps take microseconds); the figures are medians
over ``generation_repeats`` runs. Rows take turns run by run, as the latency table's do, so that
a noisy machine slows them all alike.

For an ONNX row, ``generate``'s own PyTorch work between steps (the argmax, the stop check, the
growing mask) runs on one thread: with ``threads`` of them, PyTorch's workers and onnxruntime's
spinning ones take turns at the same cores between every two steps: on 2 cores an int4 export
of SmolLM2-135M took 19.0 ms a token that way and 11.4 ms with one PyTorch thread (fp32: about
35 ms either way).
A PyTorch row computes with PyTorch, so it keeps ``threads``.

Peak memory is measured in a fresh process per row (``python -m compressor.report.generation``):
one process's high-water mark cannot be split between rows that share it. The figure is the
process's peak resident set while it loads the row and generates once, and the part of it
above the interpreter with torch, transformers and onnxruntime imported (the row's own cost).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CompressError
from ..io import peak_rss_mib
from ..progress import TokenTicks
from .config import ReportConfig


def prompt(tokenizer, tokens: int) -> dict[str, torch.Tensor]:
    """``tokens`` tokens of real English text (the calibration text, repeated if it is short)."""
    from ..data import calibration_texts

    text = " ".join(calibration_texts(None))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    while ids.numel() < tokens:
        ids = torch.cat([ids, ids])
    ids = ids[:tokens].unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def greedy(model, enc: dict[str, torch.Tensor], new: int, pad_token_id, ticks: TokenTicks | None = None) -> torch.Tensor:
    """The ``new`` greedy tokens after the prompt (exactly ``new``: no early stop at EOS);
    ``ticks`` is told as each token's logits arrive."""
    from transformers import LogitsProcessorList

    extra = {"logits_processor": LogitsProcessorList([ticks])} if ticks is not None else {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=pad_token_id, **extra)
    return out[0, enc["input_ids"].shape[1]:]


def generation(runners: list, config: ReportConfig) -> dict[str, dict[str, Any]]:
    """``label -> {ttft_ms, decode_tokens_per_s, greedy_agreement}`` for each runner (in turns).

    ``greedy_agreement`` is the share of the new tokens equal, position by position, to the first
    runner's (the original's): 1.0 for an export that reproduces it.
    """
    models = [r.generator() for r in runners]
    inputs = [prompt(r.tokenizer, config.prompt_tokens) for r in runners]
    pads = [r.tokenizer.pad_token_id for r in runners]
    torch_threads = [config.threads if r.kind.startswith("PyTorch") else 1 for r in runners]
    previous = torch.get_num_threads()
    tokens = []
    try:
        for model, enc, pad, threads in zip(models, inputs, pads, torch_threads):  # also a warm-up
            torch.set_num_threads(threads)
            tokens.append(greedy(model, enc, config.new_tokens, pad))
        first: dict[str, list[float]] = {r.label: [] for r in runners}
        rest: dict[str, list[float]] = {r.label: [] for r in runners}
        for _ in range(config.generation_repeats):
            for runner, model, enc, pad, threads in zip(runners, models, inputs, pads, torch_threads):
                torch.set_num_threads(threads)
                arrived: list[float] = []  # when each token's logits were there
                start = time.perf_counter()
                greedy(model, enc, config.new_tokens, pad, TokenTicks(lambda: arrived.append(time.perf_counter())))
                end = time.perf_counter()
                first[runner.label].append(arrived[0] - start)
                rest[runner.label].append(end - arrived[0])
    finally:
        torch.set_num_threads(previous)
    result = {}
    for runner, out in zip(runners, tokens):
        ttft, steps = statistics.median(first[runner.label]), statistics.median(rest[runner.label])
        same = float((out == tokens[0]).float().mean()) if out.shape == tokens[0].shape else 0.0
        result[runner.label] = {"ttft_ms": ttft * 1e3, "greedy_agreement": same,
                                "decode_tokens_per_s": (config.new_tokens - 1) / max(steps, 1e-9)}
    return result


def peak_memory(runner, config: ReportConfig) -> dict[str, float]:
    """``{peak_rss_mib, model_rss_mib}`` of a fresh process that loads ``runner`` and generates once.

    Raises:
        CompressError: the process failed (its last line says why).
    """
    kind = "genai" if "onnxruntime-genai" in runner.kind else "onnx" if runner.kind.startswith("ONNX") else "torch"
    args = [sys.executable, "-m", "compressor.report.generation", kind, runner.path, str(config.threads),
            str(config.prompt_tokens), str(config.new_tokens)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompressError(f"measuring the peak memory of {runner.label} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(kind: str, path: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """The child's side of `peak_memory`."""
    import onnxruntime  # noqa: F401  (imported before the baseline, as the report has it)
    import optimum.onnxruntime  # noqa: F401
    import transformers  # noqa: F401

    torch.set_num_threads(threads)
    before = peak_rss_mib()
    if kind == "torch":
        from ..models import load_model

        loaded = load_model(path)
        model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    elif kind == "genai":
        from .backends import GenaiBackend

        backend = GenaiBackend(path, "row", threads=threads)
        model, tokenizer = backend.generator(), backend.tokenizer
    else:
        from ..models.loading import load_tokenizer
        from .backends import load_generator

        model, tokenizer = load_generator(path, threads), load_tokenizer(path)
    greedy(model, prompt(tokenizer, prompt_tokens), new_tokens, tokenizer.pad_token_id)
    peak = peak_rss_mib()
    return {"peak_rss_mib": peak, "model_rss_mib": peak - before}


if __name__ == "__main__":  # python -m compressor.report.generation KIND PATH THREADS PROMPT NEW
    _kind, _path, *_numbers = sys.argv[1:]
    try:
        print(json.dumps(_measure(_kind, _path, *map(int, _numbers))))
    except Exception as e:  # the parent reports the last line
        from ..errors import first_line

        print(first_line(e, with_type=True), file=sys.stderr)
        sys.exit(1)
