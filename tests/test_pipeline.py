"""Recipes (validation with line numbers), the stage registry, and `compress run`."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from compressor.config import StageConfig
from compressor.errors import ConfigError
from compressor.finetune import FinetuneConfig
from compressor.pipeline import EventLog, job_for_recipe, load_recipe, plan_job, run_job, stages
from compressor.pipeline.recipe import compose_yaml, parse_recipe
from compressor.record import StageRecord
from compressor.sharing import ShareConfig

RECIPES = Path(__file__).parent.parent / "recipes"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def events(stderr: str) -> list[dict]:
    """The JSON lines of ``--log-format jsonl`` (every line must be one)."""
    return [json.loads(line) for line in stderr.splitlines() if line]


def test_a_recipe_builds_the_commands_own_configs(tmp_path):
    (tmp_path / "texts.csv").write_text("text,label\na,x\n")
    recipe = load_recipe(write(tmp_path / "r.yaml", "stages:\n  - share: {groups: 2, lora-rank: 4}\n"
                                                    "  - finetune:\n      data: texts.csv\n      max_steps: 3\n  - evaluate\n"))
    assert recipe.name == "r"
    share, finetune, evaluate = recipe.stages
    assert isinstance(share.config, ShareConfig) and share.config.lora_rank == 4 and share.line == 2
    assert isinstance(finetune.config, FinetuneConfig) and finetune.config.max_steps == 3
    assert finetune.config.data == str((tmp_path / "texts.csv").resolve())  # relative to the recipe's folder
    assert evaluate.config.task == "auto"
    # the normalized form is what a job hashes: every option, defaults included
    assert recipe.normalized()[0] == {"stage": "share", "options": ShareConfig(groups=2, lora_rank=4).to_dict()}


@pytest.mark.parametrize("text,line,message", [
    ("stages:\n  - share:\n      groups: 2\n      lora_rnk: 3\n", 4, "unknown option(s) for share: lora_rnk; known:"),
    ("stages:\n  - analyze\n  - shar: {groups: 2}\n", 3, "unknown stage 'shar'; known stages: analyze, share, finetune, evaluate"),
    ("stages:\n  - share:\n      groups: 2\n      lora_rank: -1\n", 4, "share: lora_rank must be at least 0, got -1"),
    ("stages:\n  - finetune:\n      max_steps: 5\n      train: everything\n", 4, "train must be one of lora, lora+norms, all"),
    ("stages:\n  - share: {groups: [2\n", 3, "not valid YAML: expected ',' or ']', but got '<stream end>' "
                                          "(while parsing a flow sequence that starts on line 2)"),
    ("name: x\nstagse:\n  - analyze\n", 2, "unknown key 'stagse'"),
    ("stages:\n  - analyze: {groups: 2}\n  - analyze: {groups: 2, groups: 3}\n", 3, "'groups' is given twice"),
    ("stages: []\n", 1, "'stages' must be a non-empty list"),
    ("stages:\n  - share: {plan: 0-1, groups: 2}\n", 2, "give either --groups K or --plan, not both"),
])
def test_recipe_errors_name_their_line(tmp_path, text, line, message):
    path = write(tmp_path / "recipe.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert message in str(err.value)


def test_shipped_recipes_are_valid():
    names = {load_recipe(p).name for p in RECIPES.glob("*.yaml") if p.name != "manifest.yaml"}
    assert {"demo", "demo-full", "demo-depth", "demo-share", "quick", "baseline", "deploy", "prune-int8"} <= names
    demo = load_recipe(RECIPES / "demo.yaml")
    assert [s.name for s in demo.stages] == ["prune", "prune", "finetune", "quantize", "export", "report"]
    # 2 of 12 heads (round(0.17 * 12)) and half the FFN, then the vocabulary cut before distilling
    assert demo.stages[0].config.heads == 0.17 and demo.stages[0].config.ffn == 0.5
    assert round(demo.stages[0].config.heads * 12) == 2
    assert demo.stages[1].config.vocab_min_count == 2 and demo.stages[1].config.vocab_from
    assert demo.stages[3].config.embedding_bits == 4 and demo.stages[3].config.per_channel is True
    # a budget in steps, so that a busy machine trains the same model; the report scores the suite
    assert demo.stages[2].config.max_steps == 1200 and demo.stages[2].config.max_minutes is None
    assert demo.stages[2].config.group_by_length and demo.stages[2].config.lr_schedule == "linear"
    assert not demo.stages[5].config.fp32_baselines  # optimum's int8 routes are its rows
    # the full demo: the same stages with five times the distillation
    full = load_recipe(RECIPES / "demo-full.yaml")
    assert [s.name for s in full.stages] == [s.name for s in demo.stages]
    assert full.stages[2].config.max_steps == 3000 and full.stages[0].config == demo.stages[0].config
    assert full.stages[1].config == demo.stages[1].config and full.stages[3].config == demo.stages[3].config
    # it distils on the four data sets, never on a text the report's suite scores
    assert demo.stages[2].config.data == demo.stages[1].config.vocab_from
    assert demo.stages[2].config.holdout == "suite"
    assert demo.stages[2].config.holdout_suite().suite_test_size == demo.stages[5].config.suite_test_size
    assert demo.stages[4].config.optimize == 2 and demo.stages[5].config.suite
    depth = load_recipe(RECIPES / "demo-depth.yaml")
    assert [s.name for s in depth.stages] == ["prune", "finetune", "prune", "quantize", "export", "report"]
    assert depth.stages[0].config.drop_layers == 2
    shared = load_recipe(RECIPES / "demo-share.yaml")
    assert [s.name for s in shared.stages] == ["share", "prune", "finetune", "prune", "quantize", "export", "report"]
    assert shared.stages[0].config.groups == 5 and shared.stages[0].config.lora_rank == 0


@dataclass
class _CountConfig(StageConfig):
    """A toy stage's options."""

    add: int = 1


