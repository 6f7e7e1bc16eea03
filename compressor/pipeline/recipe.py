"""Recipes: the stages of a pipeline, in order, with their options, read from YAML.

A recipe::

    name: demo                 # optional; default: the file name without .yaml
    description: ...           # optional
    model: bundled             # optional; the model when none is given elsewhere
    stages:
      - analyze: {groups: 3}
      - share:
          groups: 3
          lora_rank: 32        # the option names of the stage's config (lora-rank works too)
      - finetune: {data: movie-snippets, max_minutes: 3}
      - evaluate               # a stage with its default options

Every stage's options are built into the same `StageConfig` the command uses, before anything
runs, so a misspelt option, a bad value or an unknown stage is reported with its line in the
YAML file. A string option that names an existing file or folder relative to the recipe's
folder (``data: texts.csv``) is made absolute, so the recipe means the same from anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import StageConfig, flag
from ..errors import ConfigError, first_line

TOP_LEVEL_KEYS = ("name", "description", "model", "stages")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class StageSpec:
    """One stage of a recipe.

    Attributes:
        name: The stage's registry name (`analyze`, `share`, ...).
        config: Its options, checked.
        line: Its line in the YAML file (1-based), for messages; ``None`` when not from YAML.
    """

    name: str
    config: StageConfig
    line: int | None = None

    def normalized(self) -> dict[str, Any]:
        """The stage as plain data: what a job's hash covers and what a worker rebuilds."""
        return {"stage": self.name, "options": self.config.to_dict()}


@dataclass
class Recipe:
    """A validated recipe.

    Attributes:
        name: Short name (job names and reports use it).
        stages: The stages in order.
        source: Where it was read (a file, or ``manifest.yaml:12`` for an inline recipe).
        model: The model to use when the command or manifest names none.
        description: Free text.
    """

    name: str
    stages: list[StageSpec]
    source: str = "<recipe>"
    model: str | None = None
    description: str = ""

    def normalized(self) -> list[dict[str, Any]]:
        """The stages as plain data (every option, defaults included)."""
        return [s.normalized() for s in self.stages]


# ---- YAML with line numbers -----------------------------------------------------------------


def compose_yaml(text: str, source: str):
    """Parse YAML into a node tree (nodes know their line); a syntax error names its line.

    Returns ``None`` for an empty document.
    """
    import yaml

    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or first_line(e)
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None:  # where the unclosed thing began
            problem += f" ({context} that starts on line {context_mark.line + 1})"
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


def read_yaml_file(path: str | Path, what: str):
    """Read and compose a YAML file; a missing or unreadable file is a `ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    return compose_yaml(text, str(path))


def line_of(node) -> int:
    """The 1-based line a YAML node starts on."""
    return node.start_mark.line + 1


def plain(node) -> Any:
    """A YAML node as Python data (ints, floats, bools and null resolved as YAML does)."""
    from yaml.constructor import SafeConstructor

    return SafeConstructor().construct_object(node, deep=True)


def mapping_items(node, source: str, what: str) -> dict[str, tuple[Any, Any]]:
    """``key -> (key node, value node)`` of a YAML mapping; anything else, or a repeated key, is an error."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{line_of(node)}: {what} must be a mapping (key: value lines)")
    items: dict[str, tuple[Any, Any]] = {}
    for key_node, value_node in node.value:
        key = plain(key_node)
        if not isinstance(key, str):
            raise ConfigError(f"{source}:{line_of(key_node)}: {what}: a key must be a name, got {key!r}")
        if key in items:
            raise ConfigError(f"{source}:{line_of(key_node)}: {what}: {key!r} is given twice "
                              f"(first on line {line_of(items[key][0])})")
        items[key] = (key_node, value_node)
    return items


def check_keys(items: dict, allowed: tuple[str, ...], source: str, what: str) -> None:
    """Reject keys a mapping does not have, pointing at the first one's line."""
    for key, (key_node, _) in items.items():
        if key not in allowed:
            raise ConfigError(f"{source}:{line_of(key_node)}: {what}: unknown key {key!r}; known: {', '.join(allowed)}")


def resolve_path(value: Any, base: Path) -> Any:
    """A relative string that names an existing file or folder under ``base`` -> its absolute path;
    so too each item of a list, and each item of a comma-separated list (``data: a.csv,b.csv``)."""
    if isinstance(value, list):
        return [resolve_path(item, base) for item in value]
    if isinstance(value, str) and "," in value and resolve_path_item(value, base) == value:
        return ",".join(resolve_path_item(item.strip(), base) for item in value.split(","))
    return resolve_path_item(value, base)


def resolve_path_item(value: Any, base: Path) -> Any:
    """One relative string that names an existing file or folder under ``base`` -> its absolute path."""
    if isinstance(value, str) and value and not Path(value).is_absolute():
        candidate = base / value
        try:
            if candidate.exists():
                return str(candidate.resolve())
        except OSError:  # a name too long to be a path, and the like
            pass
    return value


