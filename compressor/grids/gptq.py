"""GPTQ (Frantar et al., 2022) for ``--quantize int4 --int4-method gptq``: each projection's
int4 blocks fitted to what its inputs are on real text, not to the weights alone.

Round-to-nearest picks each weight's nearest grid point independently. GPTQ quantizes a weight
matrix one input column at a time and moves the columns not yet quantized to cancel the error the
ones before made on the layer's *outputs*, using ``H = X^T X`` of the layer's inputs on
calibration text (the second-order model of the output error). The grid is MatMulNBits' own:
blocks of ``block_size`` along the input dimension, a float scale and a 4-bit zero point per block
(``w = scale * (q - zero_point)``), so onnxruntime's fast kernel runs the result as it runs RTN.

The Hessians come from the PyTorch model the export traced (one forward pass over the
calibration texts, padding left out), one per weight (`plan_int4`, which also picks the
projections to keep in int8 from the same pass): the members of a shared group add to one
``H``, as their one stored weight serves them all. The fitted blocks then replace the blocks
onnxruntime's quantizer wrote for the same weight (found by content), so everything else about
the int4 graph (which nodes, accuracy level, the int8 head and tables) is as for RTN.

Left out: act-order (onnxruntime's MatMulNBits takes blocks in input order only) and fitting
layer by layer on the quantized model's own activations (the inputs here are the original
model's: one forward pass, a few seconds on a 135 M model).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..progress import track

#: Hessian dampening, as a share of its mean diagonal (the reference implementation's 0.01).
DAMP = 0.01
#: Columns updated together (the reference's lazy batch).
LAZY_COLUMNS = 128


def weight_key(matrix: np.ndarray) -> str:
    """The key by which an ONNX MatMul weight (input dim x output dim) finds its projection."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return f"{matrix.shape}:{hashlib.sha1(matrix.tobytes()).hexdigest()}"


def projections(model: torch.nn.Module, skip: Iterable[torch.nn.Module] = ()) -> dict[int, list[torch.nn.Module]]:
    """``id(weight) -> modules`` of every linear projection (``nn.Linear``; GPT-2's ``Conv1D``;
    a layer of a shared group, whose ``base_layer`` is the group's one ``nn.Linear``) outside
    ``skip``; several modules where layers share one weight.

    A shared group's layers are hooked, not their base layer: a layer applies the shared weight
    itself (with its own LoRA delta), so the base layer's own forward never runs."""
    skipped = {id(m) for m in skip}
    modules = list(model.modules())
    skipped |= {id(m.base_layer) for m in modules if isinstance(getattr(m, "base_layer", None), torch.nn.Linear)}
    found: dict[int, list[torch.nn.Module]] = {}
    for module in modules:
        if id(module) in skipped or not _is_projection(module):
            continue
        found.setdefault(id(module.weight), []).append(module)
    return found


def _is_projection(module: torch.nn.Module) -> bool:
    return (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
            or isinstance(getattr(module, "base_layer", None), torch.nn.Linear))


def _in_out(module: torch.nn.Module) -> torch.Tensor:
    """The weight as (output dim, input dim)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


@torch.no_grad()
def hessians(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
             weights: dict[int, list[torch.nn.Module]]) -> tuple[dict[int, torch.Tensor], int]:
    """``id(weight) -> X^T X`` over the real (unpadded) tokens of ``batches``, and the tokens seen."""
    sums: dict[int, torch.Tensor] = {}
    keep: list[torch.Tensor] = []  # the current batch's real-token mask, flattened

    def hook(key: int):
        def add(module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1])
            if keep and keep[0].numel() == x.shape[0]:
                x = x[keep[0]]
            x = x.float()
            if key not in sums:
                sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            sums[key].addmm_(x.T, x)
        return add

    handles = [m.register_forward_hook(hook(key)) for key, modules in weights.items() for m in modules]
    tokens = 0
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            mask = batch.get("attention_mask")
            keep[:] = [mask.reshape(-1).bool()] if mask is not None else []
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            model(**batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sums, tokens


def block_grid(block: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-row scale and integer zero point for ``block`` (rows x columns), the range
    widened to hold 0 (as the reference does, so the zero point is on the grid)."""
    return _grid(block.min(dim=1).values, block.max(dim=1).values, levels)


