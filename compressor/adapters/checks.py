"""Self-checks: prove an adapter's mapping on the loaded model before any stage relies on it.

An adapter, declared or inferred, is a claim about a model: these rows of that module are the
queries of head 3, these columns of that one are FFN neuron 17. Each check turns a claim into a
number that could come out wrong:

* ``mapping``: every role's module is a linear of the shape the geometry says, is called in a
  real forward pass of every block, and its weight and bias as the adapter reads them (the
  role's rows of a fused module) reproduce those rows of its output (to 1e-5, relative, in
  fp32); writing the weights back through the adapter leaves every parameter as it was. This
  proves shapes, orientation (GPT-2's ``Conv1D``) and that the rows are read and written
  consistently; it cannot tell which rows are the queries. A failure refuses the model.
* ``value rows``: zeroing the rows the adapter calls one key/value head's values computes what
  zeroing its query heads' output columns computes: the one role distinction (a value read as
  a key, as CodeGen's q/v/k order would be) that permutations cannot see. A failure refuses
  the model.
* ``permute neurons`` / ``permute heads``: a random permutation (never the identity) of the FFN
  neurons (of the heads: key/value groups and the query heads inside them), applied through
  the adapter to three blocks, leaves those blocks' outputs unchanged. This is what proves the
  row maps mean what they say: a wrong head layout, a per-head parameter outside the block or
  a bias recomputed from the head order moves the output. A failure marks that unit as not
  permutable: alignment leaves it in place and it is not pruned.
* ``prune heads`` / ``prune ffn`` (`compressor.pruning.checks`, run where pruning needs them):
  in a two-layer copy, removing one head (one FFN neuron) of every layer through the adapter
  computes what the unpruned copy computes with that unit's output columns zeroed, and the
  config rebuilds the new shapes, loads the weights and runs. A failure refuses that pruning.

Any exception inside a check is that check failing. Tolerances widen with the precision of
the model's weights (fp16 and bf16 round far above 1e-5). A NaN never passes. The model is
changed in place only by the permutation check, and put back exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError, first_line
from ..progress import Progress
from .base import ArchitectureAdapter, Geometry, head_rows, is_linear, module_shape

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Relative tolerance of the mapping check (fp32), as the issue asks.
MAPPING_RTOL = 1e-5
#: Tolerance of the permutation check, relative to what the permuted block adds to its input
#: (the residual branch): a permutation only reorders sums, while a wrong row map or a head read
#: from outside the block changes the branch itself.
PERMUTATION_RTOL = 1e-3


@dataclass
class Check:
    """One self-check: its name, whether it passed, and what it found."""

    name: str
    passed: bool | None  # None: not run (and why is in ``detail``)
    detail: str = ""
    sublayer: str | None = None

    @property
    def status(self) -> str:
        return "passed" if self.passed else "not run" if self.passed is None else "FAILED"


@dataclass
class AdapterChecks:
    """The checks run on one model, and what they rule out."""

    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        """Record ``check`` (replacing an earlier result of the same name); returns it."""
        self.checks = [c for c in self.checks if c.name != check.name] + [check]
        return check

    def get(self, name: str) -> Check | None:
        """The result of the check called ``name``, or ``None`` if it has not run."""
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> list[dict]:
        """The checks as JSON-ready dicts, each with its ``status``."""
        return [{**asdict(c), "status": c.status} for c in self.checks]


def probe_inputs(model: nn.Module, *, batch: int = 2, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (seeded) the model can embed, with a full attention mask."""
    import torch

    vocab = int(getattr(model.config, "vocab_size", 0) or 100)
    generator = torch.Generator().manual_seed(seed)
    # keep clear of the low ids, where padding and special tokens live
    low = min(10, vocab - 1)
    ids = torch.randint(low, vocab, (batch, length), generator=generator)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def final_hidden(adapter: ArchitectureAdapter, model: nn.Module, inputs) -> torch.Tensor:
    import torch

    with torch.no_grad():
        out = adapter.base(model)(**inputs)
    hidden = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None)
    return (hidden if hidden is not None else out[0]).float()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def tolerance(base: float, dtype) -> float:
    """``base`` for fp32 weights; for half precision, what its rounding allows (20 ulps)."""
    import torch

    return base if dtype in (torch.float32, torch.float64) else max(base, 20 * torch.finfo(dtype).eps)


