"""The analysis stage: ``model, record = analyze(model, AnalyzeConfig(...))``."""

from __future__ import annotations

import time

from ..data import calibration_texts
from ..errors import ConfigError
from ..models import LoadedModel, unique_parameters
from ..record import StageRecord
from .config import AnalyzeConfig
from .grouping import best_partitions


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
        contiguous partition and its score for every group count, and the recommended one) and
        ``removable_layers`` (lowest Block Influence first).

    Raises:
        ConfigError: more groups than layers, or a model without a tokenizer for activations.
        DataError: an unreadable or empty calibration file.
    """
    start = time.perf_counter()
    adapter, model = loaded.adapter, loaded.model
    geometry = loaded.geometry
    n = len(adapter.blocks(model))
    if config.groups is not None and config.groups > n:
        raise ConfigError(f"--groups {config.groups} is more than the model's {n} layers")
    # Read the data before the slow part, so that a bad file fails at once.
    texts = None
    if config.activations:
        texts = calibration_texts(config.data, text_column=config.text_column, encoding=config.encoding,
                                  limit=config.max_samples)

    metrics: dict = {
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            "model_type": model.config.model_type,
            "family": adapter.family,
            "num_layers": n,
            "hidden_size": geometry.hidden_size,
            "num_heads": geometry.num_heads,
            "num_kv_heads": geometry.num_kv_heads,
            "intermediate_size": geometry.intermediate_size,
        }
    }
    timings = {}
    if config.weights:
        from .weights import weight_similarity

        t = time.perf_counter()
        metrics["weights"] = weight_similarity(model, adapter)
        timings["weights"] = time.perf_counter() - t
    if config.activations:
        from .activations import angular_distance, collect_block_outputs, linear_cka

        t = time.perf_counter()
        outputs, influence, num_tokens = collect_block_outputs(
            loaded,
            texts,
            max_length=config.max_length,
            batch_size=config.batch_size,
            max_tokens=config.max_tokens,
            device=config.device,
            seed=config.seed,
        )
        metrics["activations"] = {
            "num_texts": len(texts),
            "num_tokens": num_tokens,
            "tokens_compared": int(outputs[0].shape[0]),
            "cka": linear_cka(outputs).tolist(),
            "angular_distance": angular_distance(outputs).tolist(),
            "block_influence": influence.tolist(),
        }
        del outputs
        timings["activations"] = time.perf_counter() - t
        order = sorted(range(n), key=lambda i: influence[i].item())
        metrics["removable_layers"] = [
            {"layer": i, "block_influence": float(influence[i])} for i in order[: config.removable]
        ]

    similarity = similarity_for_grouping(metrics, config.metric)
    by_groups = {k: {"groups": g, "score": score} for k, (g, score) in best_partitions(similarity).items()}
    recommended = config.groups or (n + 1) // 2  # about half the layers
    metrics["grouping"] = {
        "metric": config.metric,
        "recommended_groups": recommended,
        "recommended": by_groups[recommended],
        "plan": plan_string(by_groups[recommended]["groups"]),
        "by_groups": {str(k): v for k, v in by_groups.items()},
    }
    metrics["seconds"] = timings
    params, nbytes = unique_parameters(model)
    record = StageRecord(
        stage="analyze",
        config=config.to_dict(),
        params_before=params,
        params_after=params,
        bytes_before=nbytes,
        bytes_after=nbytes,
        metrics=metrics,
        seconds=time.perf_counter() - start,
    )
    return loaded, record


def plan_string(groups: list[list[int]]) -> str:
    """``[[0, 1], [2, 3]]`` -> ``"0-1,2-3"`` (the form ``compress share --plan`` takes)."""
    return ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)
