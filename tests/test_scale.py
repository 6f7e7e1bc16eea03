"""The large-model paths (issue 34) on tiny seeded models: each gives what the whole-model path
gives. A bf16 checkpoint stays bf16 through share and prune, sharded checkpoints load to
identical weights, the fidelity against the original's recorded outputs (spilled to disk or
not) equals the one against a copy of the model, and the bad inputs get one line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.fidelity import Reference, compare, fidelity
from compressor.models import load_model
from compressor.models import checkpoint as ckpt
from tiny_models import save_model

TEXTS = ["the cat sat on the mat.", "a quick brown fox jumps over the lazy dog!", "hello world, again and again;",
         "numbers 1 2 3 and more text here", "short one", "the last text of the calibration set is this one."] * 3


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """A tiny Llama saved in bf16 (its config names bfloat16, as SmolLM2's and Llama 3's do)."""
    folder = tmp_path_factory.mktemp("bf16") / "llama"
    save_model("llama", folder)
    model = load_model(folder, dtype="float32").model.to(torch.bfloat16)
    model.save_pretrained(folder)
    assert load_model(folder, dtype="auto").model.dtype == torch.bfloat16  # its config names bfloat16
    return folder


def test_a_bf16_model_is_read_shared_and_written_in_bf16_and_reloads_identically(bf16_llama, tmp_path, monkeypatch):
    """share keeps the checkpoint's dtype; past the shard size the weights are shards with an
    index, and they load back to the very tensors that were written (aliases included)."""
    monkeypatch.setattr(ckpt, "SHARD_BYTES", 20_000)  # a tiny model in several files
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS))
    out = tmp_path / "shared"
    result = invoke("share", bf16_llama, "--plan", "0-1,2-3", "--lora-rank", "2", "--data", data, "-o", out)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 1 and (out / ckpt.INDEX).is_file() and not (out / ckpt.WEIGHTS).exists()
    assert json.loads((out / "compress.json").read_text())["dtype"] == "bfloat16"
    record = json.loads((out / "share_report.json").read_text())
    assert record["metrics"]["checkpoint_bytes"] == sum((out / f).stat().st_size for f in files)

    loaded = load_model(out)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    written = {}
    for f in files:
        from safetensors.torch import load_file

        written.update(load_file(out / f))
    state = loaded.model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    # the shared base is one tensor: stored once, read by both members
    blocks = loaded.adapter.blocks(loaded.model)
    assert blocks[0].mlp.up_proj.base_layer is blocks[1].mlp.up_proj.base_layer
    fid = record["metrics"]["fidelity"]
    assert 0.0 < fid["embedding_cosine"] <= 1.0 and fid["next_token_kl"] > 0.0


def test_a_missing_shard_is_one_line_naming_it(bf16_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "SHARD_BYTES", 20_000)
    out = tmp_path / "pruned"
    assert invoke("prune", bf16_llama, "--drop-layers", "1", "--no-fidelity", "-o", out).exit_code == 0
    assert json.loads((out / "compress.json").read_text())["dtype"] == "bfloat16"
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    result = invoke("inspect", out)
    assert result.exit_code != 0
    assert victim.name in result.output and "missing" in result.output
    assert "Traceback" not in result.output


def test_float32_on_request_and_the_bf16_analysis_reads_as_the_float32_one(bf16_llama, tmp_path):
    """--dtype float32 reads a bf16 checkpoint in float32; the analysis of the bf16 model (its
    similarities computed in float32) is within bf16's rounding of the float32 model's."""
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS))
    runs = {}
    for dtype in ("auto", "float32"):
        path = tmp_path / f"{dtype}.json"
        result = invoke("analyze", bf16_llama, "--dtype", dtype, "--data", data, "--json", path)
        assert result.exit_code == 0, result.output
        runs[dtype] = json.loads(path.read_text())["metrics"]
    for key in ("cka", "angular_distance", "block_influence"):
        a, b = torch.tensor(runs["auto"]["activations"][key]), torch.tensor(runs["float32"]["activations"][key])
        assert torch.allclose(a, b, atol=0.03), key
    a, b = torch.tensor(runs["auto"]["weights"]["raw_mean"]), torch.tensor(runs["float32"]["weights"]["raw_mean"])
    assert torch.allclose(a, b, atol=1e-3)


def test_the_recorded_original_gives_the_fidelity_a_copy_gives_in_memory_or_spilled(tiny_dirs, monkeypatch):
    """`compare` against the original's recorded outputs equals `fidelity` against the model
    itself, whether the outputs stay in memory or go to disk; the spill folder is removed."""
    import copy

    original = load_model(tiny_dirs["llama"])
    changed = copy.deepcopy(original)
    with torch.no_grad():
        for p in changed.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    whole = fidelity(changed, original, TEXTS, batch_size=4)
    monkeypatch.setattr(Reference, "MEMORY_BYTES", 0)
    with Reference(original, TEXTS, batch_size=4) as reference:
        spill = reference._spill.name
        spilled = compare(changed, reference)
    from pathlib import Path

    assert not Path(spill).exists()
    assert spilled == whole
    assert whole["next_token_kl"] > 0 and len(whole["hidden_state_error"]) == 4


def test_a_model_larger_than_the_memory_left_is_refused_before_reading_saying_what_fits(bf16_llama, monkeypatch):
    """With less memory than its float32 weights take, --dtype float32 is refused up front with
    what it needs and that its own bf16 takes half; the bf16 read still fits."""
    from compressor import io

    numel = sum(p.numel() for p in load_model(bf16_llama).model.parameters())
    monkeypatch.setattr(io, "available_memory_bytes", lambda: int(numel * 3.5))  # bf16 fits, float32 does not
    result = invoke("inspect", bf16_llama, "--dtype", "float32")
    assert result.exit_code == 2
    assert "float32" in result.output and "--dtype auto" in result.output and "bfloat16" in result.output
    assert invoke("inspect", bf16_llama).exit_code == 0
    monkeypatch.setattr(io, "available_memory_bytes", lambda: numel)
    result = invoke("inspect", bf16_llama)
    assert result.exit_code == 2 and "needs" in result.output and "Traceback" not in result.output


def test_a_disk_too_small_or_filling_while_writing_shards_leaves_the_output_as_it_was(bf16_llama, tmp_path,
                                                                                      monkeypatch):
    """Too little free space is refused before writing; a disk that fills between two shards
    is one line too, and the folder the user had is untouched, with nothing staged beside it."""
    import errno
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(ckpt, "SHARD_BYTES", 20_000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    result = invoke("prune", bf16_llama, "--drop-layers", "1", "--no-fidelity", "-o", out, "--overwrite")
    assert result.exit_code == 2 and "free" in result.output and "nothing was written" in result.output
    monkeypatch.undo()
    monkeypatch.setattr(ckpt, "SHARD_BYTES", 20_000)

    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def fills(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills)
    result = invoke("prune", bf16_llama, "--drop-layers", "1", "--no-fidelity", "-o", out, "--overwrite")
    assert result.exit_code == 2 and "disk filled" in result.output and "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["mine.txt"]


def test_the_float32_leading_eigenpairs_of_a_large_residual_are_its_top_singular_triplets(monkeypatch):
    """Above FLOAT64_SIDE the LoRA init takes the Gram's leading eigenpairs in float32 (only the
    rank wanted): the same singular values and rank-r approximation as a float64 SVD."""
    from compressor.models import shared

    monkeypatch.setattr(shared, "FLOAT64_SIDE", 16)
    matrix = torch.randn(40, 90, generator=torch.Generator().manual_seed(0))
    u, s, vh = shared.top_singular(matrix, 4)
    U, S, V = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert torch.allclose(s, S[:4], rtol=1e-5)
    assert torch.allclose((u * s) @ vh, (U[:, :4] * S[:4]) @ V[:4], atol=1e-4)
    tall_u, tall_s, tall_vh = shared.top_singular(matrix.T, 4)  # the other Gram (M^T M)
    assert torch.allclose(tall_s, S[:4], rtol=1e-5)


@pytest.fixture(scope="module")
def bf16_shared(bf16_llama, tmp_path_factory):
    """The bf16 Llama shared 4 -> 2 with rank-2 deltas (a bf16 checkpoint), and its texts."""
    folder = tmp_path_factory.mktemp("bf16shared")
    data = folder / "texts.txt"
    data.write_text("\n".join(TEXTS))
    assert invoke("share", bf16_llama, "--plan", "0-1,2-3", "--lora-rank", "2", "--no-fidelity", "-o",
                  folder / "shared").exit_code == 0
    return folder / "shared", data


def _distil(shared, teacher, data, out, *extra):
    result = invoke("finetune", shared, "--teacher", teacher, "--data", data, "--batch-size", "4", "--lr", "1e-2",
                    "--save-every", "0", "-o", out, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "finetune_report.json").read_text())["metrics"]


def test_a_bf16_student_trains_in_float32_on_request_and_says_so(bf16_llama, bf16_shared, tmp_path):
    """--precision float32: the whole student trains in float32 (a float32 checkpoint), the
    teacher read in float32 too, and the record names the dtypes."""
    shared, data = bf16_shared
    out = tmp_path / "tuned"
    metrics = _distil(shared, bf16_llama, data, out, "--max-steps", "2", "--precision", "float32")
    assert json.loads((out / "compress.json").read_text())["dtype"] == "float32"
    tuned, before = load_model(out), load_model(shared)
    assert {p.dtype for p in tuned.model.parameters()} == {torch.float32}
    lora = [n for n, _ in tuned.model.named_parameters() if "lora_B" in n]
    moved = [n for n in lora if not torch.equal(tuned.model.get_parameter(n), before.model.get_parameter(n).float())]
    assert moved, "no LoRA delta moved in 2 steps"
    assert metrics["precision"] == "float32"
    assert metrics["dtype"] == {"loaded": "bfloat16", "trained": "float32", "base": "float32", "teacher": "float32"}


def test_a_bf16_students_deltas_train_on_its_frozen_bf16_base_by_default(bf16_llama, bf16_shared, tmp_path):
    """--precision auto on a bf16 student that trains its deltas: the base and the teacher stay
    bf16 (the base's bits unchanged), the deltas and norms move, the checkpoint is bf16, and the
    record says what trained and what memory it took."""
    shared, data = bf16_shared
    out = tmp_path / "tuned"
    metrics = _distil(shared, bf16_llama, data, out, "--max-steps", "3")
    assert metrics["precision"] == "mixed"
    assert metrics["dtype"] == {"loaded": "bfloat16", "trained": "float32", "base": "bfloat16", "teacher": "bfloat16"}
    memory = metrics["memory"]
    assert memory["peak_rss_mib"] > 0 and memory["teacher_weights_mib"] > 0
    assert memory["gradients_and_optimizer_mib"] == round(metrics["trainable_params"] * 12 / 2**20, 1)
    assert metrics["loss_last"] < metrics["loss_first"]
    assert json.loads((out / "compress.json").read_text())["dtype"] == "bfloat16"
    tuned, before = load_model(out), load_model(shared)
    assert {p.dtype for p in tuned.model.parameters()} == {torch.bfloat16}
    names = dict(before.model.named_parameters())
    frozen = [n for n in names if "lora_" not in n and "norm" not in n]
    assert frozen and all(torch.equal(tuned.model.get_parameter(n), names[n]) for n in frozen)
    assert any(not torch.equal(tuned.model.get_parameter(n), names[n]) for n in names if "lora_B" in n)


def test_mixed_precision_keeps_the_buffers_in_float32(bf16_shared, bf16_llama, tmp_path):
    """Only parameters go to 16 bits: RoPE's inv_freq (float32 in transformers on purpose) stays."""
    from compressor.finetune import FinetuneConfig, finetune

    shared, data = bf16_shared
    student = load_model(shared)
    assert student.model.model.rotary_emb.inv_freq.dtype == torch.float32
    config = FinetuneConfig(teacher=str(bf16_llama), data=str(data), max_steps=1, batch_size=4, save_every=0)
    student, record = finetune(student, config, output=tmp_path / "tuned", progress=False)
    assert record.metrics["precision"] == "mixed"
    assert student.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert student.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_mixed_run_resumed_takes_the_steps_an_unbroken_run_takes(bf16_llama, bf16_shared, tmp_path):
    """The float32 deltas a bf16 checkpoint rounds are kept in the trainer state: 2 steps, then
    2 more resumed from the checkpoint, give the losses and weights of 4 steps at once."""
    shared, data = bf16_shared
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    straight = _distil(shared, bf16_llama, data, whole, "--max-steps", "4")
    _distil(shared, bf16_llama, data, broken, "--max-steps", "2")
    resumed = invoke("finetune", broken, "--teacher", bf16_llama, "--data", data, "--batch-size", "4", "--lr", "1e-2",
                     "--save-every", "0", "--max-steps", "4", "--resume", "-o", broken, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    history = json.loads((broken / "finetune_report.json").read_text())["metrics"]["history"]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-6)
    a, b = load_model(whole).model, load_model(broken).model
    assert all(torch.equal(p, b.get_parameter(n)) for n, p in a.named_parameters())


def test_gradient_checkpointing_takes_the_same_steps(tiny_dirs, tmp_path):
    """Each block recomputed in the backward pass: the same losses and weights as without."""
    shared = tmp_path / "shared"
    assert invoke("share", tiny_dirs["llama"], "--plan", "0-1,2-3", "--lora-rank", "2", "--no-fidelity", "-o",
                  shared).exit_code == 0
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS))
    plain = _distil(shared, tiny_dirs["llama"], data, tmp_path / "plain", "--max-steps", "2")
    kept = _distil(shared, tiny_dirs["llama"], data, tmp_path / "kept", "--max-steps", "2", "--gradient-checkpointing")
    assert kept["gradient_checkpointing"] and not plain["gradient_checkpointing"]
    assert [h["loss"] for h in kept["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-6)
    a, b = load_model(tmp_path / "plain").model, load_model(tmp_path / "kept").model
    assert all(torch.allclose(p, b.get_parameter(n), atol=1e-6) for n, p in a.named_parameters())


def test_a_distillation_too_big_for_memory_is_refused_before_the_teacher_is_read(bf16_llama, bf16_shared, tmp_path,
                                                                                 monkeypatch):
    """Teacher + float32 student + AdamW's state over the memory left: one line saying what it
    needs and that --precision mixed needs less; nothing written."""
    from compressor import io
    from compressor.models.memory import weights_numel

    shared, data = bf16_shared
    numel = weights_numel(bf16_llama, "t")
    monkeypatch.setattr(io, "available_memory_bytes", lambda: numel * 6)  # bf16 teacher fits, float32 pair not
    out = tmp_path / "tuned"
    result = invoke("finetune", shared, "--teacher", bf16_llama, "--data", data, "--max-steps", "1", "--precision",
                    "float32", "-o", out)
    assert result.exit_code != 0 and not out.exists()
    line = result.output.strip().splitlines()[-1]
    assert "needs" in line and "GiB available" in line and "--precision mixed" in line, result.output
    assert _distil(shared, bf16_llama, data, out, "--max-steps", "1")["precision"] == "mixed"  # which fits


@pytest.mark.parametrize("options, says", [({"train": "all"}, "--train all"),
                                          ({"quantize_aware": True}, "--quantize-aware")])
def test_mixed_precision_refuses_what_it_cannot_train(options, says):
    from compressor.errors import ConfigError
    from compressor.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match=says):
        FinetuneConfig(precision="mixed", **options)


def test_a_full_temporary_folder_while_keeping_the_originals_outputs_is_one_line(tiny_dirs, monkeypatch):
    import errno

    from compressor.errors import CompressError

    original = load_model(tiny_dirs["llama"])
    monkeypatch.setattr(Reference, "MEMORY_BYTES", 0)

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CompressError, match="--no-fidelity"):
        Reference(original, TEXTS, batch_size=4)


def test_the_size_check_names_float32_for_the_default_read(monkeypatch):
    from compressor import io
    from compressor.errors import ConfigError
    from compressor.models.memory import check_fits

    monkeypatch.setattr(io, "available_memory_bytes", lambda: 10**6)
    with pytest.raises(ConfigError, match="in float32 .*bfloat16"):
        check_fits(10**6, None, torch.bfloat16, "model")
