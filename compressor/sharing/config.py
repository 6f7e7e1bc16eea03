"""Options of the sharing stage, and sharing plans."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import ROLES
from ..layer_groups import METRICS, Grouping
from ..config import StageConfig, TextOptions, check_choice, check_device, check_int, check_positive, choice
from ..errors import ConfigError

INITS = ("aligned-mean", "mean", "first")
LORA_INITS = ("svd", "zero")
#: Names ``--share`` accepts: the two sublayer families, or single roles.
SHARE_GROUPS = {"attention": ("query", "key", "value", "attn_out"), "ffn": ("ffn_gate", "ffn_in", "ffn_out")}


@dataclass
class ShareConfig(TextOptions, StageConfig):
    """How to merge layers into shared groups.

    Attributes:
        groups: Number of groups; the plan is the best contiguous partition by ``plan_metric``
            (see `compress analyze`). Give this or ``plan``.
        plan: The groups themselves: ``"0-1,2-3,4-5"`` (ranges or single layers, comma
            separated), a list of lists of layer indices, or the path of a JSON file holding
            such a list (or an ``analysis.json`` from `compress analyze`).
        analysis: An ``analysis.json`` from `compress analyze`: with ``groups``, the plan is
            its best contiguous partition into that many groups (by the similarity it was
            analyzed with) and no analysis runs.
        share: Which sublayers are shared: ``attention``, ``ffn`` or single roles (``query``,
            ``ffn_in``...). Each layer always keeps its own norms and biases.
        init: How the shared weight starts: ``aligned-mean`` (permute each member's FFN neurons
            and heads onto the group's first layer, a function-preserving change, then
            average), ``mean`` (average as stored) or ``first`` (the group's first layer).
        lora_rank: Rank of each layer's delta on every shared linear; 0 for none.
        lora_init: ``svd``: the delta starts as the truncated SVD of (the layer's aligned
            weight - the shared weight); ``zero``: plain LoRA, the delta starts at zero.
        lora_alpha: Delta scaling numerator (scaling = alpha / rank); default: the rank.
        plan_metric: Similarity that chooses the plan when only ``groups`` is given.
        fidelity: Measure how far the shared model is from the original on calibration text.
        max_samples: Texts used for the plan and the fidelity.
        max_length: Tokens per text.
        batch_size: Texts per forward pass.
        device: Torch device for the forward passes.
    """

    groups: int | None = None
    plan: str | list[list[int]] | None = None
    analysis: str | None = None
    share: list[str] = field(default_factory=lambda: ["attention", "ffn"])
    init: str = choice("aligned-mean", INITS)
    lora_rank: int = 0
    lora_init: str = choice("svd", LORA_INITS)
    lora_alpha: float | None = None
    plan_metric: str = choice("cka", METRICS)
    fidelity: bool = True
    max_samples: int = 64
    max_length: int = 128
    batch_size: int = 16
    device: str = "cpu"

    def __post_init__(self):
        if (self.groups is None) == (self.plan is None):
            raise ConfigError("give either --groups K or --plan, not both" if self.groups is not None
                              else "give --groups K or --plan \"0-1,2-3,...\"")
        check_int("groups", self.groups, 1, allow_none=True)
        if self.analysis is not None and self.groups is None:
            raise ConfigError("--analysis gives the plan for --groups K; add --groups, or pass the file as --plan "
                              "for the plan it recommends", option="analysis")
        if isinstance(self.share, str):
            self.share = [s.strip() for s in self.share.split(",") if s.strip()]
        self.share = list(self.share)
        if not self.share:
            raise ConfigError("--share needs at least one of: attention, ffn, or a sublayer role")
        for name in self.share:
            if name not in SHARE_GROUPS and name not in ROLES:
                raise ConfigError(f"--share: unknown sublayer {name!r}; use attention, ffn or one of {', '.join(ROLES)}")
        check_choice("init", self.init, INITS)
        check_choice("lora_init", self.lora_init, LORA_INITS)
        check_choice("plan_metric", self.plan_metric, METRICS)
        check_int("lora_rank", self.lora_rank, 0)
        check_positive("lora_alpha", self.lora_alpha, allow_none=True)
        for name in ("max_samples", "max_length", "batch_size"):
            check_positive(name, getattr(self, name))
        check_device(self.device)

    @property
    def shared_roles(self) -> tuple[str, ...]:
        roles = set()
        for name in self.share:
            roles.update(SHARE_GROUPS.get(name, (name,)))
        return tuple(r for r in ROLES if r in roles)


def parse_plan(plan: str | list, num_layers: int) -> list[list[int]]:
    """Turn a plan into sorted groups of layer indices and check it covers every layer once.

    Raises:
        ConfigError: a malformed plan, a plan file that does not parse, or a plan that skips,
            repeats or invents a layer.
    """
    if isinstance(plan, str):
        path = Path(plan)
        if plan.lstrip().startswith("["):  # the groups as JSON: [[0, 1], [2, 3]]
            try:
                groups = json.loads(plan)
            except ValueError as e:
                raise ConfigError(f"plan: {plan!r} is not a JSON list of groups: {e}") from None
        elif plan.endswith(".json") or path.is_file():
            groups = _plan_from_file(path)
        else:
            groups = _plan_from_string(plan)
    else:
        groups = plan
    if not isinstance(groups, list) or not all(isinstance(g, list) and g for g in groups):
        raise ConfigError("a plan is a list of non-empty groups of layer indices")
    seen: dict[int, int] = {}
    for g in groups:
        for layer in g:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ConfigError(f"plan: {layer!r} is not a layer index")
            if not 0 <= layer < num_layers:
                raise ConfigError(f"plan names layer {layer}, but the model has layers 0-{num_layers - 1}")
            if layer in seen:
                raise ConfigError(f"plan repeats layer {layer}")
            seen[layer] = 1
    missing = [i for i in range(num_layers) if i not in seen]
    if missing:
        raise ConfigError(f"plan skips layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}")
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def grouping_from_file(path: str | Path) -> Grouping:
    """The `Grouping` an ``analysis.json`` from `compress analyze` holds.

    Raises:
        ConfigError: no such file, not JSON, or no grouping in it.
    """
    data = _read_json(Path(path), "analysis file")
    try:
        return Grouping.from_dict(data["metrics"]["grouping"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"analysis file {path} holds no grouping (write one with `compress analyze -o`)",
                          option="analysis") from None


def _plan_from_string(text: str) -> list[list[int]]:
    groups = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                groups.append(list(range(lo, hi + 1)))
            else:
                groups.append([int(part)])
        except ValueError:
            raise ConfigError(f"plan: cannot read {part!r} in {text!r}; write groups like \"0-1,2-3,4-5\"") from None
    return groups


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None


def _plan_from_file(path: Path) -> list:
    data = _read_json(path, "plan file")
    if isinstance(data, dict):
        # an analysis.json from `compress analyze`, or {"plan": [[...], ...]}
        if "plan" in data and isinstance(data["plan"], list):
            return data["plan"]
        try:
            return data["metrics"]["grouping"]["recommended"]["groups"]
        except (KeyError, TypeError):
            raise ConfigError(f"plan file {path} holds no plan (a list of layer groups)") from None
    return data
