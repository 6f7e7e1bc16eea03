"""Progress lines of the long steps (`compressor.progress`): off a terminal, a line per tenth
with the time left; ``jsonl`` events for pipelines; nothing for a step that ends at once; and a
command's long step speaks on stderr."""

from __future__ import annotations

import io
import json

import pytest

from compressor import progress
from compressor.progress import Progress


@pytest.fixture(autouse=True)
def text_format():
    yield
    progress.set_format("text")


def test_a_line_per_tenth_with_the_time_left():
    out = io.StringIO()
    with Progress("weight similarity", 20, "layer pairs", min_seconds=0, stream=out) as p:
        for _ in range(20):
            p.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # the first as soon as the step is known to be long, then one a tenth
    assert lines[0].startswith("compress: weight similarity: 1/20 layer pairs (5%)") and "left" in lines[0]
    assert lines[1].startswith("compress: weight similarity: 3/20 layer pairs (15%)")
    assert lines[-1].startswith("compress: weight similarity: 20/20 layer pairs (100%)") and lines[-1].endswith("done")


def test_jsonl_events_and_off():
    out = io.StringIO()
    progress.set_format("jsonl")
    with Progress("GPTQ", 4, "projections", min_seconds=0, stream=out) as p:
        for _ in range(4):
            p.update()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["done"] for e in events] == [1, 2, 3, 4] and {e["event"] for e in events} == {"progress"}
    assert events[-1]["left_s"] == 0 and events[0]["total"] == 4 and events[0]["unit"] == "projections"
    progress.set_format("off")
    quiet = io.StringIO()
    with Progress("GPTQ", 4, min_seconds=0, stream=quiet) as p:
        p.update(4)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="progress format"):
        progress.set_format("loud")


def test_a_short_step_says_nothing():
    out = io.StringIO()
    with Progress("sharing", 3, "groups", stream=out) as p:  # done well within min_seconds
        p.update(3)
    assert out.getvalue() == ""


def test_left_seconds_follow_the_rate(monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = Progress("x", 8, stream=io.StringIO())
    p.done = 2
    assert p.left_seconds() == pytest.approx(30.0)  # 10 s for 2 of 8: 30 s for the other 6


def test_commands_report_their_long_steps(tiny_dirs, monkeypatch, tmp_path):
    """`compress analyze` and `compress export` (genai, int4 GPTQ) name each long step on stderr,
    as text or as jsonl events (every step counts here: `MIN_SECONDS` 0)."""
    from click.testing import CliRunner

    from cli.main import cli
    from tiny_models import save_model

    monkeypatch.setattr(progress, "MIN_SECONDS", 0.0)
    res = CliRunner().invoke(cli, ["analyze", str(tiny_dirs["llama"]), "--max-samples", "4", "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "compress: weight similarity: 6/6 layer pairs (100%)" in res.stderr
    assert "compress: block outputs:" in res.stderr
    wide = save_model("llama", tmp_path / "wide", hidden_size=64)  # 16-wide heads: the genai layout
    res = CliRunner().invoke(cli, ["--log-format", "jsonl", "export", str(wide), "--quantize", "int4",
                                   "--int4-method", "gptq", "--block-size", "16", "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    steps = {json.loads(line)["step"] for line in res.stderr.splitlines() if '"progress"' in line}
    assert {"GPTQ", "writing the graph"} <= steps


def test_a_short_step_speaks_when_the_process_has_been_quiet_for_long(monkeypatch):
    """Several short steps in a row must not add up to a long silence: a step shorter than
    MIN_SECONDS writes once the process has written nothing for that long."""
    import time

    out = io.StringIO()
    monkeypatch.setattr(progress, "_last_line", time.perf_counter() - 2 * progress.MIN_SECONDS)
    with Progress("reading weights", 2, "files", stream=out) as p:
        p.update()
        p.update()
    lines = out.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("compress: reading weights: 1/2 files")
    quiet = io.StringIO()  # the process just spoke: a short step stays quiet
    with Progress("reading weights", 2, "files", stream=quiet) as p:
        p.update(2)
    assert quiet.getvalue() == ""


def test_a_step_of_unknown_length_counts_without_a_share_or_time_left(monkeypatch):
    """A run bounded by time (`compress finetune --max-minutes`) knows no total: its lines count
    the items and the time, every `EVERY_SECONDS`, and never say done or how long is left."""
    clock = iter([0.0, 1.0, 5.0, 30.0, 31.0, 32.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress("finetune", 0, "steps", min_seconds=0, stream=out)
    for _ in range(4):
        p.update()
    assert out.getvalue().splitlines() == ["compress: finetune: 1 steps, 1 s", "compress: finetune: 3 steps, 30 s"]
    assert p.left_seconds() is None


def test_items_of_15_seconds_each_speak_every_item(monkeypatch):
    """Steps that take 15 s would speak every other step (30 s and more apart) under the tenths
    and the 20 s rule alone; a line comes whenever the next item would leave stderr quiet past
    20 s."""
    clock = iter([0.0] + [15.0 * k for k in range(1, 21)] + [400.0] * 5)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress("finetune", 40, "steps", min_seconds=0, stream=out)
    for _ in range(20):
        p.update()
    assert len(out.getvalue().splitlines()) == 20


def test_a_long_item_moves_in_fractions_and_adds_up_to_whole_items(monkeypatch):
    """The export's check moves a block of a forward pass at a time (1/32 of a token on an 8 B
    model, whose one pass took 108 s): lines come between whole items, counts stay whole, and
    32 thirty-seconds make the item done."""
    clock = iter([0.0] + [3.4 * k for k in range(1, 65)] + [400.0] * 5)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress("checking against PyTorch", 2, "tokens", min_seconds=0, stream=out)
    for _ in range(64):
        p.update(1 / 32)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("compress: checking against PyTorch: 2/2 tokens (100%)") and lines[-1].endswith("done")
    assert any(line.startswith("compress: checking against PyTorch: 0/2 tokens") for line in lines)
    assert len(lines) >= 218 // 20 and p.done == 2  # 218 s in all: a line at least every 20 s


def test_fractions_add_up_to_whole_items_whatever_the_block_count():
    """1/28 added 28 times is 0.99999... in floating point: a pass still makes one item, so the
    count reaches the total and the last line says done."""
    for layers in (12, 28, 30, 36):
        q = Progress("x", 5, min_seconds=0, stream=io.StringIO())
        for _ in range(5 * layers):
            q.update(1 / layers)
        assert q.done == 5


def test_a_long_item_speaks_while_its_modules_run(monkeypatch):
    """An item of minutes (a self-check's pass over an 8 B model's blocks): each block's forward
    beats, and a beat after 20 s of quiet writes a line with the count unchanged."""
    import torch

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(progress, "_last_line", 0.0)
    out = io.StringIO()
    blocks = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
    with Progress("self-checks", 4, "checks", min_seconds=10, stream=out) as p, p.heartbeat_on(list(blocks)):
        for _ in range(3):  # three passes of four blocks, 4 s a block
            for block in blocks:
                now[0] += 4.0
                block(torch.ones(2))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("compress: self-checks: 0/4 checks") for line in lines)
    assert not any(h for b in blocks for h in b._forward_hooks.values())  # the hooks go with the step