@dataclass
class _ScaleConfig(StageConfig):
    """Options of a toy stage that only configures the next one."""

    factor: int = 10


def test_one_registry_entry_adds_a_stage_and_a_stage_can_feed_the_next(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setattr(stages, "STAGES", dict(stages.STAGES))  # registrations stay inside this test
    seen = {}

    def run_count(run):
        seen["model"], seen["fed"] = run.model, run.fed
        run.output.mkdir()
        factor = run.fed["scale"].factor if "scale" in run.fed else 1
        return StageRecord("count", run.config.to_dict(), 1, 1, 4, 4, {"value": run.config.add * factor})

    stages.register(stages.Stage("count", _CountConfig, run_count, key_metrics=("metrics.value",)))
    stages.register(stages.Stage("scale", _ScaleConfig, None, feeds="count"))
    with pytest.raises(ValueError, match="already registered"):
        stages.register(stages.Stage("count", _CountConfig, run_count))

    bad = write(tmp_path / "bad.yaml", "stages:\n  - scale: {factor: 3}\n  - analyze\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: scale sets the options of the count stage, which must come right after it"):
        load_recipe(bad)

    recipe = load_recipe(write(tmp_path / "r.yaml", "stages:\n  - scale: {factor: 3}\n  - count: {add: 2}\n"))
    job = job_for_recipe(recipe, tmp_path / "out", str(tiny_dirs["bert"]))
    result = run_job(job, plan_job(job).keys, log=EventLog(keep=True))
    assert result.status == "done" and result.metrics == {"count.value": 6}
    assert seen["model"] == str(tiny_dirs["bert"]) and isinstance(seen["fed"]["scale"], _ScaleConfig)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "01-count", "DONE.json", "job.json", "report.json", "report.md"]


def test_inline_recipe_line_numbers_are_the_manifests():
    node = compose_yaml("jobs:\n  - model: x\n    recipe:\n      stages:\n        - evaluate: {tset_size: 5}\n", "m.yaml")
    recipe_node = node.value[0][1].value[0].value[1][1]
    with pytest.raises(ConfigError, match=r"^m.yaml:5: evaluate: unknown option"):
        parse_recipe(recipe_node, source="m.yaml", base=Path("."), default_name="inline")


def test_compress_run_then_again_skips_and_a_jsonl_log(tiny_dirs, tmp_path):
    out = tmp_path / "job"
    args = ["run", str(RECIPES / "quick.yaml"), "--model", str(tiny_dirs["bert"]), "-o", str(out), "--json", "-"]
    first = CliRunner().invoke(cli, ["--log-format", "jsonl", *args])
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert result["status"] == "done" and result["params_after"] < result["params_before"]
    assert result["metrics"]["finetune.steps"] == 5 and 0.0 <= result["metrics"]["evaluate.accuracy"] <= 1.0
    # progress events come between them when a stage runs long (a loaded machine)
    kinds = [(e["event"], e.get("stage")) for e in events(first.stderr) if e["event"] != "progress"]
    assert kinds == [("job_start", None),
                     *[(k, s) for s in ("01-analyze", "02-share", "03-finetune", "04-evaluate") for k in ("stage_start", "stage_end")],
                     ("job_end", None)]
    # every stage's record is in its folder and in the report
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["analyze", "share", "finetune", "evaluate"]
    assert json.loads((out / "02-share" / "stage.json").read_text())["record"]["params_after"] == result["params_after"]
    assert (out / "03-finetune" / "compress.json").is_file()  # the fine-tuned checkpoint

    again = CliRunner().invoke(cli, ["--log-format", "jsonl", *args])
    assert again.exit_code == 0, again.output
    skipped = json.loads(again.stdout)
    assert skipped["status"] == "skipped" and skipped["metrics"] == result["metrics"]
    assert [e["event"] for e in events(again.stderr)] == ["job_skip"]
    dry = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert json.loads(dry.stdout)["action"] == "skip"


