"""Symmetric weight blocks along the rows of a matrix, in numpy: how an embedding table or an
output head is stored as blocks (`compressor.onnx.tables` writes them into a graph;
`compressor.grids.aware.round_rows` trains on the same rounding in PyTorch).

Each block of ``block_size`` numbers along a row has one scale, searched among a few fractions
of round-to-nearest's (`quantize_rows`), rounded to float16 as a lookup-only table stores it
(`half_scales`); codes are offset by 2^(bits-1), the zero point that ``MatMulNBits`` and
``GatherBlockQuantized`` assume when none is given.
"""

from __future__ import annotations

import numpy as np

#: Bits a table or head may be stored in: what both MatMulNBits and GatherBlockQuantized read.
TABLE_BITS = (4, 8)


#: The block scales `quantize_rows` tries, as fractions of the round-to-nearest one (largest
#: magnitude over 2^(bits-1) - 1): clipping a block's few largest values buys a finer step for
#: the rest (`scale_fractions` adds the one that maps a negative peak onto the code -2^(bits-1)).
SCALE_FRACTIONS = tuple(1 - i / 40 for i in range(13))  # 1.0, 0.975, ..., 0.7


def scale_fractions(bits: int) -> tuple[float, ...]:
    """`SCALE_FRACTIONS` and (2^(bits-1) - 1) / 2^(bits-1): 7/8 at 4 bits, 127/128 at 8, the
    scale of a block whose peak was rounded onto the lowest code, so that rounding a rounded
    block again finds its own scale."""
    half = 2 ** (bits - 1)
    return tuple(dict.fromkeys(SCALE_FRACTIONS + ((half - 1) / half,)))  # 7/8 is one of them already


def quantize_rows(rows: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric blocks of ``rows`` (N x K, K a multiple of ``block_size``) along K: ``(packed
    blocks (N, K / block_size, block_size * bits / 8) uint8, scales (N, K / block_size) float32,
    the dequantized rows)``. Codes are offset by 2^(bits-1), the zero point both operators assume
    when none is given. Each block's scale is the one of `scale_fractions` x (its largest
    magnitude over 2^(bits-1) - 1) whose rounding leaves the least squared error (summed in
    float64, the first on a tie; `aware.round_rows` chooses alike): never more error than
    round-to-nearest over the peak, about a fifth less at 4 bits on normally distributed rows,
    for the same bytes. A rounded block's largest magnitude is a code of its scale (7 or -8 at 4
    bits), whose fraction is among those tried, so rounding what was rounded changes nothing."""
    n, k = rows.shape
    half = 2 ** (bits - 1)
    blocks = rows.astype(np.float32).reshape(n, k // block_size, block_size)
    peak = np.abs(blocks).max(axis=-1)
    base = np.where(peak > 0, peak / (half - 1), 1.0)
    scales, error = np.ones_like(base), np.full(base.shape, np.inf)
    for fraction in scale_fractions(bits):
        s = half_scales(base * fraction)
        diff = blocks - np.clip(np.rint(blocks / s[..., None]), -half, half - 1) * s[..., None]
        e = np.square(diff.astype(np.float64)).sum(-1)  # float64: the same choice as torch's on near-ties
        better = e < error
        scales, error = np.where(better, s, scales), np.where(better, e, error)
    codes = (np.clip(np.rint(blocks / scales[..., None]), -half, half - 1) + half).astype(np.uint8)
    dequantized = ((codes.astype(np.float32) - half) * scales[..., None]).reshape(n, k)
    if bits == 4:  # two codes a byte, the first in the low half
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scales, dequantized


def half_scales(scales: np.ndarray) -> np.ndarray:
    """``scales`` (float32) rounded to the nearest float16, which is how a lookup-only table stores
    them. One below float16's smallest normal number, 6.1e-5 (a block whose values are all under
    4e-4 at 4 bits, 7.8e-3 at 8), is lifted to it: that block's codes are never clipped, and its
    values under 3e-5 round to 0."""
    tiny, top = np.finfo(np.float16).tiny, np.finfo(np.float16).max
    return np.clip(scales, tiny, top).astype(np.float16).astype(np.float32)


def hot_row_order(counts: np.ndarray, share: float) -> np.ndarray:
    """The rows ``hot_rows`` keeps in 8 bits: the ``share`` of all rows whose ``counts`` are
    highest (ties to the lower id), none of them unused (count 0), and never all of them (the
    4-bit table keeps at least one row for the lookups of the others to read)."""
    wanted = min(int(round(share * len(counts))), int(np.count_nonzero(counts)), len(counts) - 1)
    return np.argsort(-np.asarray(counts), kind="stable")[:wanted]


def dequantized_table(rows: np.ndarray, bits: int, block_size: int, hot_rows: np.ndarray | None = None) -> np.ndarray:
    """What a lookup of the blocks `block_quantize_tables` stores for ``rows`` gives back: ``hot_rows``
    at 8 bits, the rest at ``bits``."""
    out = quantize_rows(rows, bits, block_size)[2]
    if hot_rows is not None and len(hot_rows):
        out[hot_rows] = quantize_rows(rows[hot_rows], 8, block_size)[2]
    return out
