"""The option tables of ``docs/``, generated from the commands and the recipe schema themselves.

A docs page holds a generated block between two markers, and this module rewrites what is
between them; everything outside is written by hand::

    <!-- options:export -->          every option of `compress export`, as a table
    <!-- /options -->
    <!-- options:data fetch -->      a subcommand: the command path, space-separated
    <!-- /options -->
    <!-- recipe-schema -->           every stage a recipe can name, with its keys
    <!-- /recipe-schema -->
    <!-- file:recipes/deploy.yaml --> a file of the repository, as a fenced block
    <!-- /file -->

The tables are read from the click command objects (`cli.main.cli`), with
``cmd.get_params(ctx)`` so that options a command builds when it is called are included, and
from `compressor.pipeline.stages.recipe_schema`; nothing here lists an option by hand. Run::

    python -m cli.docs           # rewrite the blocks in docs/*.md
    python -m cli.docs --check   # exit 1, naming the stale pages, if any block is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROOT = DOCS.parent
_BLOCK = re.compile(r"(<!-- (options:[^>]*?|file:[^>]*?|recipe-schema) -->\n)(.*?)(<!-- /(?:options|file|recipe-schema) -->)", re.S)


def _cell(text: Any) -> str:
    """One table cell: on one line, with the pipes markdown would read as columns escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    return f"`{value}`" if value not in (None, "") else ""


def commands(group: click.Group | None = None, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """Every command by its path (``"export"``, ``"data fetch"``), subcommands of groups included."""
    if group is None:
        from cli.main import cli as group
    found: dict[str, click.Command] = {}
    ctx = click.Context(group, info_name=" ".join(prefix) or "compress")
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        path = (*prefix, name)
        if isinstance(cmd, click.Group):
            found.update(commands(cmd, path))
        else:
            found[" ".join(path)] = cmd
    return found


def _type(param: click.Option, ctx: click.Context) -> str:
    """What the option takes: ``flag``, its choices, or its metavar (``INTEGER``, ``INT,...``)."""
    if param.is_flag:
        return "flag"
    if isinstance(param.type, click.Choice):
        return " \\| ".join(_cell(c) for c in param.type.choices)
    return _cell(param.make_metavar(ctx))


def _default(param: click.Option, ctx: click.Context) -> str:
    default = param.get_default(ctx, call=False)
    if callable(default):
        return "(computed)"
    if param.is_flag:
        if param.secondary_opts and default is not None:  # --x/--no-x: the spelling that is the default
            return _code(param.opts[0] if default else param.secondary_opts[0])
        return ""
    if default is None or default == ():
        return ""
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    return _code(default)


def options_table(path: str) -> str:
    """The usage line and the options of command ``path`` as a markdown table."""
    cmd = commands().get(path)
    if cmd is None:
        raise KeyError(f"no command {path!r}; known: {', '.join(commands())}")
    ctx = click.Context(cmd, info_name=f"compress {path}")
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = [f"`compress {path} {usage}`", "", "| option | value | default | what it does |", "|---|---|---|---|"]
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option) or param.hidden or "--help" in param.opts:
            continue
        names = ", ".join(f"`{o}`" for o in param.opts)
        if param.secondary_opts:
            names += " / " + ", ".join(f"`{o}`" for o in param.secondary_opts)
        required = " Required." if param.required else ""
        lines.append(f"| {names} | {_type(param, ctx)} | {_default(param, ctx)} | {_cell(param.help or '')}{required} |")
    return "\n".join(lines) + "\n"


def recipe_schema_tables() -> str:
    """Every recipe stage with its keys (name, type, default, help), from `recipe_schema`."""
    from compressor.pipeline.stages import recipe_schema

    out = []
    for stage, info in recipe_schema().items():
        out += [f"#### `{stage}`", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for opt in info["options"]:
            kind = " \\| ".join(_cell(c) for c in opt["choices"]) if opt.get("choices") else opt["kind"]
            default = opt["default"]
            if isinstance(default, list):
                default = "[" + ", ".join(map(str, default)) + "]"
            elif isinstance(default, bool):
                default = str(default).lower()
            out.append(f"| `{opt['name']}` | {kind} | {_code(default)} | {_cell(opt['help'])} |")
        out.append("")
    return "\n".join(out)


def file_block(path: str) -> str:
    """A file of the repository (a shipped recipe) as a fenced block, so the page shows it as it is."""
    text = (ROOT / path).read_text()
    return f"```{Path(path).suffix.lstrip('.')}\n# {path}\n{text.rstrip()}\n```\n"


def render(text: str) -> str:
    """``text`` with every generated block rewritten from the code as it is now."""

    def block(match: re.Match) -> str:
        start, what, _, end = match.groups()
        if what == "recipe-schema":
            body = recipe_schema_tables()
        elif what.startswith("file:"):
            body = file_block(what.removeprefix("file:").strip())
        else:
            body = options_table(what.removeprefix("options:").strip())
        return f"{start}{body}{end}"

    return _BLOCK.sub(block, text)


def documented(docs: Path = DOCS) -> set[str]:
    """The command paths that have an options block somewhere in ``docs``."""
    return {m.group(2).removeprefix("options:").strip() for page in sorted(docs.glob("*.md"))
            for m in _BLOCK.finditer(page.read_text()) if m.group(2).startswith("options:")}


def stale(docs: Path = DOCS) -> list[str]:
    """What is out of date: pages whose blocks differ from what `render` gives, and commands
    that no page documents."""
    problems = [f"{page}: generated tables are out of date" for page in sorted(docs.glob("*.md"))
                if render(page.read_text()) != page.read_text()]
    missing = sorted(set(commands()) - documented(docs))
    problems += [f"compress {path}: no <!-- options:{path} --> block in {docs}/*.md" for path in missing]
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print("usage: python -m cli.docs [--check]", file=sys.stderr)
        return 2
    if argv == ["--check"]:
        problems = stale()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python -m cli.docs", file=sys.stderr)
        return 1 if problems else 0
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = render(text)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(DOCS.parent)}")
    missing = sorted(set(commands()) - documented())
    for path in missing:
        print(f"compress {path}: add <!-- options:{path} --> <!-- /options --> to a page in docs/", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
