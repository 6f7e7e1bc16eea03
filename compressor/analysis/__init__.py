"""Layer-similarity analysis: weights (raw and aligned), activations, and a sharing plan."""

from .stage import analyze, plan_string, similarity_for_grouping
from .config import METRICS, AnalyzeConfig
from .grouping import best_partition, best_partitions, group_fit, partition_score

__all__ = [
    "METRICS",
    "AnalyzeConfig",
    "analyze",
    "best_partition",
    "best_partitions",
    "group_fit",
    "partition_score",
    "plan_string",
    "similarity_for_grouping",
]
