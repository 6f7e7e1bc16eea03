"""What a shared model records about its sharing (`LoadedModel.sharing`, and ``compress.json``
in a checkpoint), and how LoRA parameters are named. No torch here: the CLI imports it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ModelLoadError


#: The parameter-name prefix of a LoRA factor (``...query.lora_A.weight``), as peft names them.
LORA_PREFIX = "lora_"


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter (by its name in ``named_parameters``) is a LoRA factor."""
    return any(part.startswith(LORA_PREFIX) for part in name.split("."))


@dataclass
class SharingManifest:
    """What a shared model records about its sharing, to be rebuilt from a checkpoint.

    Attributes:
        plan: The groups of layer indices (singletons keep their dense weights).
        modules: Module paths, inside a block, that the members of a group share.
        roles: The adapter roles those modules carry (``query``, ``ffn_in``...).
        init: How the shared weights started (`ShareConfig.init`).
        lora_rank: Rank of each member's delta (0: none; capped per matrix at its smaller side).
        lora_alpha: Delta scaling numerator (``None``: the rank).
        lora_init: How the deltas started (``svd`` or ``zero``).
    """

    plan: list[list[int]]
    modules: list[str]
    roles: list[str] = field(default_factory=list)
    init: str = "aligned-mean"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_init: str = "svd"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharingManifest:
        """Read a manifest back (a missing optional key takes its default; unknown keys are ignored,
        so a checkpoint written by a later version still loads).

        Raises:
            ModelLoadError: not a manifest (no plan or modules, or not an object).
        """
        names = cls.__dataclass_fields__
        plan, modules = (data.get("plan"), data.get("modules")) if isinstance(data, dict) else (None, None)
        if not (isinstance(plan, list) and all(isinstance(g, list) for g in plan) and isinstance(modules, list)):
            raise ModelLoadError("the sharing manifest names no plan (a list of layer groups) and shared modules")
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_plan(self, plan: list[list[int]]) -> SharingManifest:
        """The same sharing over other groups (after layers were dropped and renumbered)."""
        return replace(self, plan=plan)
