"""Benchmark: where dynamic int8 costs an encoder its neighbours, and which activation ranges win
it back, simulated in PyTorch on the rounding onnxruntime applies.

onnxruntime's dynamic int8 (what ``compress export --quantize int8`` and optimum's int8 make)
rounds each projection's weight to int8 with a scale per output channel and its input to uint8
with one scale and zero point for the whole input tensor, from that tensor's minimum and maximum
(``DynamicQuantizeLinear``). One range per tensor means one range for every token of every text in
the batch: a few outlier tokens set the step for all the others, and a text's embedding depends on
the texts it was batched with. This benchmark rounds a model's projections in PyTorch exactly as
that export does (`compressor.grids.aware`: `int8_channels`, `fake_uint8`), one kind of
projection at a time and with other activation ranges, and scores each variant with the quality
suite as ``compress report --suite`` does (texts in batches of 64, 64 tokens at most, in the
suite's order), against the original in float:

- float; int8 weights only; int8 weights and per-tensor activations everywhere (the export);
- the same with one group's inputs left in float (which costs what: Q/K/V, attention output,
  FFN in, FFN out);
- per-token activation ranges (a minimum and maximum per row; or symmetric, a largest magnitude
  per row) for one group or for all;
- SmoothQuant's per-channel migration of the input's range into the weights (factors from the
  built-in calibration sentences), for one group or for all;
- the embedding table as the export's 4-bit blocks, with and without the rest.

Run:  python benchmarks/bench_int8_activations.py STUDENT --threads 2
      (STUDENT: a compressed checkpoint of the bundled MiniLM, such as the demo's OUT/03-finetune)
Writes reports/bench_int8_activations.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_token_uint8(x):
    """``x`` rounded to uint8 with each row's (last dimension's) own minimum and maximum, 0 kept
    in range: the range one token's activations need, not the batch's."""
    import torch

    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def per_token_int8(x):
    """``x`` rounded symmetrically with each row's own largest magnitude over 127 (zero point
    128 in uint8, one for the whole tensor: what ``MatMulInteger``'s scalar zero point allows)."""
    import torch

    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


#: The export's projections by what their input is: Q, K and V read one input (one ``QAttention``
#: in the O2-fused int8 graph), the others one each.
GROUPS = {"qkv": ("query", "key", "value"), "attn_out": ("attn_out",), "ffn_in": ("ffn_gate", "ffn_in"),
          "ffn_out": ("ffn_out",)}


def role_modules(loaded) -> dict[str, list]:
    """Input group (`GROUPS`) -> the modules of every block that read it."""
    adapter = loaded.adapter
    out: dict[str, list] = {}
    for block in adapter.blocks(loaded.model):
        for group, roles in GROUPS.items():
            for role in roles:
                if role not in adapter.linears:
                    continue
                module = adapter.linear(block, role)
                if all(module is not m for m in out.setdefault(group, [])):
                    out[group].append(module)
    return {g: m for g, m in out.items() if m}


def input_peaks(loaded, texts: list[str]) -> dict:
    """Group -> the largest magnitude of each input channel over ``texts`` (float model)."""
    import torch

    peaks, hooks = {}, []
    for group, modules in role_modules(loaded).items():
        def record(mod, args, group=group):
            x = args[0].detach().abs().flatten(0, -2).amax(0)
            peaks[group] = torch.maximum(peaks[group], x) if group in peaks else x
        hooks += [m.register_forward_pre_hook(record) for m in modules]
    try:
        report_embedder(loaded)(texts)
    finally:
        for h in hooks:
            h.remove()
    return peaks


def smoothing(loaded, peaks: dict, alpha: float = 0.5) -> dict:
    """SmoothQuant's per-channel factors (Xiao et al., 2023): ``s_c = max|x_c|^alpha /
    max|W_c|^(1 - alpha)`` over the group's weights, so that ``x / s`` and ``W diag(s)`` share the
    range of channel c between them."""
    import torch

    out = {}
    for group, modules in role_modules(loaded).items():
        w = torch.cat([m.weight.detach() for m in modules], 0).abs().amax(0)  # per input channel
        s = peaks[group].clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)
        out[group] = s.clamp(min=1e-5)
    return out


@contextmanager
def rounded(loaded, inputs: dict[str, str], weights: bool, table_bits: int | None, block_size: int = 32,
            smooth: dict | None = None):
    """Within: the projections' weights as int8 channels (``weights``), each role's inputs rounded
    as ``inputs`` says (``"tensor"``: `fake_uint8`, ``"token"``: `per_token_uint8`, absent: float),
    the embedding tables as ``table_bits`` blocks."""
    import torch

    from compressor.grids.aware import fake_uint8, int8_channels, round_rows, table_weights

    saved, hooks = [], []
    roles = role_modules(loaded)
    smooth = smooth or {}
    with torch.no_grad():
        if weights:
            for group, modules in roles.items():
                s = smooth.get(group)
                for m in modules:
                    saved.append((m.weight, m.weight.detach().clone()))
                    if s is None:
                        m.weight.copy_(int8_channels(m.weight, type(m).__name__ == "Conv1D"))
                    else:  # Q(W diag(s)) diag(1/s): the hook below multiplies the rounded x / s back by s
                        m.weight.copy_(int8_channels(m.weight * s) / s)
        if table_bits is not None:
            for w in table_weights(loaded.model, block_size):
                saved.append((w, w.detach().clone()))
                w.copy_(round_rows(w, table_bits, block_size))
    for role, how in inputs.items():
        fn = {"tensor": fake_uint8, "token": per_token_uint8, "token-sym": per_token_int8}[how]
        s = smooth.get(role)
        if s is not None:
            fn = (lambda x, fn=fn, s=s: fn(x / s) * s)
        for m in roles.get(role, []):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, fn=fn: (fn(args[0]),) + tuple(args[1:])))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for w, value in saved:
                w.copy_(value)


