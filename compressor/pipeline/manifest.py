"""A batch manifest, read and validated into jobs; nothing runs.

A manifest::

    models: [./models/bert, ./models/gpt2]      # every model ...
    recipes: [recipes/quick.yaml]               # ... through every recipe
    jobs:                                       # and/or jobs one by one
      - model: bundled
        recipe: recipes/demo.yaml
        name: minilm-demo                       # default: <model>-<recipe>
        resources: {num_cpus: 2, custom: {big_ram: 1}}  # what a Ray job asks for
    resources: {num_cpus: 1}                    # the default for every job

``custom`` resources are Ray's: a node offers them (``ray start --resources '{"big_ram": 1}'``)
and a job that asks for one runs only on a node that has it.

Paths are relative to the manifest's folder. A recipe is a file or a mapping written in place.
Every recipe is validated before any job runs; an error names the manifest's file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .job import Job
from .recipe import (
    Recipe,
    check_keys,
    line_of,
    load_recipe,
    mapping_items,
    parse_recipe,
    plain,
    read_yaml_file,
    resolve_path,
)

MANIFEST_KEYS = ("models", "recipes", "jobs", "resources")
JOB_KEYS = ("name", "model", "recipe", "resources")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "custom")
#: The finest resource amount Ray schedules (it refuses 0.00001 CPUs).
RAY_UNIT = 0.0001
#: The batch folder's own files; no job may take their names.
BATCH_FILE, SUMMARY_JSON, SUMMARY_MD = "batch.json", "summary.json", "summary.md"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class _Entry:
    """One job as the manifest writes it: YAML nodes, not yet read (``None``: not given).

    Attributes:
        at: The node error messages point at (the model of a ``models`` x ``recipes`` job,
            else the job's mapping).
        recipe: A recipe file's name, or a recipe written in place.
        model: The model.
        name: The job's name.
        resources: What the job asks a Ray cluster for.
    """

    at: Any
    recipe: Any
    model: Any = None
    name: Any = None
    resources: Any = None


def load_manifest(path: str | Path, output: str | Path) -> list[Job]:
    """Read a manifest and validate it and every recipe it names; nothing runs.

    Args:
        path: The manifest (YAML).
        output: The batch's output folder; job ``name`` goes to ``output/name``.

    Returns:
        The jobs, in manifest order (``models`` x ``recipes`` first, then ``jobs``).

    Raises:
        ConfigError: a manifest or recipe that does not parse, an unknown key, stage or option
            (with its file and line), a missing recipe file, or two jobs of one name.
    """
    path = Path(path)
    source, base = str(path), path.resolve().parent
    items = _manifest_items(path, source)
    defaults = _resources(items["resources"][1], source, {}) if "resources" in items else {}
    entries = _crossed_entries(items, source) + _listed_entries(items, source)
    if not entries:
        raise ConfigError(f"{source}: the manifest has no jobs")
    return _jobs(entries, source, base, defaults, Path(output).resolve())


def job_for_recipe(recipe: Recipe, folder: str | Path, model: str | None = None) -> Job:
    """The single job of ``compress run``: ``model`` (or the recipe's, or the bundled MiniLM)
    through ``recipe``, in ``folder``."""
    spec = model or recipe.model or "bundled"
    return Job(name=recipe.name, model=spec, recipe=recipe.name, stages=recipe.normalized(), folder=Path(folder).resolve(),
               shown_model=spec, resources=default_resources(recipe))


def default_resources(recipe: Recipe) -> dict[str, float]:
    """What a job of ``recipe`` asks a Ray cluster for unless told: a CPU, and a GPU when a
    stage runs on CUDA."""
    from .stages import uses_cuda

    return {"num_cpus": 1, "num_gpus": 1 if any(uses_cuda(s.config) for s in recipe.stages) else 0}


# ---- the manifest's parts ---------------------------------------------------------------------


def _manifest_items(path: Path, source: str) -> dict[str, tuple[Any, Any]]:
    """The manifest's top-level mapping, its keys checked."""
    node = read_yaml_file(path, "manifest")
    if node is None:
        raise ConfigError(f"{source}: the manifest is empty; list jobs, or models and recipes")
    items = mapping_items(node, source, "manifest")
    check_keys(items, MANIFEST_KEYS, source, "manifest")
    return items


def _crossed_entries(items: dict[str, tuple[Any, Any]], source: str) -> list[_Entry]:
    """A job for every model through every recipe (``models`` and ``recipes``)."""
    if ("models" in items) != ("recipes" in items):
        key = "models" if "models" in items else "recipes"
        raise ConfigError(f"{source}:{line_of(items[key][0])}: 'models' and 'recipes' go together (every model "
                          "through every recipe); for single jobs use 'jobs'")
    if "models" not in items:
        return []
    models = _sequence(items["models"][1], source, "models")
    recipes = _sequence(items["recipes"][1], source, "recipes")
    return [_Entry(at=m, model=m, recipe=r) for m in models for r in recipes]


def _listed_entries(items: dict[str, tuple[Any, Any]], source: str) -> list[_Entry]:
    """The jobs given one by one (``jobs``)."""
    if "jobs" not in items:
        return []
    entries = []
    for job_node in _sequence(items["jobs"][1], source, "jobs"):
        fields = mapping_items(job_node, source, "a job")
        check_keys(fields, JOB_KEYS, source, "job")
        if "recipe" not in fields:
            raise ConfigError(f"{source}:{line_of(job_node)}: the job has no recipe")
        entries.append(_Entry(at=job_node, **{key: value for key, (_, value) in fields.items()}))
    return entries


def _jobs(entries: list[_Entry], source: str, base: Path, defaults: dict[str, Any], output: Path) -> list[Job]:
    """Every entry read: its recipe, model, name and resources."""
    recipes: dict[str, Recipe] = {}  # a recipe file is read once however many jobs use it
    seen: dict[str, int] = {}  # job name -> the line of its job
    jobs = []
    for entry in entries:
        recipe = _recipe(entry.recipe, source, base, recipes)
        model, shown = _model(entry.model, recipe, source, base)
        name = _job_name(entry, shown, recipe, source, seen)
        resources = {**default_resources(recipe), **defaults}
        if entry.resources is not None:
            resources = _resources(entry.resources, source, resources)
        jobs.append(Job(name=name, model=model, recipe=recipe.name, stages=recipe.normalized(), folder=output / name,
                        shown_model=shown, resources=resources))
    return jobs


# ---- one job's fields -------------------------------------------------------------------------


def _recipe(node, source: str, base: Path, cache: dict[str, Recipe]) -> Recipe:
    """A recipe file (read once however many jobs use it) or a recipe written in place."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        return parse_recipe(node, source=source, base=base, default_name=f"recipe-line{line_of(node)}")
    path = base / _string(node, source, "recipe")
    key = str(path.resolve())
    if key not in cache:
        if not path.is_file():
            raise ConfigError(f"{source}:{line_of(node)}: recipe file {path} does not exist")
        cache[key] = load_recipe(path)
    return cache[key]


def _model(node, recipe: Recipe, source: str, base: Path) -> tuple[str, str]:
    """``(model as loading takes it, model as the user wrote it)``; without a model, the
    recipe's, else the bundled MiniLM."""
    if node is None:
        spec = recipe.model or "bundled"
        return spec, spec
    return _model_spec(node, source, base), str(plain(node))


def _model_spec(node, source: str, base: Path) -> str:
    """A model as written; a relative path is read from the manifest's folder."""
    spec = _string(node, source, "model")
    if spec.startswith(("./", "../")):
        return str((base / spec).resolve())
    return resolve_path(spec, base)


def _job_name(entry: _Entry, shown_model: str, recipe: Recipe, source: str, seen: dict[str, int]) -> str:
    """The name given, else ``<model>-<recipe>``; checked to be a folder name no other job has."""
    name = _string(entry.name, source, "name") if entry.name is not None else f"{_slug(shown_model)}-{recipe.name}"
    if not _NAME.match(name) or name in (BATCH_FILE, SUMMARY_JSON, SUMMARY_MD):
        raise ConfigError(f"{source}:{line_of(entry.at)}: job name {name!r} must be letters, digits, '.', '_' or '-', "
                          "and not the name of a batch file")
    if name in seen:
        raise ConfigError(f"{source}:{line_of(entry.at)}: two jobs are called {name!r} (the first on line {seen[name]}); "
                          "give one a 'name'")
    seen[name] = line_of(entry.at)
    return name


def _resources(node, source: str, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with the ``num_cpus``, ``num_gpus`` and ``custom`` resources ``node`` gives."""
    items = mapping_items(node, source, "resources")
    check_keys(items, RESOURCE_KEYS, source, "resources")
    out = dict(base)
    for key, (_, value_node) in items.items():
        if key == "custom":
            custom = {}
            for name, (name_node, amount) in mapping_items(value_node, source, "custom resources").items():
                if name in ("CPU", "GPU", "memory", "object_store_memory") or name.startswith("node:"):
                    raise ConfigError(f"{source}:{line_of(name_node)}: custom resource {name!r} is one of Ray's own; "
                                      "ask for CPUs and GPUs with num_cpus and num_gpus")
                custom[name] = _amount(f"custom resource {name!r}", amount, source, RAY_UNIT)
            out["custom"] = {**out.get("custom", {}), **custom}
        else:
            out[key] = _amount(key, value_node, source, 0 if key == "num_gpus" else RAY_UNIT)
    return out


def _amount(what: str, node, source: str, low: float) -> float:
    """A resource amount: a number of at least ``low`` in Ray's steps of `RAY_UNIT`."""
    value = plain(node)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low
            or abs(value / RAY_UNIT - round(value / RAY_UNIT)) > 1e-6):
        raise ConfigError(f"{source}:{line_of(node)}: {what} must be a number "
                          f"{'of 0 or more' if low == 0 else 'above 0'} in steps of {RAY_UNIT:g}, got {value!r}")
    return value


def _slug(model: str) -> str:
    """A model as a name part: its last path component, with odd characters replaced."""
    name = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


# ---- YAML values ------------------------------------------------------------------------------


def _sequence(node, source: str, what: str) -> list:
    import yaml

    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise ConfigError(f"{source}:{line_of(node)}: '{what}' must be a non-empty list")
    return node.value


def _string(node, source: str, what: str) -> str:
    value = plain(node)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}:{line_of(node)}: {what} must be a string, got {value!r}")
    return value
