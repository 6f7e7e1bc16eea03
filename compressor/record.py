"""The result record every stage returns: `model, record = stage(model, config)`."""

from __future__ import annotations

import dataclasses
import time
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

    @classmethod
    def build(cls, stage: str, config: Any, *, before: tuple[int, int], after: tuple[int, int] | None = None,
              metrics: dict[str, Any] | None = None, started: float | None = None) -> StageRecord:
        """The record of a stage, the one way every stage makes it.

        Args:
            stage: The stage's name.
            config: Its `StageConfig` (or the config as a dict).
            before: ``(unique parameters, bytes)`` of the model the stage received.
            after: The same of the model it returned; ``None``: unchanged.
            metrics: Its results.
            started: ``time.perf_counter()`` when it started; ``seconds`` is the time since.
        """
        after = after or before
        return cls(stage=stage, config=config if isinstance(config, dict) else config.to_dict(),
                   params_before=before[0], params_after=after[0], bytes_before=before[1], bytes_after=after[1],
                   metrics=metrics or {}, seconds=0.0 if started is None else time.perf_counter() - started)
