"""Options of the quantization stage (applied to the ONNX export)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StageConfig, TextFormat, check_block_size, check_choice, check_positive, check_share, choice
from ..errors import ConfigError

#: ``int8``: dynamic (weights int8, activations quantized on the fly); ``int8-static``:
#: activation ranges calibrated on text; ``fp16``: half-precision weights and compute, for GPUs.
MODES = ("int8", "int8-static", "int4", "fp16")
#: Instruction sets optimum has a quantization preset for; ``auto`` picks this machine's best.
ISAS = ("auto", "avx512_vnni", "avx512", "avx2", "arm64")
#: Default agreement with PyTorch a quantized export must reach: the mean cosine between its
#: outputs and the fp32 PyTorch outputs, per token (plain int8 of the bundled MiniLM reaches about 0.94).
MIN_COSINE = {"int8": 0.90, "int8-static": 0.90, "int4": 0.80, "fp16": 0.999}
#: ``accuracy_level`` of onnxruntime's MatMulNBits: the type the int4 products are computed in
#: (1 fp32, 2 fp16, 3 bf16, 4 int8: the fastest on CPUs).
ACCURACY_LEVELS = (1, 2, 3, 4)
#: How int4 blocks are fitted: ``rtn`` round-to-nearest with a symmetric scale per block;
#: ``rtn-asym`` with a zero point too; ``hqq`` half-quadratic quantization (Badri & Shaji, 2023:
#: scales and zero points optimized against the weights' own error, no data; its zero points are
#: floats, which onnxruntime 1.32's CPU MatMulNBits runs off its int8 fast path, about 5x slower,
#: so they are carried as a block-sum offset beside symmetric blocks instead: `zero_points.py`); ``gptq`` (Frantar et al., 2022: each projection's blocks fitted
#: to its inputs on calibration text, with integer zero points: the fast kernel; `gptq.py`).
#: (onnxruntime's k-quant prints to stdout and fails on the exported graphs in 1.32.)
INT4_METHODS = ("rtn", "rtn-asym", "hqq", "gptq")
#: Which int8 projection inputs ``per_token`` rounds with a range per token: every one that can
#: take it, or only the FFN down-projections' (the GELU / SwiGLU outputs, whose outlier tokens
#: cost int8 the most; a third of the extra time).
PER_TOKEN = ("all", "ffn-down")
#: Bits of embedding tables stored as blocks (int4's default 8; `tables.TABLE_BITS`).
EMBEDDING_BITS = (8, 4)


@dataclass
class QuantizeConfig(TextFormat, StageConfig):
    """How to quantize an ONNX export.

    Attributes:
        mode: ``int8``, ``int8-static``, ``int4`` (weight-only: the projections in blocks of
            ``block_size`` 4-bit numbers with one scale each, onnxruntime's MatMulNBits; the
            embeddings and the output head in ``embedding_bits`` blocks) or ``fp16``.
        calibration: Text whose activation ranges ``int8-static`` uses, whose inputs
            ``int4 --int4-method gptq`` fits its blocks to, or whose tokens
            ``embedding_hot_share`` counts (a file or a packaged data set such as
            ``movie-snippets``); required for int8-static, the packaged calibration text by
            default for GPTQ, ``int8_share`` and ``embedding_hot_share``, refused otherwise.
        calibration_samples: Calibration texts to run.
        max_length: Truncate calibration texts to this many tokens.
        per_channel: One scale per output channel of a weight instead of one per tensor.
            Default: per tensor for ``int8`` (optimum's preset), per channel for ``int8-static``
            (its static ranges leave no room for a coarse weight scale as well).
        isa: The optimum preset (``AutoQuantizationConfig.<isa>``) whose settings to use;
            ``auto`` picks avx512_vnni, avx512, avx2 or arm64 from this CPU.
        block_size: ``int4``: weights per scale, along each projection's input dimension (a
            power of two, at least 16); with ``embedding_bits``, along each table's rows too.
        accuracy_level: ``int4``: the type MatMulNBits computes in (4: int8, fastest on CPUs;
            1: fp32).
        int4_method: ``int4``: how the blocks are fitted (`INT4_METHODS`): ``rtn``, ``rtn-asym``,
            ``hqq`` or ``gptq``.
        int8_share: ``int4``: keep this share of the projections' parameters in int8: those whose
            int4 loses most of their output on the calibration text (0: none).
        embedding_bits: Bits of the embedding tables as weight-only blocks of ``block_size``
            with one scale each (8 or 4). ``int4``: 8 when not given, and the output head too, a
            head tied to the input embeddings stored once for both. ``int8``: by default the
            quantizer's one scale per table; 4 halves the tables (the vocabulary matrix is
            half of a small encoder).
        embedding_hot_share: With ``embedding_bits`` 4: this share of the token table's rows,
            the tokens ``calibration`` text uses most (counted over all its texts; the packaged
            calibration text by default), in 8-bit blocks instead (0: none). A token's error
            costs as often as it is read: on the demo's cut MiniLM the most used 10% of rows are
            80% of the text read. Not for a table an output head reads too.
        per_token: ``int8`` (and ``int8-static``'s dynamic FFN down-projections): round the
            inputs of ``all`` projections, or of the ``ffn-down`` projections only, with a range
            per token (row) instead of one for the whole tensor (`per_token.py`): a few outlier
            tokens no longer set every token's step. ``QAttention``'s input and the products of
            two activations keep their one range. Unset: one range per tensor.
        min_cosine: The export fails if its outputs' mean cosine to PyTorch's is below this
            (default per mode: `MIN_COSINE`).
    """

    mode: str = choice("int8", MODES)
    calibration: str | None = None
    calibration_samples: int = 128
    max_length: int = 128
    per_channel: bool | None = None
    isa: str = choice("auto", ISAS)
    block_size: int = 32
    accuracy_level: int = choice(4, ACCURACY_LEVELS)
    int4_method: str = choice("rtn", INT4_METHODS)
    int8_share: float = 0.0
    embedding_bits: int | None = choice(None, EMBEDDING_BITS)
    embedding_hot_share: float = 0.0
    per_token: str | None = choice(None, PER_TOKEN)
    min_cosine: float | None = None

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_choice("isa", self.isa, ISAS)
        check_choice("accuracy_level", self.accuracy_level, ACCURACY_LEVELS)
        check_choice("int4_method", self.int4_method, INT4_METHODS)
        if self.embedding_bits is not None:
            check_choice("embedding_bits", self.embedding_bits, EMBEDDING_BITS)
            if self.mode == "fp16":
                raise ConfigError("--embedding-bits is for int8 and int4 exports' tables, not fp16", option="embedding_bits")
        check_block_size(self.block_size)
        check_share("embedding_hot_share", self.embedding_hot_share)
        share = self.embedding_hot_share
        if share and self.embedding_bits != 4:
            raise ConfigError("--embedding-hot-share keeps some rows of a 4-bit table in 8 bits: it needs "
                              "--embedding-bits 4", option="embedding_hot_share")
        for name in ("calibration_samples", "max_length"):
            check_positive(name, getattr(self, name))
        if self.mode == "int8-static" and not self.calibration:
            raise ConfigError("--quantize int8-static needs --calibration DATA (text to measure activation ranges on)",
                              option="calibration")
        check_share("int8_share", self.int8_share)
        if self.int8_share and self.mode != "int4":
            raise ConfigError(f"--int8-share keeps some of an int4 export's projections in int8; not for {self.mode}",
                              option="int8_share")
        if self.calibration and not (self.mode == "int8-static" or self.calibrated or share):
            raise ConfigError(f"--calibration is only used by int8-static, by int4 with --int4-method gptq or "
                              f"--int8-share, and by --embedding-hot-share, not "
                              f"{self.mode}{' ' + self.int4_method if self.mode == 'int4' else ''}",
                              option="calibration")
        if self.per_channel is None:
            self.per_channel = self.mode == "int8-static"
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"per_channel must be true or false, got {self.per_channel!r}", option="per_channel")
        if self.mode == "fp16" and self.per_channel:
            raise ConfigError("--per-channel is for int8 scales, not fp16", option="per_channel")
        if self.per_token is not None:
            check_choice("per_token", self.per_token, PER_TOKEN)
        if self.per_token and self.mode not in ("int8", "int8-static"):
            raise ConfigError(f"--per-token rounds int8's dynamic activations per token; not for {self.mode}",
                              option="per_token")
        if self.min_cosine is None:
            self.min_cosine = MIN_COSINE[self.mode]
        if isinstance(self.min_cosine, bool) or not isinstance(self.min_cosine, (int, float)) or not -1 <= self.min_cosine <= 1:
            raise ConfigError(f"--min-cosine must be in [-1, 1], got {self.min_cosine!r}", option="min_cosine")

    @property
    def calibrated(self) -> bool:
        """Whether int4 runs the PyTorch model on calibration text first: GPTQ fits its blocks to
        it, ``int8_share`` ranks the projections on it."""
        return self.mode == "int4" and (self.int4_method == "gptq" or bool(self.int8_share))
