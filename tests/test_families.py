"""Every stage on every declared family: one recipe, analyze -> share -> finetune -> evaluate
-> prune -> int8 export -> report, on a tiny seeded model of each.

What a family cannot do (heads of DeBERTa, ModernBERT, GPT-NeoX and OPT; layers of ModernBERT)
is left out of its recipe, and the refusal itself is tested in test_prune.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from compressor.adapters import get_adapter
import yaml
from tiny_models import FAMILIES, by_family, make_model, save_sentence_mpnet

SAMPLE = Path(__file__).parent.parent / "recipes" / "data" / "sample.csv"


def recipe(family: str) -> str:
    adapter = get_adapter(make_model(family))
    heads = 0.0 if adapter.refusal("prune_heads") else 0.5
    layers = 0 if adapter.refusal("drop_layers") else 1
    return f"""stages:
  - analyze: {{max_samples: 8, max_tokens: 256}}
  - share: {{groups: 2, lora_rank: 4, max_samples: 8}}
  - finetune: {{data: {SAMPLE}, max_steps: 2, batch_size: 4, max_length: 16, save_every: 0}}
  - evaluate: {{data: {SAMPLE}, train_size: 40, test_size: 20, max_length: 16}}
  - prune: {{heads: {heads}, ffn: 0.25, drop_layers: {layers}, score: taylor, max_samples: 8}}
  - quantize: {{mode: int8}}
  - export: {{check_lengths: [8]}}
  - report: {{data: {SAMPLE}, train_size: 40, test_size: 20, max_length: 16, batch_sizes: [1], seq_len: 16, warmup: 1, repeats: 1,
              prompt_tokens: 16, new_tokens: 4, generation_repeats: 1, peak_memory: false}}
"""


# DeBERTa-v2 (~10 s) runs with -m slow: by default its sharing and export run in test_export
# and its refusals in test_prune, and the recipe's stages on the other core families here
@pytest.mark.parametrize("family", by_family(FAMILIES, slow={"deberta-v2"}))
def test_every_stage_runs_on_every_family(family, tiny_dirs, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe(family))
    out = tmp_path / "job"
    result = CliRunner().invoke(cli, ["run", str(path), "--model", str(tiny_dirs[family]), "-o", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    metrics = job["metrics"]
    assert len(metrics["analyze.grouping.plan"].split(",")) == 2  # two groups recommended, then shared
    assert metrics["share.fidelity.embedding_cosine"] > 0 and metrics["finetune.steps"] == 2
    if get_adapter(make_model(family)).is_decoder:
        assert metrics["evaluate.perplexity"] > 1
    else:
        assert 0 <= metrics["evaluate.accuracy"] <= 1
    assert metrics["export.precision"] == "int8" and metrics["export.check.mean_cosine"] >= 0.9
    report = json.loads((out / "07-report" / "report.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels[:3] == ["original", "optimum ONNX fp32", "optimum ONNX int8"] and labels[-1] == "06-export"
    # shared and pruned: fewer numbers than the original, and measured beside it
    assert job["params_after"] < job["params_before"]
    assert report["rows"][-1]["parameters"] < report["rows"][0]["parameters"]
    assert report["rows"][-1]["latency"] and report["rows"][-1]["value"] is not None
    if get_adapter(make_model(family)).is_decoder:  # generation measured for every row, optimum's with-past ones too
        assert all(r["generation"]["decode_tokens_per_s"] > 0 for r in report["rows"])
    else:  # encoders get optimum's O2 route as well
        assert labels[3:5] == ["optimum O2 fp32", "optimum O2 int8"]


@pytest.mark.slow
def test_the_demo_recipe_runs_on_an_mpnet_sentence_transformers_folder(minilm_dir, tmp_path):
    """recipes/demo.yaml as it is (heads and half the FFN pruned, the vocabulary cut, distilled,
    O2 int8 with 4-bit tables, the report against optimum's routes), its budgets made small, on
    an MPNet laid out as all-mpnet-base-v2 (seeded weights: no hub here): one head goes from
    every layer with the shared relative bias, and the export runs in sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    source = save_sentence_mpnet(tmp_path / "mpnet", minilm_dir / "vocab.txt")
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "demo.yaml").read_text())
    recipe.pop("model")
    small = {"finetune": dict(max_steps=2, suite_train_size=100, suite_test_size=50, batch_size=8, max_length=32),
             "report": dict(suite_train_size=100, suite_test_size=50, pool_size=50, repeats=1, train_size=100,
                            test_size=50, batch_sizes=[1])}
    for stage in recipe["stages"]:
        (name, options), = stage.items()
        options.update(small.get(name, {}))
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "job"
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "demo.yaml"), "--model", str(source), "-o", str(out),
                                      "--json", "-"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    config = json.loads((out / "01-prune" / "config.json").read_text())
    assert config["num_attention_heads"] == 6 and len({tuple(v) for v in config["pruned_heads"].values()}) == 1
    assert len(config["pruned_heads"]) == 4 and len(config["pruned_heads"]["0"]) == 1  # 0.17 of 6 heads
    assert json.loads((out / "02-prune" / "config.json").read_text())["vocab_size"] < 30527
    assert metrics["export.check.mean_cosine"] >= 0.99
    assert 0 < metrics["report.last_row.size_vs_optimum_o2_int8"] < 0.6
    model = SentenceTransformer(str(out / "04-export"), backend="onnx", device="cpu")
    assert model.encode(["a dull, lifeless script"]).shape == (1, 96)
