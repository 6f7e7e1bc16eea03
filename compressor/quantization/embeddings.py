"""Embedding tables (and output heads) as weight-only blocks, for every method that takes
`BlockTables` options: the options applied to the graph pass `compressor.onnx.tables`."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ..data import calibration_texts
from ..errors import ExportError, first_line
from ..onnx.tables import block_quantize_tables
from ..onnx.tables import supported as supported_tables


def quantize_tables(model, config, bits: int, heads: set[str] | None = None, tokenizer=None,
                    accuracy_level: int = 4) -> dict[str, Any]:
    """`onnx.tables.block_quantize_tables` on ``model`` with ``config``'s blocks; ``{}`` where this
    onnxruntime cannot read such tables or none fits, unless ``--embedding-bits`` asked for them.
    With ``--embedding-hot-share``, ``tokenizer`` counts the calibration text's tokens; heads
    compute at ``accuracy_level`` (MatMulNBits').

    Raises:
        ExportError: ``--embedding-bits`` given and no table could take it, or hot rows asked
            for and no table could keep them; or the rewrite failed.
    """
    asked = config.embedding_bits is not None
    if not supported_tables():
        if asked:
            import onnxruntime

            raise ExportError("--embedding-bits needs an onnxruntime whose GatherBlockQuantized reads uint8 blocks "
                              f"with a bits attribute; this one ({onnxruntime.__version__}) does not")
        return {}
    counts = None
    if config.embedding_hot_share:
        if tokenizer is None:
            raise ExportError("--embedding-hot-share needs the model's tokenizer to count the calibration text's tokens")
        counts = token_counts(tokenizer, calibration_texts(config.calibration, text_column=config.text_column,
                                                           encoding=config.encoding), config.max_length)
    try:
        _, done = block_quantize_tables(model, bits=bits, block_size=config.block_size,
                                     accuracy_level=accuracy_level, heads=heads, row_counts=counts,
                                     hot_share=config.embedding_hot_share)
    except Exception as e:  # noqa: BLE001  (whatever the graph holds that the rewrite did not expect)
        raise ExportError(f"storing the embedding tables as {bits}-bit blocks failed: {first_line(e, with_type=True)}") from None
    if asked and not done.get("tables"):
        raise ExportError(f"--embedding-bits {bits}: no embedding table of this graph is a float matrix whose width "
                          f"is whole --block-size {config.block_size} blocks and that only lookups read")
    if config.embedding_hot_share and "hot_rows" not in done:
        if counts is not None and round(config.embedding_hot_share * len(counts)) < 1:
            raise ExportError(f"--embedding-hot-share {config.embedding_hot_share:g} keeps no row of a "
                              f"{len(counts):,}-token table; give a larger share")
        raise ExportError("--embedding-hot-share: no token table here that only lookups of the input ids read "
                          "(a table an output head reads too keeps one precision)")
    if counts is not None:
        done["hot_rows_counted_on"] = config.calibration or "packaged calibration text"
    return done


def token_counts(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """How often ``texts`` use each token id, special tokens included, each text cut to
    ``max_length`` tokens as the model reads it."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for start in range(0, len(texts), 1000):  # a thousand texts a call, not a whole data set's ids at once
        ids = tokenizer(texts[start:start + 1000], truncation=True, max_length=max_length)["input_ids"]
        counts += np.bincount(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64), minlength=len(counts))
    return counts
