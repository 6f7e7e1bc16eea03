"""Quantization methods as data: one config class per method, one handler each, one registry.

As torchao's ``quantize_(model, Int4WeightOnlyConfig(...))`` dispatches on the config's type,
an export dispatches on its method config: ``export(model, ExportConfig(), out,
quantize=Int4(block_size=16))``. A method is one module (`int8`, `int4`, `fp16`) that defines

* its config, a dataclass subclassing `QuantMethod` (and the option groups it takes:
  `CalibrationText`, `BlockTables`, `Int8Activations`), which checks only its own fields and
  declares in class variables what it supports (`QuantMethod.optimize`, ...);
* its handler, registered with `register_method`: ``handler(model, config, context) ->
  (model, record)``, an in-memory ``onnx.ModelProto`` in and out (`QuantizeContext` carries
  what the handler may need besides the graph);
* optionally a ``calibrate(loaded, model, config)`` run on the PyTorch model before it is
  traced (GPTQ's blocks, the projections int4 keeps in int8); its result is the context's
  ``plan``.

The CLI's ``--quantize`` choices and flags, the recipe schema and the docs are read from the
registry (`method_option_specs`), so a method added elsewhere appears in all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import (OptionSpec, StageConfig, TextFormat, check_block_size, check_choice, check_positive, check_share,
                      choice, flag, option_specs)
from ..errors import ConfigError

#: ``accuracy_level`` of onnxruntime's MatMulNBits: the type the block products are computed in
#: (1 fp32, 2 fp16, 3 bf16, 4 int8: the fastest on CPUs).
ACCURACY_LEVELS = (1, 2, 3, 4)
#: Bits of embedding tables stored as blocks (`grids.rows.TABLE_BITS`).
EMBEDDING_BITS = (8, 4)


@dataclass(kw_only=True)
class QuantMethod(TextFormat, StageConfig):
    """A quantization method's options; subclass it once per method and register a handler.

    Attributes:
        min_cosine: The export fails if its outputs' mean cosine to PyTorch's, per output
            vector, is below this (default: the method's own).
    """

    #: What ``--quantize`` and a recipe call the method.
    name: ClassVar[str] = ""
    #: What it does, in a few words (``--quantize``'s help).
    summary: ClassVar[str] = ""
    #: The default of ``min_cosine``.
    default_min_cosine: ClassVar[float] = 0.9
    #: ``encoder`` / ``decoder`` -> the highest ``--optimize`` level whose fused graph the method
    #: quantizes (an encoder's fused attention holds its projections; a decoder's takes their outputs).
    optimize: ClassVar[dict[str, int]] = {"encoder": 0, "decoder": 0}
    #: Every projection on a weight must come out quantized (the storage check enforces it).
    every_projection: ClassVar[bool] = False
    #: The graph keeps float weights, so an LM head tied to the input embeddings can read a
    #: transpose of the lookup's table (`onnx.tied_head`); quantizers store the pair themselves.
    float_weights: ClassVar[bool] = False

    min_cosine: float | None = None

    def __post_init__(self):
        if self.min_cosine is None:
            self.min_cosine = self.default_min_cosine
        if isinstance(self.min_cosine, bool) or not isinstance(self.min_cosine, (int, float)) \
                or not -1 <= self.min_cosine <= 1:
            raise ConfigError(f"--min-cosine must be in [-1, 1], got {self.min_cosine!r}", option="min_cosine")

    @property
    def mode(self) -> str:
        """The method's name (what ``--quantize`` says)."""
        return self.name

    @property
    def calibrated(self) -> bool:
        """Whether the method runs the PyTorch model on calibration text before the export."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantMethod:
        """The method ``data["mode"]`` names (on the base class; int8 when not given) with the
        other keys as its options; on a method class, that method."""
        data = dict(data)
        mode = data.pop("mode", None if cls.name else "int8")
        if cls.name:
            if mode not in (None, cls.name):
                raise ConfigError(f"{cls.__name__} is --quantize {cls.name}, not {mode}", option="mode")
            return super().from_dict(data)
        if mode in methods():
            # a stage stored before the methods had options of their own carries every method's
            # option, off or at its default: those say nothing and are left out; others are refused
            own = {f.name for f in dataclasses.fields(methods()[mode])}
            flat = {s.name: s.default for s in method_option_specs()}
            data = {k: v for k, v in data.items() if k in own or k not in flat or not (v == flat[k] or v in (None, False))}
        return method_config(mode, **data)

    @classmethod
    def __option_specs__(cls) -> list[OptionSpec]:
        """On the base class: ``mode`` and every registered method's options (`method_option_specs`)."""
        return method_option_specs() if not cls.name else None


@dataclass(kw_only=True)
class CalibrationText:
    """Options of a method that reads calibration text.

    Attributes:
        calibration: Text the method reads (a file or a packaged data set such as
            ``movie-snippets``): the activation ranges of ``int8-static``, the inputs GPTQ fits
            int4 blocks to and ``int8_share`` ranks projections on, the tokens
            ``embedding_hot_share`` counts. Required for int8-static; the packaged calibration
            text by default for the others, which refuse it where nothing reads it.
        calibration_samples: Calibration texts to run.
        max_length: Truncate calibration texts to this many tokens.
    """

    calibration: str | None = None
    calibration_samples: int = 128
    max_length: int = field(default=128, metadata={"flag": "--calibration-max-length"})

    #: What reads the text, for the refusal of text nothing reads.
    calibration_readers: ClassVar[str] = ("int8-static, by int4 with --int4-method gptq or --int8-share, and by "
                                          "--embedding-hot-share")

    def check_calibration(self, reads_it: bool, what: str) -> None:
        for name in ("calibration_samples", "max_length"):
            check_positive(name, getattr(self, name))
        if self.calibration and not reads_it:
            raise ConfigError(f"--calibration is only used by {self.calibration_readers}, not {what}",
                              option="calibration")


@dataclass(kw_only=True)
class BlockTables:
    """Options of a method that can store embedding tables (and output heads) as weight-only blocks.

    Attributes:
        block_size: Weights per scale in weight-only blocks (a power of two, at least 16):
            along each projection's input dimension for int4, along each table's rows for
            ``embedding_bits``.
        embedding_bits: Bits of the embedding tables as weight-only blocks of ``block_size`` with
            one scale each (8 or 4). int4, when not given: 4 for a graph without an output head
            whose tables hold at least a quarter of its weights (an encoder, where the vocabulary
            matrix is most of what int4 leaves of the file), else 8 (4 in the genai layout, as
            onnxruntime-genai's builder stores them), and the output head too, a head tied to
            the input embeddings stored once for both. int8: by default the quantizer's one
            scale per table; 4 halves the tables (the vocabulary matrix is half of a small encoder).
        embedding_hot_share: With ``embedding_bits`` 4: this share of the token table's rows, the
            tokens ``calibration`` text uses most, in 8-bit blocks instead (0: none). A token's
            error costs as often as it is read. Not for a table an output head reads too.
    """

    block_size: int = 32
    embedding_bits: int | None = choice(None, EMBEDDING_BITS)
    embedding_hot_share: float = 0.0

    def check_tables(self) -> None:
        if self.embedding_bits is not None:
            check_choice("embedding_bits", self.embedding_bits, EMBEDDING_BITS)
        check_block_size(self.block_size)
        check_share("embedding_hot_share", self.embedding_hot_share)
        if self.embedding_hot_share and self.embedding_bits != 4:
            raise ConfigError("--embedding-hot-share keeps some rows of a 4-bit table in 8 bits: it needs "
                              "--embedding-bits 4", option="embedding_hot_share")


# ---- the registry ------------------------------------------------------------------------------

#: Handler: ``(model, config, context) -> (model, record)`` (see `QuantizeContext`).
Handler = Callable[..., tuple[Any, dict[str, Any]]]
#: ``--quantize`` name -> config class, in registration order.
METHODS: dict[str, type[QuantMethod]] = {}
_HANDLERS: dict[type[QuantMethod], Handler] = {}
_CALIBRATORS: dict[type[QuantMethod], Callable] = {}


def register_method(config_class: type[QuantMethod], *, calibrate: Callable | None = None) -> Callable[[Handler], Handler]:
    """Register ``config_class`` as the method ``config_class.name`` with the decorated function
    as its handler (and ``calibrate``, run on the PyTorch model before the export)::

        @register_method(Int4, calibrate=int4_plan)
        def quantize_int4(model, config, context): ...
    """
    if not (isinstance(config_class, type) and issubclass(config_class, QuantMethod) and config_class.name):
        raise TypeError(f"{config_class!r}: a quantization method is a QuantMethod subclass with a name")

    def decorate(handler: Handler) -> Handler:
        if config_class.name in METHODS and METHODS[config_class.name] is not config_class:
            raise ValueError(f"quantization method {config_class.name!r} is already registered")
        METHODS[config_class.name] = config_class
        _HANDLERS[config_class] = handler
        if calibrate is not None:
            _CALIBRATORS[config_class] = calibrate
        return handler

    return decorate


def unregister_method(name: str) -> None:
    """Remove a registered method (tests register toy ones)."""
    cls = METHODS.pop(name)
    _HANDLERS.pop(cls, None)
    _CALIBRATORS.pop(cls, None)


def handler_for(config: QuantMethod) -> Handler:
    return _HANDLERS[type(config)]


def calibrator_for(config: QuantMethod) -> Callable | None:
    return _CALIBRATORS.get(type(config))


def methods() -> dict[str, type[QuantMethod]]:
    """The registered methods, in registration order (the package registers the built-in ones
    when it is imported, which importing this module does first)."""
    return METHODS


def method_config(mode: str | None, **options: Any) -> QuantMethod:
    """The method ``mode`` with ``options``.

    Raises:
        ConfigError: an unknown method, an option the method does not take (the message names
            the methods that do), or a bad value.
    """
    known = methods()
    if mode not in known:
        raise ConfigError(f"--quantize must be one of {', '.join(known)}, got {mode!r}", option="mode")
    cls = known[mode]
    own = {f.name for f in dataclasses.fields(cls)}
    for name in options:
        if name not in own:
            takers = [n for n, c in known.items() if name in {f.name for f in dataclasses.fields(c)}]
            where = f"; it is an option of {', '.join(takers)}" if takers else ""
            raise ConfigError(f"{option_flag(name)} is not for {mode}{where}", option=name)
    return cls(**options)


def option_flag(name: str) -> str:
    """A method option as the command spells it (``max_length``: ``--calibration-max-length``)."""
    for cls in methods().values():
        for f in dataclasses.fields(cls):
            if f.name == name and f.metadata.get("flag"):
                return f.metadata["flag"]
    return flag(name)


def method_option_specs() -> list[OptionSpec]:
    """``mode`` and the options of every registered method, each once, in registration order:
    the flat flags of ``compress export`` and a recipe's ``quantize`` stage. An option whose
    default differs between methods has none here (each method applies its own); ``methods``
    says which take it."""
    known = methods()
    specs: dict[str, OptionSpec] = {}
    takers: dict[str, list[str]] = {}
    defaults: dict[str, set] = {}
    for name, cls in known.items():
        for spec in option_specs(cls):
            specs.setdefault(spec.name, spec)
            takers.setdefault(spec.name, []).append(name)
            defaults.setdefault(spec.name, set()).add(repr(spec.default))
    mode = OptionSpec("mode", "str", "int8", "The quantization method (see the methods' own options).", tuple(known))
    out = [mode]
    text = {s.name for s in option_specs(TextFormat)}
    for name, spec in specs.items():
        default = spec.default if len(defaults[name]) == 1 else None
        applies = None if name in text or len(takers[name]) == len(known) else tuple(takers[name])
        out.append(dataclasses.replace(spec, default=default, methods=applies))
    return out


__all__ = ["ACCURACY_LEVELS", "BlockTables", "CalibrationText", "EMBEDDING_BITS", "METHODS",
           "QuantMethod", "calibrator_for", "handler_for", "method_config", "method_option_specs", "methods",
           "register_method", "unregister_method"]
