"""Sharing plans as data: which layers share weights, and the grouping an analysis recommends.

The analysis stage finds the partitions (`compressor.analysis.grouping`) and writes them as a
`Grouping` (the ``grouping`` entry of ``analysis.json``); the sharing stage reads its plan from
one. Both stand on this module, not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Similarities a grouping can be driven by (`compress analyze --metric`, `compress share --plan-metric`).
METRICS = ("cka", "angular", "aligned-weight", "raw-weight")


@dataclass
class Partition:
    """One partition of the layers into contiguous groups, and how well it keeps their similarity.

    Attributes:
        groups: Lists of layer indices, in order (``[[0, 1], [2], [3, 4]]``).
        score: Its `partition_score` (1 = every layer alone, the identity).
    """

    groups: list[list[int]]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "score": self.score}


@dataclass
class Grouping:
    """The grouping an analysis recommends: the best partition for every group count, and the pick.

    Its `to_dict` is the ``grouping`` entry of an analysis record (``analysis.json``), which
    `compressor.sharing.parse_plan` and users' files read; `from_dict` reads that entry back.

    Attributes:
        metric: The similarity that scored the partitions (see `AnalyzeConfig.metric`).
        recommended_groups: The group count recommended.
        by_groups: The best contiguous partition for every group count from 1 to the layers.
    """

    metric: str
    recommended_groups: int
    by_groups: dict[int, Partition]

    @property
    def recommended(self) -> Partition:
        """The best partition into `recommended_groups` groups."""
        return self.by_groups[self.recommended_groups]

    @property
    def plan(self) -> str:
        """The recommended partition as ``compress share --plan`` takes it (``"0-1,2-3"``)."""
        return plan_string(self.recommended.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "recommended_groups": self.recommended_groups,
            "recommended": self.recommended.to_dict(),
            "plan": self.plan,
            "by_groups": {str(k): p.to_dict() for k, p in self.by_groups.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grouping:
        """The grouping from its `to_dict` form (``metrics["grouping"]`` of an analysis record)."""
        return cls(
            metric=data["metric"],
            recommended_groups=data["recommended_groups"],
            by_groups={int(k): Partition(p["groups"], p["score"]) for k, p in data["by_groups"].items()},
        )


def plan_string(groups: list[list[int]]) -> str:
    """``[[0, 1], [2, 3]]`` -> ``"0-1,2-3"`` (the form ``compress share --plan`` takes)."""
    return ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)
