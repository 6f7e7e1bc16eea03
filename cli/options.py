"""Click options made from config dataclasses, and the options every command shares.

A stage command declares none of its stage options by hand: `config_options` turns each field
of the config class into a flag (``max_samples`` -> ``--max-samples``) with the field's type,
default, choices and docstring help (`compressor.config.option_specs`), and `build_config`
turns the parsed values back into the config. A field added to a config appears in the
command, the recipe schema and the docs at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from compressor.config import OptionSpec, TextFormat, flag, option_specs, plain_help


class CommaList(click.ParamType):
    """``1,32`` -> ``[1, 32]``: a list option given as comma-separated items."""

    def __init__(self, item: type, items: str, metavar: str):
        self.item, self.items = item, items
        self.name = f"{metavar},..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [self.item(x.strip()) for x in str(value).split(",") if x.strip()]
        except ValueError:
            self.fail(f"expected comma-separated {self.items}, got {value!r}", param, ctx)


_TYPES = {"int": int, "float": float, "str": str, "list[int]": CommaList(int, "integers", "INT"),
          "list[str]": CommaList(str, "names", "NAME"), "list[float]": CommaList(float, "numbers", "FLOAT")}


def plain(text: str, fields: set[str] = frozenset()) -> str:
    """Docstring markup as terminal text: ````x```` -> ``x``, and ````max_steps```` -> ``--max-steps``
    where it names another option."""
    return plain_help(text, fields, flag)


def shown(value: Any) -> Any:
    """A default as the command line writes it (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def click_option(spec: OptionSpec, *, name: str | None = None, fields: set[str] = frozenset(), **override) -> Callable:
    """The click option for one config field; ``override`` replaces any of its settings, and
    ``fields`` are the command's other options, which the help may name."""
    name = name or spec.flag or flag(spec.name)
    settings: dict[str, Any] = {"help": plain(spec.help, fields), "show_default": spec.default is not None}
    if spec.kind == "bool":
        decls = [name if "/" in name else f"{name}/--no-{name[2:]}", spec.name]
        settings["default"] = spec.default
    else:
        decls = [name, spec.name]
        settings["type"] = click.Choice(spec.choices) if spec.choices else _TYPES[spec.kind]
        settings["default"] = shown(spec.default)
    settings.update(override)
    return click.option(*decls, **settings)


def config_options(*classes: type, exclude: tuple[str, ...] = (), names: dict[str, str] | None = None,
                   overrides: dict[str, dict[str, Any]] | None = None) -> Callable:
    """Decorate a command with one option per field of each config class (a field two classes
    share, such as ``text_column``, once).

    Args:
        classes: The config classes, in the order their options are listed. Two of them may share
            only the text format (`TextFormat`: one ``--text-column`` and ``--encoding`` feed both).
        exclude: Fields that are not options of this command (it sets them itself).
        names: Flags that differ from the field name (``{"mode": "--quantize"}``).
        overrides: Click settings to replace per field (``{"mode": {"default": None}}``).
    """
    names, overrides = names or {}, overrides or {}
    specs: dict[str, OptionSpec] = {}
    shared_text = {s.name for s in option_specs(TextFormat)}
    for cls in classes:
        for spec in option_specs(cls):
            if spec.name in exclude:
                continue
            if spec.name in specs and spec.name not in shared_text:
                # one flag would feed both configs: say so here, not with a surprise at run time
                raise TypeError(f"{cls.__name__}.{spec.name} is also an option of an earlier config; exclude or rename one")
            specs.setdefault(spec.name, spec)

    def decorate(fn: Callable) -> Callable:
        # click lists options in the order the decorators are applied, innermost last
        for spec in reversed(list(specs.values())):
            fn = click_option(spec, name=names.get(spec.name), fields=set(specs),
                              **overrides.get(spec.name, {}))(fn)
        return fn

    return decorate


def config_values(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The values in ``params`` that are fields of ``cls``."""
    fields = {s.name for s in option_specs(cls)}
    return {k: v for k, v in params.items() if k in fields}


def build_config(cls: type, params: dict[str, Any], **values: Any):
    """The config ``cls`` from a command's parsed options (and ``values`` set by the command);
    it checks itself, so a bad value is one line and exit 2."""
    return cls.from_dict({**config_values(cls, params), **values})


# ---- options every command spells the same way ----------------------------------------------


def output_option(help: str, *, required: bool = True) -> Callable:
    return click.option("-o", "--output", required=required, default=None, type=click.Path(), help=help)


def json_flag(instead_of: str = "the summary") -> Callable:
    """``--json PATH``: the result as JSON there too, or on stdout instead of ``instead_of``."""
    return click.option("--json", "json_path", type=click.Path(), default=None,
                        help=f"Also write the result as JSON here ('-' prints it instead of {instead_of}).")


json_option = json_flag()
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output.")
trust_remote_code_option = click.option("--trust-remote-code", is_flag=True,
                                        help="Allow the checkpoint's own Python code to run.")

dtype_option = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                            show_default=True,
                            help="The dtype the weights are read in: auto keeps the checkpoint's own (a bf16 model "
                                 "stays bf16, half the memory of float32; the checks' tolerances follow the dtype).")


def checkpoint_outputs(help: str) -> Callable:
    """``-o``, ``--json``, ``--overwrite`` and ``--trust-remote-code``: what every command that
    writes a model folder takes."""

    def decorate(fn: Callable) -> Callable:
        for option in (trust_remote_code_option, overwrite_option, json_option, output_option(help)):
            fn = option(fn)
        return fn

    return decorate


def check_json(json_path: str | None, *outputs: str | None, overwrite: bool) -> None:
    """Before any work: ``--json`` is not another output of the command and may be written."""
    from compressor.io import check_distinct, check_writable

    check_distinct(*outputs, json_path)
    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)
