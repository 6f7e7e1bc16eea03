"""Verification beside the export (as optimum's ``validate_model_outputs`` stands beside its
``export``): the storage check (a shared weight stored once, every int8 projection quantized),
the check against PyTorch through the optimum class that loads the folder, the KV-cache probe
and the greedy generation check. Each raises `ExportError` with one line naming the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import ExportError, first_line
from ..io import quiet
from ..onnx.graph import stored_elements, weight_matmuls
from ..quantization.config import QuantMethod
from .config import ORT_CLASSES, ExportConfig
from .optimum import load_ort

#: Slack on "a shared weight is stored once": the odd folded constant is stored too
#: (quantization scales and zero points are not counted, see `stored_elements`).
_STORAGE_SLACK = 0.01


class OptimumCacheError(ExportError):
    """optimum's ORTModelForCausalLM cannot run this family's KV cache (it sizes the cache by
    the query heads for families it does not list as grouped-query: Phi-3, Gemma 2 in
    optimum-onnx 0.1)."""


@contextlib.contextmanager
def ort_errors_quiet(quiet_now: bool):
    """onnxruntime's own log lines of a failing kernel kept off stderr for the block."""
    import onnxruntime as ort

    if quiet_now:
        ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        if quiet_now:
            ort.set_default_logger_severity(2)  # onnxruntime's default, warnings


def check_storage(path: Path, model, params: int, quantize: QuantMethod | None) -> tuple[int, dict[str, int]]:
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
    if quantize is not None and quantize.every_projection and matmuls["float_on_weights"]:
        raise ExportError(f"{matmuls['float_on_weights']} of {matmuls['on_weights']} projections kept a float weight "
                          "after quantization")
    return stored, matmuls


def _tied_output_embeddings(model) -> int:
    """Numbers of an LM head tied to the input embeddings. The exporter stores it twice (once
    for the lookup, once transposed for the head), as optimum's plain export does; that is the
    exporter's doing, not a shared layer coming apart, so the storage check allows for it."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight.data_ptr() != embeddings.weight.data_ptr():
        return 0
    return head.weight.numel()


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
                 quantize: QuantMethod | None, texts: list[str], adapter) -> dict[str, Any]:
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
