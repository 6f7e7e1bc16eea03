"""The result record every stage returns: `model, record = stage(model, config)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageRecord:
    """What a stage did, as data (a pipeline's report is the list of these).

    Attributes:
        stage: The stage's name (`analyze`, `share`, ...).
        config: The stage config as a JSON-ready dict.
        params_before: Unique parameters of the model the stage received.
        params_after: Unique parameters of the model it returned.
        bytes_before: Bytes of those unique parameters before.
        bytes_after: Bytes of those unique parameters after.
        metrics: Stage-specific results (for `analyze`, the whole analysis).
        seconds: Wall-clock time the stage took.
    """

    stage: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
