"""The analysis stage: ``model, record = analyze(model, AnalyzeConfig(...))``."""

from __future__ import annotations

import time

from ..data import calibration_texts
from ..errors import ConfigError
from ..models import LoadedModel, unique_parameters
from ..record import StageRecord
from .config import AnalyzeConfig
from .grouping import plan_string, recommend_grouping

# plan_string belongs to the grouping (grouping.py); it stays importable from here for older code.
__all__ = [
    "activation_similarity",
    "analyze",
    "model_summary",
    "plan_string",
    "removable_layers",
    "similarity_for_grouping",
]


def similarity_for_grouping(metrics: dict, metric: str) -> list[list[float]]:
    """The ``L x L`` similarity matrix (higher = more alike) that drives the grouping."""
    if metric == "cka":
        return metrics["activations"]["cka"]
    if metric == "angular":
        return [[1.0 - d for d in row] for row in metrics["activations"]["angular_distance"]]
    if metric == "aligned-weight":
        return metrics["weights"]["aligned_mean"]
    return metrics["weights"]["raw_mean"]


def analyze(loaded: LoadedModel, config: AnalyzeConfig) -> tuple[LoadedModel, StageRecord]:
    """Measure how similar the model's layers are and recommend a sharing plan.

    Args:
        loaded: The model (see `compressor.models.load_model`).
        config: What to measure and on which text.

    Returns:
        The model, unchanged, and a record whose ``metrics`` hold: ``model`` (family and
        geometry), ``weights`` (raw and aligned cosine per sublayer; see `weight_similarity`),
        ``activations`` (CKA, angular distance, Block Influence), ``grouping`` (the best
        contiguous partition and its score for every group count, and the recommended one; a
        `Grouping` as a dict) and ``removable_layers`` (lowest Block Influence first).

    Raises:
        ConfigError: more groups than layers, or a model without a tokenizer for activations.
        DataError: an unreadable or empty calibration file.
    """
    start = time.perf_counter()
    n = len(loaded.adapter.blocks(loaded.model))
    if config.groups is not None and config.groups > n:
        raise ConfigError(f"--groups {config.groups} is more than the model's {n} layers")
    if config.validate > n - 1:  # every group count below the layer count shares something
        raise ConfigError(f"--validate {config.validate}: a {n}-layer model has {n - 1} plans that share layers",
                          option="validate")
    # Read the data before the slow part, so that a bad file fails at once.
    texts, held_out = None, None
    if config.activations or config.validate:
        texts = calibration_texts(config.data, text_column=config.text_column, encoding=config.encoding,
                                  limit=config.max_samples + (HELD_OUT if config.validate else 0))
        if config.validate:  # the plans are measured on text the similarities never saw
            n = max(MIN_HELD_OUT, min(HELD_OUT, len(texts) // 4))
            texts, held_out = texts[:-n][: config.max_samples], texts[-n:]

    metrics: dict = {"model": model_summary(loaded)}
    timings = {}
    if config.weights:
        from .weights import weight_similarity

        t = time.perf_counter()
        metrics["weights"] = weight_similarity(loaded.model, loaded.adapter)
        timings["weights"] = time.perf_counter() - t
    if config.activations:
        t = time.perf_counter()
        metrics["activations"] = activation_similarity(loaded, texts, config)
        timings["activations"] = time.perf_counter() - t
        metrics["removable_layers"] = removable_layers(metrics["activations"]["block_influence"], config.removable)

    similarity = similarity_for_grouping(metrics, config.metric)
    metrics["grouping"] = recommend_grouping(similarity, config.metric, config.groups).to_dict()
    if config.validate:
        from .validate import validate_plans

        t = time.perf_counter()
        metrics["validation"] = validate_plans(loaded, metrics, config.validate, held_out, batch_size=config.batch_size,
                                               max_length=config.max_length, device=config.device)
        timings["validation"] = time.perf_counter() - t
    metrics["seconds"] = timings
    record = StageRecord.build("analyze", config, before=unique_parameters(loaded.model), metrics=metrics,
                               started=start)
    return loaded, record


#: Texts held out for ``--validate`` (at most; a quarter of a smaller set, at least `MIN_HELD_OUT`).
HELD_OUT = 64
MIN_HELD_OUT = 8


def model_summary(loaded: LoadedModel) -> dict:
    """The ``model`` entry of an analysis: name, family and geometry."""
    geometry = loaded.geometry
    return {
        "name": loaded.name,
        "source": loaded.source,
        "model_type": loaded.model.config.model_type,
        "family": loaded.adapter.family,
        "num_layers": len(loaded.adapter.blocks(loaded.model)),
        "hidden_size": geometry.hidden_size,
        "num_heads": geometry.num_heads,
        "num_kv_heads": geometry.num_kv_heads,
        "intermediate_size": geometry.intermediate_size,
    }


def activation_similarity(loaded: LoadedModel, texts: list[str], config: AnalyzeConfig) -> dict:
    """The ``activations`` entry of an analysis: CKA, angular distance and Block Influence on ``texts``."""
    from .activations import angular_distance, collect_block_outputs, linear_cka

    captured = collect_block_outputs(
        loaded,
        texts,
        max_length=config.max_length,
        batch_size=config.batch_size,
        max_tokens=config.max_tokens,
        device=config.device,
        seed=config.seed,
    )
    return {
        "num_texts": len(texts),
        "num_tokens": captured.num_tokens,
        "tokens_compared": int(captured.outputs[0].shape[0]),
        "left_out": captured.left_out,
        "cka": linear_cka(captured.outputs).tolist(),
        "angular_distance": angular_distance(captured.outputs).tolist(),
        "block_influence": captured.block_influence.tolist(),
    }


def removable_layers(block_influence: list[float], count: int) -> list[dict]:
    """The ``count`` layers with the lowest Block Influence, lowest first (ties in layer order)."""
    order = sorted(range(len(block_influence)), key=lambda i: block_influence[i])
    return [{"layer": i, "block_influence": block_influence[i]} for i in order[:count]]