def test_prune_quantize_export_report_in_a_recipe(tiny_dirs, tmp_path):
    """The deployment stages through `compress run`: quantize feeds export, report finds the export."""
    recipe = write(tmp_path / "deploy.yaml", f"""stages:
  - prune: {{heads: 0.5, ffn: 0.5, score: magnitude}}
  - quantize: {{mode: int8}}
  - export: {{check_lengths: [8, 16]}}
  - report:
      data: {RECIPES / "data" / "sample.csv"}
      train_size: 80
      test_size: 40
      max_length: 16
      batch_sizes: [1, 4]
      seq_len: 16
      warmup: 1
      repeats: 2
""")
    out = tmp_path / "job"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--model", str(tiny_dirs["bert"]), "-o", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["export.precision"] == "int8" and metrics["export.check.mean_cosine"] > 0.9
    assert (out / "02-export" / "model.onnx").is_file() and (out / "02-export" / "ort_config.json").is_file()
    report = json.loads((out / "03-report" / "report.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["original", "optimum ONNX fp32", "optimum ONNX int8",
                                                   "optimum O2 fp32", "optimum O2 int8", "02-export"]
    pruned = report["rows"][-1]
    # half the heads and neurons gone and int8: far smaller than the original's int8 file
    assert pruned["size_bytes"] < report["rows"][2]["size_bytes"]
    assert metrics["report.last_row.size_vs_optimum_int8"] == pytest.approx(pruned["size_vs_optimum_int8"])
    assert (out / "03-report" / "report.png").stat().st_size > 0


def test_compress_run_bad_input_is_one_line(tiny_dirs, tmp_path):
    recipe = write(tmp_path / "r.yaml", "stages:\n  - evaluate: {test_size: 0}\n")
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr == f"compress: error: {recipe}:2: evaluate: test_size must be a positive number, got 0\n"
    missing = CliRunner().invoke(cli, ["--log-format", "jsonl", "run", str(RECIPES / "quick.yaml"), "--model",
                                       str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert missing.exit_code == 2
    assert events(missing.stderr) == [{"event": "error", "time": events(missing.stderr)[0]["time"],
                                       "message": f"model folder {tmp_path / 'nope'} does not exist", "exit_code": 2}]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    taken = CliRunner().invoke(cli, ["run", str(RECIPES / "quick.yaml"), "--model", str(tiny_dirs["bert"]), "-o", str(tmp_path / "busy")])
    assert taken.exit_code == 2 and "is not a job folder written by compress" in taken.stderr
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"
    # a failure inside a stage: recorded in error.json, one line, and no DONE.json
    broken = write(tmp_path / "b.yaml", "stages:\n  - evaluate: {data: missing.csv}\n")
    failed = CliRunner().invoke(cli, ["run", str(broken), "--model", str(tiny_dirs["bert"]), "-o", str(tmp_path / "f")])
    assert failed.exit_code == 2
    assert failed.stderr.splitlines()[-1] == "compress: error: data file missing.csv does not exist"
    assert json.loads((tmp_path / "f" / "error.json").read_text())["error"] == "data file missing.csv does not exist"
    assert not (tmp_path / "f" / "DONE.json").exists()


def test_a_folder_holding_another_recipes_or_models_job_is_refused_without_overwrite(tiny_dirs, tmp_path):
    """`make demo` into a folder another recipe wrote (or the demo on another model): one line,
    exit 2, that job's stages as they were; --overwrite replaces it. The same recipe, edited,
    runs again in place as before."""
    first = write(tmp_path / "first.yaml", "stages:\n  - prune: {ffn: 0.5, max_samples: 8, fidelity: false}\n")
    out = tmp_path / "job"
    assert CliRunner().invoke(cli, ["run", str(first), "--model", str(tiny_dirs["bert"]), "-o", str(out)]).exit_code == 0
    marker = (out / "01-prune" / "stage.json").read_text()
    other = write(tmp_path / "other.yaml", "stages:\n  - prune: {heads: 0.25, max_samples: 8, fidelity: false}\n")
    for recipe, model, says in ((other, tiny_dirs["bert"], "holds the job of recipe 'first', not this one"),
                                (first, tiny_dirs["gpt2"], f"holds the job of model {tiny_dirs['bert']}, not this one")):
        refused = CliRunner().invoke(cli, ["run", str(recipe), "--model", str(model), "-o", str(out)])
        assert refused.exit_code == 2 and len(refused.stderr.splitlines()) == 1 and says in refused.stderr, refused.output
        assert (out / "01-prune" / "stage.json").read_text() == marker
    replaced = CliRunner().invoke(cli, ["run", str(other), "--model", str(tiny_dirs["bert"]), "-o", str(out),
                                        "--overwrite", "--json", "-"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "job.json").read_text())["recipe"] == "other"
    edited = write(tmp_path / "other.yaml", "stages:\n  - prune: {heads: 0.5, max_samples: 8, fidelity: false}\n")
    # the same model written another way (relative to here) is the same model
    again = CliRunner().invoke(cli, ["run", str(edited), "--model", os.path.relpath(tiny_dirs["bert"]), "-o", str(out)])
    assert again.exit_code == 0, again.output


def test_data_commands_print_json(tmp_path, monkeypatch):
    listed = CliRunner().invoke(cli, ["data", "list", "--json", "-"])
    assert listed.exit_code == 0
    assert [d["name"] for d in json.loads(listed.stdout)] == ["movie-snippets", "sms-spam", "trec", "bbc-news", "english-mix"]
    cached = tmp_path / "datasets" / "movie-snippets.v2.tsv"  # fetched already: no network needed
    cached.parent.mkdir()
    cached.write_text("text\tlabel\trating\ngood\tpos\t1.5\nbad\tneg\t-2\nfine\tpos\t0.5\n")
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    fetched = CliRunner().invoke(cli, ["data", "fetch", "--json", "-"])
    assert fetched.exit_code == 0, fetched.output
    assert json.loads(fetched.stdout) == {"name": "movie-snippets", "path": str(cached), "texts": 3,
                                          "labels": {"neg": 1, "pos": 2}}


def test_a_finetune_must_hold_out_the_suite_its_report_scores(tmp_path):
    report = "  - report: {suite: true, suite_train_size: 1000, suite_test_size: 500}\n"
    path = write(tmp_path / "r.yaml", "stages:\n  - finetune:\n      holdout: suite\n" + report)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == (f"{path}:2: finetune holds out the suite's test splits of movie-snippets,sms-spam,trec,"
                              "bbc-news at 2000/1000 (seed 0), and the report on line 4 scores movie-snippets,sms-spam,"
                              "trec,bbc-news at 1000/500 (seed 0); give finetune the report's suite_tasks, "
                              "suite_train_size and suite_test_size")
    same = load_recipe(write(tmp_path / "same.yaml", "stages:\n  - finetune:\n      holdout: suite\n"
                                                      "      suite_train_size: 1000\n      suite_test_size: 500\n" + report))
    assert same.stages[0].config.holdout_suite().suite_test_size == 500


def test_paths_inside_lists_are_read_from_the_recipes_folder_and_fingerprinted(tmp_path):
    from compressor.pipeline.job import named_paths

    for name in ("a.txt", "b.csv"):
        (tmp_path / name).write_text("text,label\nsome text,x\n")
    recipe = load_recipe(write(tmp_path / "r.yaml", "stages:\n  - finetune:\n      data: movie-snippets,a.txt\n"
                                                    "      holdout: suite\n      suite_tasks: [b.csv, trec]\n"))
    config = recipe.stages[0].config
    assert config.data == f"movie-snippets,{(tmp_path / 'a.txt').resolve()}"
    assert config.suite_tasks == [str((tmp_path / "b.csv").resolve()), "trec"]
    assert named_paths(config.data) == [str((tmp_path / "a.txt").resolve())]
    assert named_paths(config.suite_tasks) == [str((tmp_path / "b.csv").resolve())]


def test_a_finetune_must_hold_out_the_suites_seed(tmp_path):
    path = write(tmp_path / "r.yaml", "stages:\n  - finetune:\n      holdout: suite\n  - report: {suite: true, seed: 1}\n")
    with pytest.raises(ConfigError, match=r"r.yaml:2: finetune holds out the suite's test splits of seed 0, and the "
                                          r"report on line 4 scores those of seed 1; give the report seed 0"):
        load_recipe(path)
