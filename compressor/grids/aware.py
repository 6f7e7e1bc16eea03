"""Quantization-aware fine-tuning for int4 exports (``compress finetune --quantize-aware``).

Round-to-nearest int4 after training costs a small decoder much of what distillation bought it
(SmolLM2-135M with 8 of 30 blocks dropped: perplexity 1.32x the original's in fp32, 1.67x as
int4 blocks). Training on the blocks instead lets the other weights make up for each one's
rounding: each step runs forward and backward with every projection's weight rounded to its
int4 blocks, and applies the update to the float weights behind them (the straight-through
estimator, as in BinaryConnect, Courbariaux et al., 2015, and the QAT of LLM-QAT, Liu et al.,
2023). The grid is the export's own (`gptq.block_grid`: blocks of ``block_size`` along the
input dimension, a scale and an integer zero point per block, onnxruntime's MatMulNBits with
zero points), recomputed from the float weights at every step, so the rounding the student
learns is the rounding the export applies.

``--embedding-bits`` does the same for the embedding tables, on the export's symmetric blocks
(`rows.quantize_rows`): on a small encoder the vocabulary matrix is half the file, and its
4-bit blocks cost the demo's MiniLM more of its neighbours than int8 of all its projections.

``--int8-aware`` does it for an int8 export (onnxruntime's dynamic int8, which the demo ships):
each projection's weight rounded to int8 with a scale per output channel, and its input rounded as
``DynamicQuantizeLinear`` rounds it at run time (uint8, one scale and zero point for the whole
tensor, from its own minimum and maximum with 0 kept in range; `fake_uint8`). The activations'
one scale per tensor is most of what int8 costs an encoder's neighbours, and only a student that
saw it while training can make up for it.

The checkpoint holds the rounded weights (an int8 run's projections excepted, which the export's
int8 rounds as training did): the PyTorch model is the int4 model in float32
(``compress evaluate`` measures what the export will compute), and ``compress export --quantize
int4`` finds every projection on its grid (`gptq.on_grid`) and stores those very blocks. The
float weights behind them are kept beside the trainer state, so ``--resume`` continues them.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from .gptq import int4_projections, round_to_nearest
from .gptq import projections as all_projections

#: Where the float weights behind the rounded ones wait for a resume.
LATENT = "quantize_aware.pt"


def int4_weights(model: torch.nn.Module, block_size: int, skip: Iterable[torch.nn.Module] = ()) -> list[torch.nn.Parameter]:
    """The weights an int4 export stores as blocks (`gptq.int4_projections`: every projection at
    least one block wide, a shared group's one weight once) outside ``skip`` (the output head:
    8-bit blocks)."""
    return [modules[0].weight for modules in int4_projections(model, block_size, skip).values()]


def _rounded(weight: torch.Tensor, block_size: int, transposed: bool) -> torch.Tensor:
    if transposed:  # Conv1D: blocks along its first dimension, the input
        return round_to_nearest(weight.T, block_size).T.to(weight.dtype)
    return round_to_nearest(weight, block_size).to(weight.dtype)


def int8_channels(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``weight`` rounded as onnxruntime's per-channel symmetric int8 rounds it: a scale per
    output channel of its largest magnitude over 127, codes in [-127, 127]
    (``transposed``: a Conv1D, whose output channels are its columns)."""
    w = weight.detach().float()
    peak = w.abs().amax(dim=0 if transposed else 1, keepdim=True)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    return (torch.clamp(torch.round(w / scale), -127, 127) * scale).to(weight.dtype)