def within(err: float, tol: float) -> bool:
    return err <= tol  # False for NaN: a check never passes on NaN


def weights_dtype(model):
    return next(model.parameters()).dtype


# --- mapping ---------------------------------------------------------------------------------
def check_mapping(model: nn.Module, adapter: ArchitectureAdapter, geometry: Geometry, inputs=None) -> Check:
    """Every role's weights reproduce its sublayer's output in a real forward pass."""
    import torch
    import torch.nn.functional as F

    blocks = adapter.blocks(model)
    if len(blocks) != geometry.num_layers:
        return Check("mapping", False, f"{adapter.blocks_path} holds {len(blocks)} blocks, the config says "
                                      f"{geometry.num_layers}", adapter.blocks_path)
    for i, block in enumerate(blocks):
        for path, roles in adapter.module_roles().items():
            module = block.get_submodule(path)
            if not is_linear(module):
                return Check("mapping", False, f"{path} is a {type(module).__name__}, not a linear layer", f"{i}.{path}")
            out_f, in_f = module_shape(module)
            expected_in = geometry.intermediate_size if "ffn_out" in roles else (
                geometry.num_heads * geometry.head_dim if "attn_out" in roles else geometry.hidden_size)
            expected_out = adapter.fused[path].total(geometry) if path in adapter.fused else geometry.width(roles[0])
            if (out_f, in_f) != (expected_out, expected_in):
                return Check("mapping", False, f"{path} ({'/'.join(roles)}) is {out_f} x {in_f}, the geometry says "
                                              f"{expected_out} x {expected_in}", f"{i}.{path}")
    seen: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(key):
        def record(module, args, output):
            # copies: a family may add into the output in place afterwards (Falcon's parallel MLP)
            seen[key] = (args[0].detach().clone(), output.detach().clone())

        return record

    handles = [blocks[i].get_submodule(path).register_forward_hook(hook((i, path)))
               for i in range(len(blocks)) for path in adapter.module_roles()]
    try:
        final_hidden(adapter, model, inputs or probe_inputs(model))
    finally:
        for h in handles:
            h.remove()
    tol = tolerance(MAPPING_RTOL, weights_dtype(model))
    for i, block in enumerate(blocks):
        for path, roles in adapter.module_roles().items():
            if (i, path) not in seen:
                return Check("mapping", False, f"{path} ({'/'.join(roles)}) is not called in a forward pass", f"{i}.{path}")
            x, y = seen[(i, path)]
            for role in roles:
                w = adapter.applied_weight(block, role, geometry)
                b = adapter.bias(block, role, geometry)
                rows = adapter.role_rows(role, geometry)
                ref = y if rows is None else y.index_select(-1, rows.to(y.device))
                got = F.linear(x.float(), w.float(), None if b is None else b.float())
                err = relative_error(got, ref.float())
                if not within(err, tol):
                    return Check("mapping", False, f"{role} taken from {path} does not reproduce the sublayer's output "
                                                  f"(relative error {err:.1e})", f"{i}.{path}")
    # writing the weights back through the adapter leaves every parameter as it was
    block = blocks[0]
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    adapter.load_block_weights(block, *adapter.block_weights(block, geometry), geometry)
    changed = [n for n, p in block.named_parameters() if not torch.equal(p, before[n])]
    if changed:
        return Check("mapping", False, f"writing the weights back through the adapter changed {changed[0]}", f"0.{changed[0]}")
    return Check("mapping", True, f"{len(adapter.roles)} roles in {len(blocks)} blocks reproduce their sublayers' "
                                 f"outputs (relative error <= {tol:g})")


