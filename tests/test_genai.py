"""``compress export`` in onnxruntime-genai's layout on tiny decoders whose heads are 16 wide
(the narrowest GroupQueryAttention runs): every declared decoder family and an inferred one loads
in ``onnxruntime_genai.Model`` and decodes PyTorch's greedy tokens in fp32; int4 stays within the
export check; shared weights are one initializer; pruned and dropped models export as they are;
bad input fails in one line with nothing written.

The folders are read back the way a user runs them (``onnxruntime_genai`` on a prompt the export
never saw) and with ``onnx``, not only through the export's own record.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from click.testing import CliRunner
from tiny_models import by_family, make_tokenizer, save_model

from cli.main import cli
from compressor.export import ExportConfig, export
from compressor.models import load_model, unique_parameters
from compressor.pruning import PruneConfig, prune
from compressor.quantization import method_config
from compressor.sharing import ShareConfig, share

og = pytest.importorskip("onnxruntime_genai")

#: Geometry that gives 16-wide heads, per family (the tiny models' own heads are 8 wide).
WIDE = {"gpt2": dict(n_embd=64), "opt": dict(hidden_size=64, word_embed_proj_dim=64),
        "gpt_neox": dict(hidden_size=128, rotary_pct=0.5)}
HEAD_16 = {"qwen3", "gemma", "gemma2", "gemma3_text"}
DECODERS = ["gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "opt"]
PROMPT = [5, 40, 22, 17, 9, 31, 12, 44, 8, 27, 19, 6]  # token ids of no text the export checks on


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            if family == "biogpt":  # a decoder no adapter is declared for
                config = transformers.BioGptConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                   intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                                                   pad_token_id=0)
                torch.manual_seed(0)
                made[family] = root / family
                transformers.BioGptForCausalLM(config).eval().save_pretrained(made[family])
                make_tokenizer().save_pretrained(made[family])
            else:
                overrides = WIDE.get(family, dict(hidden_size=64, **({"head_dim": 16} if family in HEAD_16 else {})))
                made[family] = save_model(family, root / family, **overrides)
        return made[family]

    return get


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def genai_greedy(folder: Path, prompt: list[int], steps: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    out = []
    while len(out) < steps:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def torch_greedy(model, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ops(folder: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


# by default Llama alone (its layout is what every rotary family shares); GPT-2's learned
# positions and an inferred BioGPT with -m slow, beside the other families
@pytest.mark.parametrize("family", by_family(DECODERS, slow={"gpt2"}) + [pytest.param("biogpt", marks=pytest.mark.slow)])
def test_fp32_decodes_as_pytorch(wide_dirs, tmp_path, family):
    loaded = load_model(wide_dirs(family))
    record = export(loaded, ExportConfig(), tmp_path / "g")
    m = record.metrics
    assert m["layout"] == "genai" and m["ort_class"] == "onnxruntime_genai.Model"
    assert m["check"]["generation"] == {"new_tokens": 32, "prompts": 1, "token_agreement": 1.0, "passed": True}
    assert m["check"]["max_abs_diff"] < 1e-4
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "g").iterdir()}
    # a user's run on a prompt the check never saw: the runtime's own greedy loop, token for token
    assert genai_greedy(tmp_path / "g", PROMPT, 24) == torch_greedy(loaded.model, PROMPT, 24)
    counts = ops(tmp_path / "g")
    assert counts["GroupQueryAttention"] == loaded.model.config.num_hidden_layers
    assert counts["MatMulNBits"] == 0


def test_int4_blocks_and_tied_lookup(wide_dirs, tmp_path):
    """GPT-2 ties its head to its token table: int4 stores the head's blocks once and the lookup
    reads those very blocks; every projection is MatMulNBits; logits stay close to PyTorch's."""
    loaded = load_model(wide_dirs("gpt2"))
    fp32 = export(loaded, ExportConfig(), tmp_path / "fp32")
    record = export(loaded, ExportConfig(), tmp_path / "int4", quantize=method_config("int4", block_size=16))
    m = record.metrics
    assert m["precision"] == "int4" and m["check"]["mean_cosine"] >= 0.8
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 4 + 1 and not any(n.op_type == "MatMul" for n in graph.node)
    (lookup,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    head = next(n for n in nbits if n.name.startswith("lm_head"))
    assert lookup.input[0] == head.input[1]  # the same uint8 blocks
    assert m["file_bytes"] < fp32.metrics["file_bytes"] / 3  # the position table and the norms stay float


def test_int4_choices_gptq_int8_exceptions_and_8bit_tables(wide_dirs, tmp_path):
    """GPTQ's blocks, the most sensitive projections kept in 8 bits, an untied head and token table
    in 8-bit blocks: each is what the graph stores."""
    loaded = load_model(wide_dirs("llama"))
    int4 = method_config("int4", block_size=16, int4_method="gptq", int8_share=0.2, embedding_bits=8)
    record = export(loaded, ExportConfig(), tmp_path / "g", quantize=int4)
    blocks = record.metrics["graph"]["blocks"]
    assert blocks["int8"] >= 1 and blocks["fitted"] >= 1 and blocks["fitted"] + blocks["int8"] == 4 * 4
    assert blocks["head_bits"] == 8 and record.metrics["check"]["mean_cosine"] >= 0.8
    graph = onnx.load(str(tmp_path / "g" / "model.onnx"), load_external_data=False).graph
    (lookup,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert next(a.i for a in lookup.attribute if a.name == "bits") == 8 and lookup.input[0].startswith("model.embed")
    bits = Counter(next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits")
    assert bits[8] == blocks["int8"] + 1 and bits[4] == blocks["fitted"]  # + the head


def test_shared_layers_store_each_weight_once(wide_dirs, tmp_path):
    """4 layers in 2 groups with LoRA deltas: every shared projection is one initializer read by
    both layers, each layer's delta two float MatMuls beside it; fp32 decodes as PyTorch does,
    and the int4 file is smaller than the unshared model's."""
    loaded = load_model(wide_dirs("llama"))
    shared, _ = share(load_model(wide_dirs("llama")), ShareConfig(plan=[[0, 1], [2, 3]], lora_rank=4))
    for p in shared.model.parameters():  # deltas that change the outputs, as after a fine-tune
        if p.requires_grad and p.dim() == 2 and p.shape[0] == 4:
            torch.nn.init.normal_(p, std=0.05)
    record = export(shared, ExportConfig(), tmp_path / "fp32")
    proj = record.metrics["projections"]
    assert record.metrics["check"]["generation"]["passed"]
    # 7 projections per layer packed into 4 (qkv, o, gate_up, down): 2 groups x 4 stored, each read twice
    assert proj["weights"] == 2 * 4 + 1 and proj["reads_of_shared_weights"] == 2 * 4
    assert proj["lora_matmuls"] == 4 * (2 + 4 + 2 + 3)  # packed qkv: one A, three Bs; gate_up: one A, two Bs
    params, _ = unique_parameters(shared.model)
    # every unique parameter once, plus the rotary cos/sin tables and a few shape constants
    assert params <= record.params_after <= params + record.metrics["graph"]["rotary_numbers"] + 64
    # int4: the deltas' factors in 8-bit blocks beside the shared 4-bit ones
    small = export(shared, ExportConfig(), tmp_path / "shared4", quantize=method_config("int4", block_size=16))
    assert small.metrics["graph"]["blocks"]["lora_factors"] == 4 * (2 + 4 + 2 + 3)
    graph = onnx.load(str(tmp_path / "shared4" / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "MatMul" for n in graph.node)
    bits = Counter(next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits")
    assert bits == {4: 2 * 4 * 2 + 1, 8: 4 * (2 + 4 + 2 + 3)}  # each stored 4-bit weight read by its 2 layers


def test_shared_int4_file_is_smaller(wide_dirs, tmp_path):
    """Without deltas, 4 layers in 2 groups: the int4 file holds half the blocks' weights."""
    loaded = load_model(wide_dirs("llama"))
    shared, _ = share(load_model(wide_dirs("llama")), ShareConfig(plan=[[0, 1], [2, 3]], lora_rank=0))
    int4 = method_config("int4", block_size=16)
    dense = export(loaded, ExportConfig(), tmp_path / "dense4", quantize=int4)
    small = export(shared, ExportConfig(), tmp_path / "shared4", quantize=int4)
    assert small.metrics["projections"]["block_weights"] == 2 * 4 + 1
    assert small.metrics["file_bytes"] < 0.8 * dense.metrics["file_bytes"]


def test_pruned_and_dropped_models(wide_dirs, tmp_path):
    loaded = load_model(wide_dirs("llama"))
    pruned, _ = prune(loaded, PruneConfig(heads=0.5, ffn=0.25, drop_layers=1, fidelity=False))
    record = export(pruned, ExportConfig(), tmp_path / "g")
    config = json.loads((tmp_path / "g" / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (3, 2, 1)
    assert record.metrics["check"]["generation"]["passed"]
    assert genai_greedy(tmp_path / "g", PROMPT, 16) == torch_greedy(pruned.model, PROMPT, 16)


def test_auto_layout_falls_back_to_optimum_and_says_why(tiny_dirs, tmp_path):
    """The tiny Llama's heads are 8 wide: GroupQueryAttention cannot run them, so ``auto`` writes
    optimum's layout and the record says why; ``--layout genai`` refuses in one line."""
    record = export(load_model(tiny_dirs["llama"]), ExportConfig(generation_check=0), tmp_path / "o")
    assert record.metrics["layout"] == "optimum" and "multiples of 16" in record.metrics["layout_reason"]
    refused = run("export", tiny_dirs["llama"], "--layout", "genai", "-o", tmp_path / "no")
    assert refused.exit_code == 2 and "multiples of 16" in refused.stderr and refused.stderr.count("\n") == 1
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("args, says", [
    (["--quantize", "int8"], "--quantize int8 exports with --layout optimum"),
    (["--quantize", "int4", "--int4-method", "hqq"], "hqq"),
    (["--optimize", "2"], "--optimize runs onnxruntime's optimizer on optimum's graph"),
    (["--task", "text-generation"], "--task text-generation is optimum's layout"),
    (["--quantize", "int4", "--block-size", "24"], "power of two"),
    (["--quantize", "int4", "--block-size", "512"], "MatMulNBits takes 16, 32, 64, 128, 256"),
])
def test_bad_genai_options_fail_in_one_line(wide_dirs, tmp_path, args, says):
    result = run("export", wide_dirs("llama"), "--layout", "genai", *args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and says in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_rotary_table_that_changes_with_length_is_refused(tmp_path):
    """Dynamic NTK scaling recomputes the rotary table past the trained length: no fixed table
    holds it. ``auto`` falls back to optimum's layout; ``--layout genai`` refuses, naming it."""
    folder = save_model("llama", tmp_path / "dyn", hidden_size=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    result = run("export", folder, "--layout", "genai", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "rope_type dynamic" in result.stderr and not (tmp_path / "out").exists()


def test_genai_for_an_encoder_and_over_another_model(tiny_dirs, wide_dirs, tmp_path):
    result = run("export", tiny_dirs["bert"], "--layout", "genai", "-o", tmp_path / "enc")
    assert result.exit_code == 2 and "is an encoder" in result.stderr and not (tmp_path / "enc").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.onnx").write_bytes(b"someone else's model")
    result = run("export", wide_dirs("llama"), "--layout", "genai", "-o", other)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (other / "model.onnx").read_bytes() == b"someone else's model"


def test_int4_grids_keep_the_largest_weights_and_trained_tables():
    """Round-to-nearest blocks on onnxruntime's quantizer's grid: each block's largest magnitude is
    stored exactly, the rest within half a step (a step where the other side reaches past code 7); a head already on the least-error grid
    (a fine-tune trained it there) is stored with its own blocks."""
    from compressor.export.genai import extreme_blocks, head_blocks
    from compressor.grids.rows import quantize_rows

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    b = extreme_blocks(w, 16)
    q = np.stack([b.packed & 15, b.packed >> 4], -1).reshape(8, 4, 16).astype(np.float32)
    rounded = ((q - 8) * b.scales[..., None]).reshape(8, 64)
    peaks = np.abs(w.reshape(8, 4, 16)).argmax(-1)
    np.testing.assert_array_equal(np.take_along_axis(rounded.reshape(8, 4, 16), peaks[..., None], -1),
                                  np.take_along_axis(w.reshape(8, 4, 16), peaks[..., None], -1))
    step = np.abs(b.scales).repeat(16, 1)
    error = np.abs(rounded - w)  # half a step, a whole one where the far side is clipped at code 15
    assert b.zero_points is None and (error <= step + 1e-6).all() and (error <= step / 2 + 1e-6).mean() > 0.95
    trained = quantize_rows(w, 4, 16)
    stored = head_blocks(trained[2], 4, 16)
    np.testing.assert_array_equal(stored.packed, trained[0])
    assert not np.array_equal(head_blocks(w, 4, 16).packed, trained[0])  # an untrained head: the other grid


@pytest.mark.parametrize("family", ["llama", "gemma"])  # Gemma: its (1 + w) norms read off a bf16 probe
def test_a_bf16_model_exports_in_bf16_and_checks_against_pytorch(wide_dirs, tmp_path, family):
    """A bf16 checkpoint is read in bf16 (``--dtype auto``) and its int4 graph written a layer at a
    time from it: the check against the bf16 PyTorch model passes, as close as the float32
    checkpoint's export is to its own."""
    model = transformers.AutoModelForCausalLM.from_pretrained(wide_dirs(family)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    make_tokenizer().save_pretrained(tmp_path / "bf16")
    cosines = {}
    for name, source in (("bf16", tmp_path / "bf16"), ("fp32", wide_dirs(family))):
        res = CliRunner().invoke(cli, ["export", str(source), "--quantize", "int4", "--block-size", "16",
                                       "-o", str(tmp_path / f"out-{name}"), "--json", "-"])
        assert res.exit_code == 0, res.output
        record = json.loads(res.stdout)
        assert record["metrics"]["layout"] == "genai"
        cosines[name] = record["metrics"]["check"]["mean_cosine"]
    assert cosines["bf16"] >= 0.9 and abs(cosines["bf16"] - cosines["fp32"]) < 0.01, cosines


def test_a_model_handed_over_is_let_go_before_the_runtime_loads_the_graph(wide_dirs, tmp_path):
    """``release=True`` (what `run_export` passes for a model it read itself): PyTorch's side of
    the check first, then the weights dropped, then the runtime; the same file and the same check
    as a model the caller keeps, which still computes afterwards."""
    int4 = method_config("int4", block_size=16)
    kept = load_model(wide_dirs("llama"))
    a = export(kept, ExportConfig(), tmp_path / "kept", quantize=int4)
    handed = load_model(wide_dirs("llama"))
    b = export(handed, ExportConfig(), tmp_path / "handed", quantize=int4, release=True)
    assert b.metrics["check"] == a.metrics["check"]
    assert (tmp_path / "kept" / "model.onnx.data").read_bytes() == (tmp_path / "handed" / "model.onnx.data").read_bytes()
    assert all(p.numel() == 0 for p in handed.model.parameters())
    assert all(p.numel() > 0 for p in kept.model.parameters())
    with torch.no_grad():
        assert torch.isfinite(kept.model(torch.tensor([PROMPT])).logits).all()  # the kept model still computes