def fake_uint8(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``DynamicQuantizeLinear`` rounds it (uint8; the scale and zero point of the whole
    tensor from its minimum and maximum, 0 always in range), the gradient passing straight through."""
    low, high = x.detach().amin().clamp(max=0), x.detach().amax().clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scale)
    q = (torch.clamp(torch.round(x.detach() / scale) + zero, 0, 255) - zero) * scale
    return x + (q.to(x.dtype) - x).detach()


def table_weights(model: torch.nn.Module, block_size: int) -> list[torch.nn.Parameter]:
    """The embedding tables an export with ``--embedding-bits`` stores as blocks: every
    ``nn.Embedding`` whose width is whole blocks (a tied output head is the same tensor)."""
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.embedding_dim % block_size == 0 \
                and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found.append(module.weight)
    return found


def round_rows(rows: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """`rows.quantize_rows`' symmetric blocks in torch: each block of ``block_size`` along a
    row on the scale of `rows.scale_fractions` x (its largest magnitude over
    ``2^(bits-1) - 1``) that leaves the least squared error (summed in float64, as there),
    rounded, clipped to the codes; what the export's ``GatherBlockQuantized`` and head
    ``MatMulNBits`` read back. A rounded block's scale is among those tried, so rounding what
    was rounded changes nothing."""
    from .rows import scale_fractions

    half = 2 ** (bits - 1)
    n, k = rows.shape
    blocks = rows.detach().float().reshape(n, k // block_size, block_size)
    peak = blocks.abs().amax(dim=-1)
    base = torch.where(peak > 0, peak / (half - 1), torch.ones_like(peak))
    tiny, top = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
    scales, error = torch.ones_like(base), torch.full(base.shape, torch.inf, dtype=torch.float64)
    for fraction in scale_fractions(bits):
        s = (base * fraction).clamp(tiny, top).half().float()  # as float16 holds them (`rows.half_scales`)
        # in place: this runs on every step of a table-aware fine-tune
        diff = torch.div(blocks, s[..., None]).round_().clamp_(-half, half - 1).mul_(s[..., None]).sub_(blocks)
        e = diff.double().square_().sum(-1)
        better = e < error
        scales, error = torch.where(better, s, scales), torch.where(better, e, error)
    codes = torch.clamp(torch.round(blocks / scales[..., None]), -half, half - 1)
    return (codes * scales[..., None]).reshape(n, k).to(rows.dtype)


class QuantizationAware:
    """The float weights behind a student's rounded ones (int4 blocks, int8 channels, table
    blocks), swapped out while it computes.

    Use `rounded` around each step's forward and backward, `as_stored` around writing a
    checkpoint, `commit` at the end of a run.
    """

    def __init__(self, model: torch.nn.Module, block_size: int, skip: Iterable[torch.nn.Module] = (), *,
                 projections: bool = True, table_bits: int | None = None, int8: bool = False):
        """Args:
            model: The student.
            block_size: Weights per block (the export's ``--block-size``).
            skip: Modules whose projection weights are left alone (the output head).
            projections: Round the projections to int4 blocks (`int4_weights`).
            table_bits: Round the embedding tables to symmetric blocks of these bits (the
                export's ``--embedding-bits``; `table_weights`); ``None``: leave them.
            int8: Instead of int4 blocks, every projection outside ``skip`` in int8 with a scale
                per output channel (`int8_channels`), its input as dynamic int8 (`fake_uint8`)
                while inside `rounded`.
        """
        self.block_size = block_size
        self.table_bits = table_bits
        self.bits = 8 if int8 else 4
        conv = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}
        shared = all_projections(model, skip) if int8 else {}
        self._inputs_of = [m for modules in shared.values() for m in modules]  # the modules whose inputs round
        if int8:
            projected = [modules[0].weight for modules in shared.values()]
        else:
            projected = int4_weights(model, block_size, skip) if projections else []
        tables = [w for w in table_weights(model, block_size) if table_bits is not None
                  and all(w is not p for p in projected)]
        self.projections, self.tables = len(projected), len(tables)
        self.weights = projected + tables
        # an int8 run's checkpoint keeps its projections float: the export's int8 rounds them
        # from the float weights exactly as `int8_channels` did
        self._float_in_checkpoint = [int8] * len(projected) + [False] * len(tables)
        round_weight = int8_channels if int8 else (lambda w, t: _rounded(w, block_size, t))
        self._round = [(lambda w, t=id(w) in conv: round_weight(w, t)) for w in projected] + \
                      [(lambda w: round_rows(w, table_bits, block_size)) for _ in tables]
        self._latent: list[torch.Tensor] | None = None

    @torch.no_grad()
    def round_weights(self, *, stored_only: bool = False) -> None:
        """Put each weight's rounding in its place, keeping the float weight aside
        (``stored_only``: only those the checkpoint holds rounded)."""
        if self._latent is not None:
            return
        latent = [w.detach().clone() for w in self.weights]
        self._latent = latent  # before the first copy: `restore` then undoes a partial rounding
        for w, rounding, keep in zip(self.weights, self._round, self._float_in_checkpoint):
            if not (stored_only and keep):
                w.copy_(rounding(w))

    @torch.no_grad()
    def restore(self) -> None:
        """The float weights back (the gradients computed on the rounded ones stay: the
        straight-through estimator)."""
        if self._latent is None:
            return
        for w, latent in zip(self.weights, self._latent):
            w.copy_(latent)
        self._latent = None

    @contextmanager
    def rounded(self):
        """Compute on the rounded weights inside (and, for int8, on rounded inputs); the float
        weights are back on leaving."""
        hooks = []
        try:
            hooks.extend(m.register_forward_pre_hook(lambda _, args: (fake_uint8(args[0]), *args[1:]))
                         for m in self._inputs_of)
            self.round_weights()
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self.restore()

    @contextmanager
    def as_stored(self):
        """The weights as the checkpoint holds them, inside: rounded, but for an int8 run's
        projections, which stay float."""
        try:
            self.round_weights(stored_only=True)
            yield
        finally:
            self.restore()

    @torch.no_grad()
    def commit(self) -> None:
        """Leave the checkpoint's weights in place for good (the end of a run: the model then is
        the checkpoint it wrote)."""
        self.round_weights(stored_only=True)
        self._latent = None

    def save(self, folder: Path) -> None:
        """Write the float weights (call while they are in place, or rounded: either way the
        float ones are saved)."""
        latent = self._latent if self._latent is not None else [w.detach() for w in self.weights]
        torch.save([t.cpu() for t in latent], Path(folder) / LATENT)

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """Put back the float weights an earlier run saved (a checkpoint holds rounded ones).

        Raises:
            ValueError: the saved weights do not match this model's.
        """
        saved = torch.load(Path(folder) / LATENT, map_location="cpu")
        if len(saved) != len(self.weights) or any(s.shape != w.shape for s, w in zip(saved, self.weights)):
            raise ValueError(f"{Path(folder) / LATENT} holds other weights than this model's")
        for w, s in zip(self.weights, saved):
            w.copy_(s.to(w.device, w.dtype))