def _grid(smallest: torch.Tensor, largest: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_grid`'s scale and zero point from each block's smallest and largest number."""
    low, high = smallest.clamp(max=0), largest.clamp(min=0)
    flat = high == low
    low, high = torch.where(flat, -torch.ones_like(low), low), torch.where(flat, torch.ones_like(high), high)
    scale = (high - low) / levels
    return scale, torch.round(-low / scale).clamp(0, levels)


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, block_size: int, bits: int = 4
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``weight`` (output dim x input dim) with ``hessian`` (input x input).

    Returns:
        ``(q, scales, zero_points)``: ``q`` uint8 (output dim x input dim) in ``[0, 2^bits)``,
        ``scales`` float32 and ``zero_points`` uint8 (output dim x blocks); the weight is
        ``scales * (q - zero_points)`` block by block along the input dimension.
    """
    levels = 2**bits - 1
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    blocks = -(-cols // block_size)
    q = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, blocks)
    zeros = torch.zeros(rows, blocks)
    lazy = max(LAZY_COLUMNS, block_size)  # block_size is a power of two: blocks never straddle
    for start in range(0, cols, lazy):
        end = min(start + lazy, cols)
        w1, h1 = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(w1)
        for i in range(end - start):
            col = start + i
            if col % block_size == 0:  # this block's grid, from its columns as GPTQ has moved them
                scale, zero = block_grid(w1[:, i:i + block_size], levels)
                scales[:, col // block_size], zeros[:, col // block_size] = scale, zero
            column = w1[:, i]
            qi = torch.clamp(torch.round(column / scale) + zero, 0, levels)
            q[:, col] = qi.to(torch.uint8)
            error = (column - scale * (qi - zero)) / h1[i, i]
            w1[:, i:] -= error.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return q.numpy(), scales.numpy().astype(np.float32), zeros.numpy().astype(np.uint8)


def dequantize(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """The weight (output dim x input dim) that ``gptq``'s blocks stand for."""
    cols = q.shape[1]
    expand = np.repeat(np.arange(scales.shape[1]), block_size)[:cols]
    return scales[:, expand] * (q.astype(np.float32) - zero_points[:, expand].astype(np.float32))


def pack_matmul_nbits(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``gptq``'s blocks in MatMulNBits' 4-bit layout: ``B`` (N x blocks x block_size/2, two
    values a byte, the first in the low nibble), scales (N x blocks), zero points (N x
    ceil(blocks/2), packed the same way). The input dimension is padded to whole blocks with
    each block's zero point (a padded weight of 0)."""
    rows, cols = q.shape
    blocks = scales.shape[1]
    padded = np.repeat(zero_points, block_size, axis=1).astype(np.uint8)
    padded[:, :cols] = q
    pairs = padded.reshape(rows, blocks, block_size // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    zp = np.full((rows, 2 * (-(-blocks // 2))), 0, np.uint8)
    zp[:, :blocks] = zero_points
    zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    return b, scales.astype(np.float32), zp


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """How much of a projection's output ``approx`` loses on the calibration inputs:
    ``tr(E H E^T) / tr(W H W^T)`` with ``E = W - approx``."""
    w, e, h = weight.double(), (weight - approx).double(), hessian.double()
    return float(torch.einsum("ij,jk,ik->", e, h, e) / torch.einsum("ij,jk,ik->", w, h, w).clamp(min=1e-30))


def round_to_nearest(weight: torch.Tensor, block_size: int, bits: int = 4) -> torch.Tensor:
    """``weight`` (output dim x input dim) rounded to the nearest point of its blocks' grids
    (`block_grid`: a scale and an integer zero point per block, as MatMulNBits with zero points)."""
    return _dequantized(*rtn_blocks(weight, block_size, bits), block_size)


def _dequantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, block_size: int) -> torch.Tensor:
    """The weight `rtn_blocks`' blocks stand for (`dequantize`, in torch)."""
    return _columns(scales, q.shape[1], block_size) * (q - _columns(zeros, q.shape[1], block_size))


def _columns(per_block: torch.Tensor, cols: int, block_size: int) -> torch.Tensor:
    """A number per row and block spread over the block's columns."""
    return per_block[:, torch.arange(cols, device=per_block.device) // block_size]


def rtn_blocks(weight: torch.Tensor, block_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on `block_grid`'s grids, all blocks at once: ``(q, scales, zero points)``
    as `gptq` returns them (``q`` float here, in ``[0, 2^bits)``; scales and zero points one per
    row and block). A last, partial block takes its grid from its own columns, as onnxruntime's
    quantizer does (its padding repeats a real column, which moves no minimum or maximum)."""
    levels = 2**bits - 1
    rows, cols = weight.shape
    blocks = -(-cols // block_size)
    w = weight.detach().float()
    if blocks * block_size != cols:
        w = torch.cat([w, w[:, -1:].expand(rows, blocks * block_size - cols)], dim=1)
    w = w.reshape(rows, blocks, block_size)
    smallest, largest = w.amin(dim=2), w.amax(dim=2)
    scales, zeros = _grid(smallest, largest, levels)
    q = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, levels)
    # a block's extremes on the grid's ends: rounding each half-way case down (a tie, as on a
    # model dequantized from 4 bits) could leave a 14-step block, which a second rounding would
    # stretch to 15 steps; this way rounding what was rounded changes nothing (`on_grid`)
    q = torch.where((w == smallest[..., None]) & (smallest < 0)[..., None], torch.zeros_like(q), q)
    q = torch.where((w == largest[..., None]) & (largest > 0)[..., None], torch.full_like(q, levels), q)
    return q.reshape(rows, blocks * block_size)[:, :cols], scales, zeros


def on_grid(weight: torch.Tensor, block_size: int, bits: int = 4, tolerance: float = 1e-3) -> bool:
    """Whether every number of ``weight`` lies on its block's `block_grid` point, within
    ``tolerance`` of a grid step: the weights a quantization-aware fine-tune left
    (`aware.QuantizationAware`), whose round-to-nearest changes nothing."""
    return _blocks_on_grid(weight, block_size, bits, tolerance) is not None


def _blocks_on_grid(weight: torch.Tensor, block_size: int, bits: int = 4, tolerance: float = 1e-3):
    """`rtn_blocks` of ``weight`` where it is `on_grid`, else ``None``."""
    q, scales, zeros = rtn_blocks(weight, block_size, bits)
    error = (weight.detach().float() - _dequantized(q, scales, zeros, block_size)).abs()
    return (q, scales, zeros) if bool((error <= tolerance * _columns(scales, q.shape[1], block_size)).all()) else None


#: Share of an int4 export's weights that must lie on their grids for `trained_blocks` to read the
#: model as trained on them (one all-zero matrix of an ordinary model is on its grid too).
TRAINED_SHARE = 0.9


def int4_projections(model: torch.nn.Module, block_size: int, skip: Iterable[torch.nn.Module] = ()
                     ) -> dict[int, list[torch.nn.Module]]:
    """`projections` an int4 export stores as blocks: those at least one block wide (a narrower
    one, a LoRA factor's rank side, would be mostly padding: int8)."""
    return {k: v for k, v in projections(model, skip).items() if _in_out(v[0]).shape[1] >= block_size}


def trained_blocks(model: torch.nn.Module, block_size: int, skip: Iterable[torch.nn.Module] = ()
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], int] | None:
    """The int4 blocks ``model``'s projections at least a block wide already are, by
    `weight_key`, as `gptq` returns them, and how many projections are not; ``None`` unless at
    least `TRAINED_SHARE` of them lie on their grids (`on_grid`): a checkpoint a
    quantization-aware fine-tune wrote (`aware`), whose blocks an export stores as they are
    instead of rounding them again."""
    # one weight in float32 at a time (a whole model's would double a large model's memory), and
    # no further once too many are off their grids to make the share
    modules = list(int4_projections(model, block_size, skip).values())
    if not modules:
        return None
    allowed_off = len(modules) - TRAINED_SHARE * len(modules)
    blocks, off = {}, 0
    for group in modules:
        w = _in_out(group[0]).detach().float().cpu()
        found = _blocks_on_grid(w, block_size)  # one rounding a weight, for the test and the blocks
        if found is None:
            off += 1
            if off > allowed_off:
                return None
            continue
        q, scales, zeros = found
        blocks[weight_key(w.T.numpy())] = (q.to(torch.uint8).numpy(), scales.numpy().astype(np.float32),
                                           zeros.to(torch.uint8).numpy())
    return blocks, off


def trained_block_size(model: torch.nn.Module, skip: Iterable[torch.nn.Module] = (),
                       sizes: Iterable[int] = (16, 32, 64, 128, 256), sample: int = 3) -> int | None:
    """The block size whose grid ``model``'s first ``sample`` projections lie on (a
    quantization-aware fine-tune's, `aware`), or ``None``: what an export at another block size
    tells its user instead of rounding the trained blocks away."""
    weights = [_in_out(modules[0]) for modules in projections(model, skip).values()]  # views, no copies
    for size in sizes:
        chosen = [w for w in weights if w.shape[1] >= size][:sample]
        if chosen and all(on_grid(w.detach().float().cpu(), size) for w in chosen):
            return size
    return None


@dataclass
class Int4Plan:
    """What calibration decided for an int4 export: GPTQ's blocks by `weight_key` (empty unless
    asked), the weights kept in int8 (`weight_key`s), and what was done."""

    fitted: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    int8: set[str] = field(default_factory=set)
    info: dict = field(default_factory=dict)


def plan_int4(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], block_size: int, *,
              gptq_blocks: bool, int8_share: float, skip: Iterable[torch.nn.Module] = (),
              trained: Iterable[str] = ()) -> Int4Plan:
    """Calibrate ``model``'s projections wider than one block on ``batches`` (one forward pass) and
    plan their int4: GPTQ's blocks if ``gptq_blocks``; with ``int8_share`` > 0, the projections
    whose int4 loses most of their output on this text (`relative_error` of round-to-nearest),
    taken in that order while they fit in ``int8_share`` of the int4 parameters, kept in int8 instead (the
    mixed precision llama.cpp's ``_M`` formats use: a few sensitive matrices at more bits).

    Keys are `weight_key` of each projection's ONNX MatMul weight (the transpose of a ``Linear``'s);
    ``trained`` ones (blocks a quantization-aware fine-tune trained, `trained_blocks`) lose nothing
    in int4 and are never taken into int8.
    """
    trained = set(trained)
    weights = int4_projections(model, block_size, skip)
    sums, tokens = hessians(model, batches, weights)
    plan = Int4Plan(info={"calibration_tokens": tokens})
    sizes, errors, keys = {}, {}, {}
    for key, modules in track(weights.items(), "int4 calibration" if not gptq_blocks else "GPTQ", len(weights),
                              "projections"):
        if key not in sums:  # a projection the calibration text never reached
            continue
        w = _in_out(modules[0]).detach().float().cpu()
        keys[key] = weight_key(w.T.numpy())
        sizes[key] = w.numel()
        if gptq_blocks:
            plan.fitted[keys[key]] = gptq(w, sums[key].cpu(), block_size)
        if int8_share > 0 and keys[key] not in trained:
            errors[key] = relative_error(w, round_to_nearest(w, block_size), sums[key].cpu())
    if gptq_blocks:
        plan.info["gptq_projections"] = len(plan.fitted)
    if int8_share > 0:
        budget, kept = int8_share * sum(sizes.values()), 0
        chosen = []
        for key in sorted(errors, key=errors.get, reverse=True):  # the worst first, while they fit
            if kept + sizes[key] > budget:
                break
            chosen.append(key)
            kept += sizes[key]
        plan.int8 = {keys[k] for k in chosen}
        names: dict[int, str] = {}
        for name, module in model.named_modules():  # a shared group's weight: its first layer's name
            if id(getattr(module, "weight", None)) in weights:
                names.setdefault(id(module.weight), name.removesuffix(".base_layer"))
        plan.info["int8_projections"] = {
            "share_asked": int8_share, "share_kept": round(kept / max(sum(sizes.values()), 1), 4),
            "count": len(chosen), "of": len(errors),
            "lowest_error_kept": round(min((errors[k] for k in chosen), default=0.0), 5),
            "highest_error_int4": round(max((errors[k] for k in errors if k not in chosen), default=0.0), 5),
            "kinds": dict(sorted(Counter(names.get(k, "?").rsplit(".", 1)[-1] for k in chosen).items())),
        }
    return plan