# ---- recipes --------------------------------------------------------------------------------


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        ConfigError: the file is missing or not valid YAML, or a stage or option is unknown or
            invalid (the message starts with ``file:line:``).
    """
    path = Path(path)
    node = read_yaml_file(path, "recipe")
    if node is None:
        raise ConfigError(f"{path}: the recipe is empty; it needs a list of stages")
    return parse_recipe(node, source=str(path), base=path.resolve().parent, default_name=path.stem)


def parse_recipe(node, *, source: str, base: Path, default_name: str) -> Recipe:
    """Validate a recipe given as a YAML node (a file's document, or a mapping inside a manifest).

    Args:
        node: The recipe's mapping node.
        source: The file it is in, for messages.
        base: The folder relative paths are read from.
        default_name: The name when the recipe gives none.
    """
    import yaml

    items = mapping_items(node, source, "recipe")
    check_keys(items, TOP_LEVEL_KEYS, source, "recipe")
    name = _string(items, "name", source) or default_name
    if not _NAME.match(name):
        raise ConfigError(f"{source}: recipe name {name!r} must be letters, digits, '.', '_' or '-'")
    model = _string(items, "model", source)
    if model is not None:
        model = resolve_path(model, base)
    if "stages" not in items:
        raise ConfigError(f"{source}:{line_of(node)}: the recipe has no 'stages' list")
    stages_node = items["stages"][1]
    if not isinstance(stages_node, yaml.SequenceNode) or not stages_node.value:
        raise ConfigError(f"{source}:{line_of(stages_node)}: 'stages' must be a non-empty list of stages")
    stages = [_parse_stage(item, source, base) for item in stages_node.value]
    recipe = Recipe(name=name, stages=stages, source=source, model=model,
                    description=_string(items, "description", source) or "")
    check_order(recipe)
    check_holdout(recipe)
    return recipe


def _string(items: dict, key: str, source: str) -> str | None:
    if key not in items:
        return None
    value = plain(items[key][1])
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{source}:{line_of(items[key][1])}: {key!r} must be a string")
    return str(value)


def _parse_stage(node, source: str, base: Path) -> StageSpec:
    """``- share: {groups: 3}``, ``- share:`` (defaults) or ``- evaluate``."""
    import yaml

    from .stages import get_stage

    line = line_of(node)
    if isinstance(node, yaml.ScalarNode):
        name, options_node = plain(node), None
    elif isinstance(node, yaml.MappingNode) and len(node.value) == 1:
        key_node, options_node = node.value[0]
        name = plain(key_node)
    else:
        raise ConfigError(f"{source}:{line}: a stage is written as '- name:' followed by its options, e.g. '- share: {{groups: 3}}'")
    if not isinstance(name, str):
        raise ConfigError(f"{source}:{line}: a stage name must be a string, got {name!r}")
    try:
        stage = get_stage(name)
    except ConfigError as e:
        raise ConfigError(f"{source}:{line}: {e}") from None
    options: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if options_node is not None and not (isinstance(options_node, yaml.ScalarNode) and plain(options_node) is None):
        for key, (key_node, value_node) in mapping_items(options_node, source, f"options of {name}").items():
            field_name = key.replace("-", "_")  # the CLI's spelling works too
            options[field_name] = resolve_path(plain(value_node), base)
            lines[field_name] = line_of(key_node)
    try:
        config = stage.config_class.from_dict(options)
    except ConfigError as e:
        at = lines.get(e.option or "", line)
        message = str(e).replace(flag(e.option), e.option) if e.option else str(e)  # a recipe spells options as fields
        raise ConfigError(f"{source}:{at}: {name}: {message}", option=e.option) from None
    except TypeError as e:  # a value of a type the dataclass cannot take at all
        raise ConfigError(f"{source}:{line}: {name}: {e}") from None
    return StageSpec(name=name, config=config, line=line)


def check_order(recipe: Recipe) -> None:
    """A stage whose options feed the next stage (``quantize`` -> ``export``) must come right before it."""
    from .stages import get_stage

    for i, spec in enumerate(recipe.stages):
        feeds = get_stage(spec.name).feeds
        if feeds is None:
            continue
        following = recipe.stages[i + 1].name if i + 1 < len(recipe.stages) else None
        if following != feeds:
            where = f"{recipe.source}:{spec.line}" if spec.line else recipe.source
            raise ConfigError(f"{where}: {spec.name} sets the options of the {feeds} stage, which must come right after it")


def rebuild(stages: list[dict[str, Any]]) -> list[StageSpec]:
    """Normalized stages (see `Recipe.normalized`) back into checked configs.

    Workers call this where the job runs, so devices are checked on the machine that uses them.
    """
    from .stages import get_stage

    specs = []
    for item in stages:
        stage = get_stage(item["stage"])
        specs.append(StageSpec(name=stage.name, config=stage.config_class.from_dict(dict(item["options"]))))
    return specs


__all__ = ["Recipe", "StageSpec", "load_recipe", "parse_recipe", "rebuild"]


def check_holdout(recipe: Recipe) -> None:
    """A finetune that holds out the suite's test splits must hold out the ones a later report
    scores: other tasks, sizes or seed would score texts the model was trained on."""
    for i, spec in enumerate(recipe.stages):
        if spec.name != "finetune" or spec.config.holdout != "suite":
            continue
        held = spec.config.holdout_suite()
        for later in recipe.stages[i + 1 :]:
            if later.name != "report" or not later.config.suite:
                continue
            scored = later.config
            mine = (held.suite_tasks, held.suite_train_size, held.suite_test_size, held.seed)
            theirs = (list(scored.suite_tasks), scored.suite_train_size, scored.suite_test_size, scored.seed)
            where = f"{recipe.source}:{spec.line}" if spec.line else recipe.source
            if mine[:3] == theirs[:3] and mine != theirs:
                raise ConfigError(f"{where}: finetune holds out the suite's test splits of seed {held.seed}, and the "
                                  f"report on line {later.line} scores those of seed {scored.seed}; give the report "
                                  f"seed {held.seed}")
            if mine != theirs:
                raise ConfigError(
                    f"{where}: finetune holds out the suite's test splits of {','.join(held.suite_tasks)} at "
                    f"{held.suite_train_size}/{held.suite_test_size} (seed {held.seed}), and the report on line "
                    f"{later.line} scores {','.join(scored.suite_tasks)} at {scored.suite_train_size}/"
                    f"{scored.suite_test_size} (seed {scored.seed}); give finetune the report's suite_tasks, "
                    "suite_train_size and suite_test_size")