def report_embedder(loaded):
    """Sentence embeddings exactly as `compress report` computes them (`report.stage.sentence_embeddings`
    on a `TorchBackend`: batches of 64 in the given order, 64 tokens at most)."""
    from compressor.report.config import ReportConfig
    from compressor.report.stage import sentence_embeddings
    from compressor.report.backends import TorchBackend

    runner, config = TorchBackend(loaded, loaded.name), ReportConfig()
    return lambda texts: sentence_embeddings(runner, texts, config)


def variants(roles: tuple[str, ...]) -> list[tuple[str, dict, bool, int | None, tuple[str, ...]]]:
    """``(label, inputs, int8 weights, table bits, smoothed groups)`` of every variant measured."""
    tensor = {r: "tensor" for r in roles}
    rows = [("float", {}, False, None, ()),
            ("int8 weights, float activations", {}, True, None, ()),
            ("int8, per-tensor activations (the export's projections)", tensor, True, None, ()),
            ("4-bit table only", {}, False, 4, ()),
            ("int8 per-tensor + 4-bit table (the export)", tensor, True, 4, ())]
    for role in roles:
        rows.append((f"the export, {role} inputs in float", {r: h for r, h in tensor.items() if r != role}, True, 4, ()))
    for role in roles:
        rows.append((f"the export, {role} inputs per token", {**tensor, role: "token"}, True, 4, ()))
    rows.append(("the export, every input per token", {r: "token" for r in roles}, True, 4, ()))
    for role in roles:
        rows.append((f"the export, {role} inputs per token, symmetric", {**tensor, role: "token-sym"}, True, 4, ()))
    rows.append(("the export, every input per token, symmetric", {r: "token-sym" for r in roles}, True, 4, ()))
    shipped = {**tensor, **{r: "token-sym" for r in roles if r != "qkv"}}  # QAttention keeps its range
    rows.append(("the export with --per-token (every input but Q/K/V's per token, symmetric)", shipped, True, 4, ()))
    for role in roles:
        rows.append((f"the export, {role} smoothed (SmoothQuant, alpha 0.5)", tensor, True, 4, (role,)))
    rows.append(("the export, every group smoothed", tensor, True, 4, roles))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", help="a compressed checkpoint of the bundled MiniLM")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suite-train-size", type=int, default=1000)
    parser.add_argument("--suite-test-size", type=int, default=500)
    parser.add_argument("--pool-size", type=int, default=500)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import torch

    from compressor.evaluation.suite import SuiteConfig, load_suite, suite_scores
    from compressor.models import load_model

    torch.set_num_threads(args.threads)
    config = SuiteConfig(suite_train_size=args.suite_train_size, suite_test_size=args.suite_test_size,
                         pool_size=args.pool_size)
    data = load_suite(config)
    original = load_model(None)
    reference = suite_scores(report_embedder(original), data, config)
    student = load_model(args.student)
    roles = tuple(role_modules(student))
    from compressor.data import calibration_texts

    factors = smoothing(student, input_peaks(student, calibration_texts(None)))
    rows = []
    for label, inputs, weights, table_bits, smoothed in variants(roles):
        start = time.perf_counter()
        with rounded(student, inputs, weights, table_bits, smooth={g: factors[g] for g in smoothed}):
            s = suite_scores(report_embedder(student), data, config, reference=reference)
        rows.append({"variant": label, "inputs": inputs, "smoothed": list(smoothed), "int8_weights": weights, "table_bits": table_bits,
                     "neighbour_agreement": s.neighbour_agreement, "stderr": s.neighbour_stderr,
                     "retained": s.retained, "seconds": round(time.perf_counter() - start, 1)})
        print(f"{label:70s} {s.neighbour_agreement:.3f} +- {s.neighbour_stderr:.3f}  retained {s.retained:.1%}",
              flush=True)
    command = "python benchmarks/bench_int8_activations.py " + " ".join(sys.argv[1:])
    result = {"command": command, "student": args.student, "threads": args.threads,
              "suite": {"train": args.suite_train_size, "test": args.suite_test_size, "pool": args.pool_size},
              "rows": rows}
    out = Path(args.out)
    (out / "bench_int8_activations.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Where dynamic int8 costs neighbour agreement (PyTorch simulation of onnxruntime's rounding)", "",
             f"`{command}`; student `{args.student}`; suite {args.suite_train_size} train / "
             f"{args.suite_test_size} test per task, pool {args.pool_size}, 10 neighbours, against the original in float.",
             "", "| variant | neighbour agreement @10 | suite retained |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['neighbour_agreement']:.3f} +- {r['stderr']:.3f} | {r['retained']:.1%} |" for r in rows]
    (out / "bench_int8_activations.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
