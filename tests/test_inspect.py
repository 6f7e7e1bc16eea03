"""`compress inspect`, inferred adapters through the commands, and models no adapter can describe."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from cli.main import cli
from tiny_models import make_tokenizer


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class OddBertConfig(transformers.BertConfig):
    model_type = "odd-bert"


class OddBertModel(transformers.BertModel):
    """A BERT whose attention carries a projection no role explains (it is never used)."""

    config_class = OddBertConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.encoder.layer:
            layer.attention.self.extra = torch.nn.Linear(config.hidden_size, 48)


transformers.AutoConfig.register("odd-bert", OddBertConfig)
transformers.AutoModel.register(OddBertConfig, OddBertModel)


def _save(model, folder):
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def biogpt_dir(tmp_path_factory):
    """BioGPT: a decoder transformers knows and compress declares no adapter for."""
    config = transformers.BioGptConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                       vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    return _save(transformers.BioGptForCausalLM(config).eval(), tmp_path_factory.mktemp("biogpt") / "m")


def test_inspect_a_declared_family(tiny_dirs):
    result = run("inspect", tiny_dirs["phi3"], "--json", "-")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert (d["adapter"], d["source"], d["model_type"]) == ("phi3", "declared", "phi3")
    roles = {r["role"]: r for r in d["roles"]}
    assert roles["key"]["module"] == "layers.<i>.self_attn.qkv_proj" and roles["key"]["shape"] == [16, 32]
    assert roles["key"]["rows"] == "rows 32-47" and roles["ffn_in"]["rows"] == "rows 64-127"
    assert d["fused"]["self_attn.qkv_proj"] == {"roles": ["query", "key", "value"], "layout": "stacked"}
    assert {c["name"]: c["status"] for c in d["checks"]} == {
        "mapping": "passed", "value rows": "passed", "permute neurons": "passed", "permute heads": "passed",
        "prune heads": "passed", "prune ffn": "passed"}
    text = run("inspect", tiny_dirs["gpt_neox"])
    assert text.exit_code == 0 and "per head" in text.output and "refused:" in text.output
    assert "prune attention heads: its head size is hidden_size / num_attention_heads" in text.output


def test_inspect_infer_matches_declared(tiny_dirs):
    declared = json.loads(run("inspect", tiny_dirs["modernbert"], "--json", "-").stdout)
    inferred = json.loads(run("inspect", tiny_dirs["modernbert"], "--infer", "--json", "-").stdout)
    assert inferred["source"] == "inferred" and declared["source"] == "declared"
    assert [r["module"] for r in inferred["roles"]] == [r["module"] for r in declared["roles"]]
    assert inferred["fused"] == declared["fused"]


def test_an_undeclared_family_runs_on_its_inferred_adapter(biogpt_dir, tmp_path):
    d = json.loads(run("inspect", biogpt_dir, "--json", "-").stdout)
    assert d["source"] == "inferred" and d["is_decoder"]
    assert all(c["status"] != "FAILED" for c in d["checks"] if c["name"] != "prune heads")
    assert not d["capabilities"]["prune_heads"]["allowed"]  # head size is hidden / heads
    shared = run("share", biogpt_dir, "--plan", "0-1,2-3", "--lora-rank", "4", "-o", tmp_path / "shared", "--json", "-")
    assert shared.exit_code == 0, shared.output
    assert json.loads(shared.stdout)["params_after"] < json.loads(shared.stdout)["params_before"]
    pruned = run("prune", tmp_path / "shared", "--ffn", "0.5", "-o", tmp_path / "pruned", "--json", "-")
    assert pruned.exit_code == 0, pruned.output
    refused = run("prune", biogpt_dir, "--heads", "0.5", "-o", tmp_path / "no")
    assert refused.exit_code == 2 and not (tmp_path / "no").exists()
    assert "cannot prune attention heads: self-check 'prune heads' failed" in refused.stderr


def test_no_recognisable_block_list(tmp_path):
    """ALBERT runs one shared layer num_hidden_layers times: there is no list of blocks."""
    config = transformers.AlbertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                       embedding_size=16, vocab_size=128)
    folder = _save(transformers.AlbertModel(config).eval(), tmp_path / "albert")
    result = run("inspect", folder)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "self-check 'block list' failed: no list of num_hidden_layers (3) identical blocks" in result.stderr


def test_not_a_text_model(tmp_path):
    folder = tmp_path / "resnet"
    transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]).save_pretrained(folder)
    result = run("inspect", folder)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "resnet has no token vocabulary" in result.stderr


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "holds a JSON list, not a config object"),
    ('"bert"', "holds a JSON str, not a config object"),
    ("{}", "names no model_type"),
    ("{not json", "is not valid JSON"),
])
def test_config_files_that_are_not_configs(tmp_path, content, message):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    result = run("inspect", folder)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_weights_of_another_shape_name_the_tensor(tiny_dirs, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    result = run("inspect", folder)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1  # no transformers warnings before it
    assert "tensors missing" in result.stderr


def test_a_linear_no_role_explains_is_refused_by_every_command(tmp_path):
    config = OddBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=128, max_position_embeddings=64)
    folder = _save(OddBertModel(config).eval(), tmp_path / "odd")
    for command in (["inspect", folder], ["analyze", folder, "-o", tmp_path / "a"], ["share", folder, "--groups", "2", "-o", tmp_path / "s"]):
        result = run(*command)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "self-check 'label linears' failed: attention.self.extra (48 x 32) matches no role" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "s").exists()


def test_inspect_json_file_needs_overwrite(tiny_dirs, tmp_path):
    out = tmp_path / "adapter.json"
    assert run("inspect", tiny_dirs["bert"], "--json", out).exit_code == 0
    assert json.loads(out.read_text())["adapter"] == "bert"
    again = run("inspect", tiny_dirs["bert"], "--json", out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_a_bf16_checkpoint_is_read_in_bf16_and_its_checks_pass(tmp_path):
    """``--dtype auto`` (the default) keeps a bf16 checkpoint in bf16, half float32's memory, and
    every self-check passes at bf16's tolerance; ``--dtype float32`` reads it in float32; a dtype
    that is not one is refused in one line."""
    from tiny_models import make_model

    folder = _save(make_model("llama").to(torch.bfloat16), tmp_path / "bf16")
    for flag, dtype in (((), "bfloat16"), (("--dtype", "float32"), "float32")):
        result = run("inspect", folder, *flag, "--json", "-")
        assert result.exit_code == 0, result.output
        d = json.loads(result.stdout)
        assert d["dtype"] == dtype and {c["status"] for c in d["checks"]} == {"passed"}
    bad = run("inspect", folder, "--dtype", "int8")
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "--dtype" in bad.output
