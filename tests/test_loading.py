"""Resolving and loading models: folders, sentence-transformers layouts, aliases, hub ids."""

import json
import shutil
import time

import pytest
import torch

from compressor.errors import ModelLoadError, UnsupportedModelError
from compressor.models import ALIASES, load_model, resolve


def test_local_folder(tiny_dirs):
    loaded = load_model(tiny_dirs["bert"])
    assert loaded.adapter.family == "bert"
    assert loaded.tokenizer is not None
    assert not loaded.model.training
    assert loaded.name == str(tiny_dirs["bert"])


def test_decoder_keeps_lm_head_and_gets_pad_token(tiny_dirs):
    loaded = load_model(tiny_dirs["gpt2"])
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    assert loaded.tokenizer.pad_token is not None


def test_sentence_transformers_folder_with_subfolder(tiny_dirs, tmp_path):
    root = tmp_path / "st"
    shutil.copytree(tiny_dirs["bert"], root / "0_Transformer")
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    loaded = load_model(root)
    assert loaded.source == str(root / "0_Transformer")
    assert loaded.pooling == "cls"


def test_bundled_minilm_is_the_default():
    loaded = load_model(None)
    g = loaded.geometry
    assert (g.num_layers, g.hidden_size, g.num_heads, g.intermediate_size) == (6, 384, 12, 1536)
    assert loaded.pooling == "mean"
    assert loaded.name.startswith("all-MiniLM-L6-v2")
    # by alias or by its folder (what a checkpoint records as its origin), named the same
    assert load_model("bundled").name == load_model(loaded.source).name == loaded.name
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 22_000_000 < params < 23_000_000  # 22.7M, as its model card says
    enc = loaded.tokenizer(["a real sentence"], return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**enc).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()


def test_aliases_resolve_to_hub_ids():
    assert resolve("bert-base") == ("google-bert/bert-base-uncased", False)
    assert resolve("gpt2") == (ALIASES["gpt2"], False)
    assert resolve("someorg/some-model") == ("someorg/some-model", False)


def test_hub_id_offline_fails_fast_and_clearly():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="pass a local model folder") as e:
        load_model("bert-base")
    assert "google-bert/bert-base-uncased" in str(e.value)
    assert time.perf_counter() - start < 10
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/folder", "no/such/folder/", "bad name with spaces"])
def test_missing_paths(spec):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(spec)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "readme.txt")


def test_broken_config_and_missing_weights(tmp_path, tiny_dirs):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not read the config"):
        load_model(broken)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(tiny_dirs["bert"] / "config.json", no_weights)
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_model(no_weights)


def test_unsupported_and_unknown_architectures(tmp_path):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UnsupportedModelError, match="t5 is an encoder-decoder model; compress handles encoder-only"):
        load_model(t5)
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "mything", "auto_map": {"AutoConfig": "x.XConfig"}}))
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(custom)
