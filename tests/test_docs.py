"""The documentation: option tables generated from the commands, and help texts free of
measurement notes."""

from __future__ import annotations

import re
import shutil

import click
import pytest
from click.testing import CliRunner

from cli import docs
from cli.main import cli

COMMANDS = sorted(docs.commands())

#: What a measurement note in a help text looks like: a pointer to a measured run, the run it
#: came from, or the figure itself. Help says what an option does and when to use it; what a
#: run measured belongs in reports/ and docs/results.md.
MEASUREMENT_NOTES = {
    "a reports/ file": r"reports/",
    "the demo's run": r"\bon the demo\b|\bthe demo's\b",
    "training steps of a run": r"\bsteps on\b|\b\d[\d,]* (?:more |float )?steps\b",
    "a ratio": r"\b\d+(?:\.\d+)?x\b",
    "a measurement": r"(?<!against )\bmeasured\b(?! (?:on|at)\b)",
    "a gain or loss": r"\b(?:gained|gave|kept|cost|lost|won) (?:nothing|back|\d)",
    "a measured share": r"\b\d+(?:\.\d+)?% (?:of|against|more|less)\b",
    "a single run": r"\bone run\b",
}

def test_docs_tables_match_the_commands_and_the_recipe_schema():
    assert docs.stale() == [], "run: .venv/bin/python -m cli.docs"


def test_every_command_has_an_options_table():
    assert set(COMMANDS) <= docs.documented()
    assert {"analyze", "share", "finetune", "evaluate", "prune", "export", "report", "inspect", "run", "batch",
            "data fetch", "data list"} <= set(COMMANDS)


def test_a_table_lists_every_option_of_its_command_with_its_default():
    text = docs.render("<!-- options:prune -->\n<!-- /options -->\n")
    cmd = cli.commands["prune"]
    options = [p for p in cmd.get_params(click.Context(cmd)) if isinstance(p, click.Option) and "--help" not in p.opts]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(options) > 10
    (heads,) = [row for row in rows if row.startswith("| `--heads` |")]
    assert heads.split(" | ")[1:3] == ["FLOAT", "`0.0`"]
    (score,) = [row for row in rows if row.startswith("| `--score` |")]
    assert score.split(" | ")[1] == "taylor \\| magnitude"


def test_the_recipe_schema_block_has_every_stage_and_key():
    from compressor.pipeline.stages import recipe_schema

    text = docs.render("<!-- recipe-schema -->\n<!-- /recipe-schema -->\n")
    schema = recipe_schema()
    assert text.count("#### `") == len(schema)
    for stage, info in schema.items():
        assert f"#### `{stage}`" in text
        for option in info["options"]:
            assert f"| `{option['name']}` |" in text


def test_check_finds_a_stale_table_and_a_missing_command(tmp_path):
    shutil.copy(docs.DOCS / "prune.md", tmp_path / "prune.md")
    assert [p for p in docs.stale(tmp_path) if "prune.md" in p] == []
    page = tmp_path / "prune.md"
    page.write_text(page.read_text().replace("| `--heads` |", "| `--heads-old` |"))
    problems = docs.stale(tmp_path)
    assert any("prune.md" in p for p in problems)
    assert any(p.startswith("compress export:") for p in problems)  # no page for export here
    assert "compress prune:" not in " ".join(problems)


def _help_entries(path: str) -> list[tuple[str, str]]:
    """``(option, help)`` for every option in ``compress PATH --help``, plus the command's own
    text as ``("(command)", text)``; each entry joined onto one line."""
    result = CliRunner().invoke(cli, [*path.split(), "--help"], terminal_width=10_000, max_content_width=10_000)
    assert result.exit_code == 0, result.output
    head, _, options = result.output.partition("\nOptions:\n")
    entries = [["(command)", head]]
    for line in options.splitlines():
        if re.match(r"^  -", line):
            entries.append([line.split()[0].rstrip(","), line])
        elif line.startswith("   ") and len(entries) > 1:
            entries[-1][1] += " " + line.strip()
    return [(name, " ".join(text.split())) for name, text in entries]


@pytest.mark.parametrize("path", COMMANDS)
def test_help_says_what_an_option_does_not_what_a_run_measured(path):
    found = [f"compress {path} {option}: {kind} ({match.group()!r})"
             for option, text in _help_entries(path)
             for kind, pattern in MEASUREMENT_NOTES.items()
             for match in [re.search(pattern, text)] if match]
    assert found == []


@pytest.mark.parametrize("text,noted", [
    ("On the demo's MiniLM 200 steps of it gained nothing over 200 float steps (reports/demo/levers.md).", True),
    ("A token's error costs as often as it is read: on the demo's cut MiniLM the most used 10% of rows are 80% of "
     "the text read.", True),
    ("Per-token ranges run 1.25x optimum O2 int8 at batch 32.", True),
    ("Examples every metric is measured on.", False),
    ("Batch sizes latency is measured at.", False),
    ("Measure the damage on held-out text: predicted against measured, ranked.", False),
    ("Stop after this many optimizer steps (default 200 when no --max-minutes).", False),
])
def test_the_scan_tells_a_measurement_note_from_a_description(text, noted):
    assert any(re.search(pattern, text) for pattern in MEASUREMENT_NOTES.values()) is noted


def _examples() -> list[tuple[str, str]]:
    """``(where, command line)`` for every ``compress ...`` line in the README's and the docs'
    bash blocks."""
    pages = [docs.ROOT / "README.md", *sorted(docs.DOCS.glob("*.md"))]
    found = []
    for page in pages:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("compress "):
                    found.append((page.name, line))
    return found


def test_every_example_uses_options_its_command_has():
    examples = _examples()
    assert len(examples) > 40
    wrong = []
    for where, line in examples:
        words = line.split("|", 1)[0].split()[1:]  # up to a pipe into another program
        path = words[0] if words[0] in cli.commands and words[0] != "data" else " ".join(words[:2])
        cmd = docs.commands()[path]
        names = {o for p in cmd.get_params(click.Context(cmd)) for o in (*p.opts, *p.secondary_opts)}
        wrong += [f"{where}: {line}: {w}" for w in words if w.startswith("-") and w != "-" and w.split("=")[0] not in names]
    assert wrong == []


def test_every_link_in_the_readme_and_docs_points_at_a_file_that_exists():
    pages = [docs.ROOT / "README.md", *sorted(docs.DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            file = page.parent / path
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def _anchors(page) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
