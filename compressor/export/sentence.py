"""The sentence-transformers layout of an encoder export, and its check through
sentence-transformers itself.

``SentenceTransformer(folder, backend="onnx")`` runs ``model.onnx`` (at the folder's root, where
optimum's ``ORTModelForFeatureExtraction`` also finds it) as its Transformer module and then the
modules ``modules.json`` lists; without that file it falls back to mean pooling and no
Normalize, silently. So every encoder export writes the pipeline the model was made with:
``modules.json``, ``1_Pooling/config.json`` (the model's pooling), ``2_Normalize`` when its
embeddings are normalized, ``sentence_bert_config.json`` and ``config_sentence_transformers.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..io import write_text_atomic
from ..models import LoadedModel
from ..models.pooling import pool

#: fp32 embeddings through sentence-transformers against PyTorch's.
MIN_COSINE_FP32 = 0.9999
NORM_TOLERANCE = 1e-3


def _source_json(loaded: LoadedModel, name: str) -> dict[str, Any]:
    """``name`` from the model's own folder or the original's, where either has it."""
    for folder in (loaded.source, loaded.origin):
        file = Path(str(folder)) / name
        if folder and file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return data
    return {}


def write_sentence_layout(folder: Path, loaded: LoadedModel, hidden_size: int, max_length: int | None) -> list[str]:
    """Write the sentence-transformers files into ``folder``; the module types, in order."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if loaded.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": loaded.pooling == "cls",
               "pooling_mode_mean_tokens": loaded.pooling == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": loaded.pooling == "last", "include_prompt": True}
    write_text_atomic(folder / "1_Pooling" / "config.json", json.dumps(pooling, indent=2) + "\n")
    write_text_atomic(folder / "modules.json", json.dumps(modules, indent=2) + "\n")
    bert = _source_json(loaded, "sentence_bert_config.json")
    source_limit = bert.get("max_seq_length")
    bert = {"max_seq_length": min(x for x in (source_limit, max_length) if x) if (source_limit or max_length) else None,
            "do_lower_case": bool(bert.get("do_lower_case", False))}
    write_text_atomic(folder / "sentence_bert_config.json", json.dumps(bert, indent=2) + "\n")
    st = _source_json(loaded, "config_sentence_transformers.json")
    st = {"model_type": "SentenceTransformer", "prompts": st.get("prompts", {}),
          "default_prompt_name": st.get("default_prompt_name"),
          "similarity_fn_name": st.get("similarity_fn_name") or "cosine", "__version__": _versions()}
    write_text_atomic(folder / "config_sentence_transformers.json", json.dumps(st, indent=2) + "\n")
    return [m["type"].rsplit(".", 1)[-1] for m in modules]


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sentence_transformers", "transformers", "pytorch"):
        try:
            out[name] = version({"pytorch": "torch", "sentence_transformers": "sentence-transformers"}.get(name, name))
        except PackageNotFoundError:
            out[name] = None
    return out


def reference_embeddings(model, loaded: LoadedModel, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """The PyTorch model's sentence embeddings: its pooling, then normalization if it has one."""
    names = set(model.forward.__code__.co_varnames)
    with torch.no_grad():
        out = model(**{k: v for k, v in enc.items() if k in names})
    hidden = out["last_hidden_state"]  # a transformers output or `SentenceEmbedding`'s dict
    emb = pool(hidden.float(), enc["attention_mask"], loaded.pooling)
    return torch.nn.functional.normalize(emb, dim=-1) if loaded.normalize else emb


def check_sentence_transformers(folder: Path, model, loaded: LoadedModel, texts: list[str],
                                min_cosine: float | None) -> dict[str, Any]:
    """Load ``folder`` with ``SentenceTransformer(folder, backend="onnx")`` and compare its
    ``encode`` with the PyTorch model's sentence embeddings on ``texts``.

    Thresholds: `compare_embeddings`.

    Raises:
        ExportError: sentence-transformers does not load the folder, or its embeddings stray.
    """
    import warnings

    from ..errors import first_line
    from ..io import quiet

    try:
        with warnings.catch_warnings(), quiet("sentence_transformers", "optimum", "transformers"):
            warnings.simplefilter("ignore")
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(folder), backend="onnx", device="cpu")
            got = st.encode(texts, convert_to_tensor=True, batch_size=16).float()
    except Exception as e:  # noqa: BLE001 - whatever sentence-transformers raises, the export is unusable
        raise ExportError(f"sentence-transformers cannot run the export: {first_line(e, with_type=True)}") from None
    enc = st.tokenizer(texts, padding=True, truncation=True, max_length=st.max_seq_length, return_tensors="pt")
    return {"loaded_with": "sentence_transformers.SentenceTransformer(backend='onnx')", "texts": len(texts),
            **compare_embeddings(got, reference_embeddings(model, loaded, dict(enc)), loaded, min_cosine,
                                 "sentence-transformers' embeddings of the export")}


def compare_embeddings(got: torch.Tensor, ref: torch.Tensor, loaded: LoadedModel, min_cosine: float | None,
                       what: str) -> dict[str, Any]:
    """Sentence embeddings ``got`` against PyTorch's ``ref``: fp32 (``min_cosine`` ``None``) needs
    every cosine >= `MIN_COSINE_FP32`, a quantized export the mean cosine ``min_cosine``; a model
    that normalizes needs norms 1 within `NORM_TOLERANCE`.

    Raises:
        ExportError: naming ``what`` strayed, and by how much.
    """
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).numpy()
    norms = got.norm(dim=-1).numpy()
    which, low, need = ("lowest", cos.min(), MIN_COSINE_FP32) if min_cosine is None else ("mean", cos.mean(), min_cosine)
    if low < need:
        raise ExportError(f"{what} stray from PyTorch's: {which} cosine {low:.6f} < {need}"
                          + (" (--min-cosine)" if min_cosine is not None else ""))
    if loaded.normalize and np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise ExportError(f"{what} have norms {norms.min():.4f}..{norms.max():.4f}, not 1 as the model's Normalize "
                          "makes them")
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "norm_min": float(norms.min()),
            "norm_max": float(norms.max()), "normalize": loaded.normalize,
            "needs": {"min_cosine": need} if min_cosine is None else {"mean_cosine": need}, "passed": True}


def check_pooled_graph(file: Path, model, loaded: LoadedModel, texts: list[str],
                       min_cosine: float | None) -> dict[str, Any]:
    """Run the graph's ``sentence_embedding`` output in a plain ``onnxruntime.InferenceSession``
    (no optimum, no Python pooling: what a C#, Java or JavaScript caller does) and compare it
    with the PyTorch model's sentence embeddings (`compare_embeddings`).

    Raises:
        ExportError: the embeddings stray.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    feed = {k: v.numpy() for k, v in enc.items() if k in wanted}
    got = torch.from_numpy(session.run(["sentence_embedding"], feed)[0]).float()
    return {"loaded_with": "onnxruntime.InferenceSession", "output": "sentence_embedding", "texts": len(texts),
            **compare_embeddings(got, reference_embeddings(model, loaded, dict(enc)), loaded, min_cosine,
                                 "the graph's sentence_embedding values")}