# --- permutations ----------------------------------------------------------------------------
def check_permutation(model: nn.Module, adapter: ArchitectureAdapter, geometry: Geometry, unit: str, inputs=None) -> Check:
    """A random permutation of ``unit`` (``neurons`` or ``heads``) in a few blocks leaves the output unchanged."""
    import torch

    from .alignment import permute_weights, random_permutation, restrict

    name = f"permute {unit}"
    blocks = adapter.blocks(model)
    dense = _dense_blocks(blocks)
    if not dense:
        return Check(name, None, "every block is shared (checked when the model was dense)")
    units = geometry.intermediate_size if unit == "neurons" else geometry.num_heads
    if units < 2:
        return Check(name, None, f"only one {'neuron' if unit == 'neurons' else 'head'}")
    inputs = inputs or probe_inputs(model)
    generator = torch.Generator().manual_seed(1)
    chosen = sorted({dense[0], dense[len(dense) // 2], dense[-1]})
    # One forward pass before and one with all chosen blocks permuted: a block that preserves
    # its function hands the next one the same input, so the first block whose output moves is
    # the one at fault.
    ref = _blocks_io(adapter, model, [blocks[i] for i in chosen], inputs)
    saved = {i: adapter.block_weights(blocks[i], geometry) for i in chosen}
    try:
        for i in chosen:
            perm = _moving(restrict(random_permutation(geometry, generator), geometry, heads=unit == "heads",
                                    neurons=unit == "neurons"), geometry, unit)
            adapter.load_block_weights(blocks[i], *permute_weights(*saved[i], perm, geometry), geometry)
        got = _blocks_io(adapter, model, [blocks[i] for i in chosen], inputs)
    finally:
        for i in chosen:
            adapter.load_block_weights(blocks[i], *saved[i], geometry)
    for k, i in enumerate(chosen):
        (ref_in, ref_out), (_, out) = ref[k], got[k]
        err = _branch_error(out, ref_out, ref_in, ref_out)
        if not within(err, tolerance(PERMUTATION_RTOL, weights_dtype(model))):
            where = "attention" if unit == "heads" else "FFN"
            return Check(name, False, f"permuting block {i}'s {unit} through the adapter changes its output "
                                      f"(relative error {err:.1e}): the {where} is not permutable", f"{i}.{where}")
    what = "FFN neurons" if unit == "neurons" else "attention heads"
    return Check(name, True, f"a random permutation of the {what} of blocks {', '.join(map(str, chosen))} leaves "
                             "their outputs unchanged")


def check_value_rows(model: nn.Module, adapter: ArchitectureAdapter, geometry: Geometry, inputs=None) -> Check:
    """The rows the adapter calls the values of a key/value head are what that head's query heads
    write through the output projection: zeroing them computes what zeroing those heads' output
    columns computes. (Keys and queries only shape the attention pattern; a value read as a key
    would move the output differently.) The one role distinction permutations cannot see."""
    name = "value rows"
    blocks = adapter.blocks(model)
    dense = _dense_blocks(blocks)
    if not dense:
        return Check(name, None, "every block is shared (checked when the model was dense)")
    i, d = dense[0], geometry.head_dim
    block = blocks[i]
    inputs = inputs or probe_inputs(model)
    ((ref_in, ref_out),) = _blocks_io(adapter, model, [block], inputs)
    saved = adapter.block_weights(block, geometry)
    outs = []
    try:
        for zero in ("value", "attn_out"):
            w = {r: t.clone() for r, t in saved[0].items()}
            b = {r: (None if t is None else t.clone()) for r, t in saved[1].items()}
            if zero == "value":
                w["value"][:d] = 0
                if b["value"] is not None:
                    b["value"][:d] = 0
            else:
                w["attn_out"][:, head_rows([0], geometry.heads_per_kv, d)] = 0
            adapter.load_block_weights(block, w, b, geometry)
            outs.append(_blocks_io(adapter, model, [block], inputs)[0][1])
    finally:
        adapter.load_block_weights(block, *saved, geometry)
    tol = tolerance(PERMUTATION_RTOL, weights_dtype(model))
    if not _branch_error(outs[1], ref_out, ref_in, ref_out) > tol:
        return Check(name, None, f"head 0 of block {i} writes (almost) nothing; nothing to compare")
    err = _branch_error(outs[0], outs[1], ref_in, ref_out)
    if not within(err, tol):
        return Check(name, False, f"zeroing what the adapter calls key/value head 0's values in block {i} does not "
                                  f"silence that head (relative error {err:.1e}): those rows are not the values",
                     f"{i}.{adapter.linears['value']}")
    return Check(name, True, f"zeroing key/value head 0's value rows in block {i} silences exactly its query heads")


def _branch_error(a: torch.Tensor, b: torch.Tensor, block_in: torch.Tensor, block_out: torch.Tensor) -> float:
    """``max |a - b|`` relative to what the block adds to its input (its residual branch), so
    that a branch small beside the residual stream still counts in full."""
    return float((a - b).abs().max()) / max(float((block_out - block_in).abs().max()), 1e-12)


def _dense_blocks(blocks) -> list[int]:
    """Indices of the blocks no weight of which is shared: those a check may change and restore."""
    return [i for i, b in enumerate(blocks) if not any(type(m).__name__ == "SharedLinear" for m in b.modules())]


def _moving(perm, geometry: Geometry, unit: str):
    """``perm`` made to move something: a check that permutes nothing proves nothing."""
    import torch

    if unit == "neurons":
        if torch.equal(perm.neurons, torch.arange(geometry.intermediate_size)):
            perm.neurons = perm.neurons.roll(1)
    elif geometry.num_kv_heads > 1:
        if torch.equal(perm.kv_groups, torch.arange(geometry.num_kv_heads)):
            perm.kv_groups = perm.kv_groups.roll(1)
    elif perm.query_within is not None:  # multi-query attention: the heads move inside the one group
        if torch.equal(perm.query_within[0], torch.arange(geometry.heads_per_kv)):
            perm.query_within = perm.query_within.roll(1, dims=1)
    return perm


def _blocks_io(adapter, model, blocks, inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The hidden states going into and coming out of each of ``blocks`` in one forward pass."""
    seen: dict[int, dict] = {i: {} for i in range(len(blocks))}

    def before(i):
        def hook(module, args, kwargs):
            first = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            seen[i]["in"] = first.detach().float().clone()

        return hook

    def after(i):
        def hook(module, args, output):
            seen[i]["out"] = (output[0] if isinstance(output, (tuple, list)) else output).detach().float().clone()

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(before(i), with_kwargs=True), block.register_forward_hook(after(i))]
    try:
        final_hidden(adapter, model, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(blocks)) if "out" not in seen[i]]
    if missing:
        raise RuntimeError(f"block {missing[0]} is not called in a forward pass")
    return [(seen[i]["in"], seen[i]["out"]) for i in range(len(blocks))]


# --- all together ------------------------------------------------------------------------------
def prove(model: nn.Module, adapter: ArchitectureAdapter, *,
          checks: AdapterChecks | None = None) -> tuple[ArchitectureAdapter, AdapterChecks]:
    """Run the self-checks every load runs (mapping, value rows, permutations); return the
    adapter with what they rule out refused, and the checks. The pruning checks are
    `compressor.pruning.checks.prove_pruning`.

    Args:
        model: The loaded model (changed only transiently, by the permutation check).
        adapter: Its adapter, declared or inferred.
        checks: Results of an earlier call to extend.

    Raises:
        UnsupportedModelError: the mapping check failed (one line naming the sublayer).
    """
    checks = checks or AdapterChecks()
    geometry = adapter.geometry(model.config)
    if checks.get("mapping") is None:
        # seconds on a 1 B model, said as they end; a minute a check at 8 B, said while it runs
        with Progress("self-checks", 4, "checks") as progress, progress.heartbeat_on(adapter.blocks(model)):
            adapter = _prove(model, adapter, geometry, checks, progress)
    return adapter, checks


def _prove(model, adapter: ArchitectureAdapter, geometry, checks: AdapterChecks, progress) -> ArchitectureAdapter:
    """`prove`'s checks, each counted on ``progress`` as it ends."""
    inputs = probe_inputs(model)
    mapping = checks.add(guarded("mapping", check_mapping, model, adapter, geometry, inputs))
    progress.update()
    if mapping.passed:
        mapping = checks.add(guarded("value rows", check_value_rows, model, adapter, geometry, inputs))
        progress.update()
    if mapping.passed is False:
        where = f" at {mapping.sublayer}" if mapping.sublayer else ""
        raise UnsupportedModelError(f"{adapter.family} adapter refused: self-check '{mapping.name}' failed{where}: "
                                    f"{mapping.detail}")
    for unit in ("neurons", "heads"):
        capability = f"permute_{unit}"
        if adapter.refusal(capability):
            checks.add(Check(f"permute {unit}", None, f"declared: {adapter.refusal(capability)}"))
            progress.update()
            continue
        result = checks.add(guarded(f"permute {unit}", check_permutation, model, adapter, geometry, unit, inputs))
        progress.update()
        if result.passed is False:
            adapter = adapter.with_refusals({capability: f"self-check 'permute {unit}' failed: {result.detail}"})
    return adapter


def guarded(name: str, check, *args) -> Check:
    """Run a check; an exception inside it is the check failing, said in one line."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001  (whatever the model raises is the finding)
        return Check(name, False, f"the check could not run the model through the adapter: {type(e).__name__}: "
                                  f"{first_line(e)}")
