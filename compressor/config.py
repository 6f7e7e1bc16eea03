"""Base class for stage configs: plain dataclasses that check themselves.

A config's fields are its options everywhere: `option_specs` reads each field's name, type,
default, choices (``field(metadata={"choices": ...})``) and help (the ``Attributes:`` entry of
the class docstring), and the CLI's flags, the recipe schema and the docs are all made from
that, so a new field needs no second declaration.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound="StageConfig")


@dataclasses.dataclass
class StageConfig:
    """A stage's options. Subclasses validate in ``__post_init__`` and raise `ConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build a config from a dict, rejecting keys the config does not have."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            stage = cls.__name__.removesuffix("Config").lower()  # ShareConfig -> the share stage
            raise ConfigError(f"unknown option(s) for {stage}: {', '.join(unknown)}; known: {', '.join(sorted(names))}",
                              option=unknown[0])
        return cls(**data)


@dataclass(kw_only=True)  # keyword-only: a config's own fields keep their positions
class TextFormat:
    """How a text file is read (shared by every config that reads one).

    Attributes:
        text_column: Column (csv/tsv) or key (jsonl) holding the text; guessed if not given.
        encoding: Text encoding of the file.
    """

    text_column: str | None = None
    encoding: str = "utf-8"


@dataclass(kw_only=True)
class TextOptions(TextFormat):
    """Text a stage reads, and how.

    Attributes:
        data: Calibration text: a file (.txt, .csv, .tsv, .jsonl), a packaged data set
            (movie-snippets) or a Hugging Face dataset id; default: built-in English sentences.
    """

    data: str | None = None


def choice(default: Any, choices: tuple, **kwargs) -> Any:
    """A field whose value is one of ``choices`` (the CLI offers exactly these)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)}, **kwargs)


@dataclass(frozen=True)
class OptionSpec:
    """One config field as an option: what the CLI, the recipe schema and the docs show.

    Attributes:
        name: The field name (a recipe's key; the CLI flag is `flag(name)`).
        kind: ``bool``, ``int``, ``float``, ``str``, ``list[int]``, ``list[float]`` or ``list[str]``.
        default: The default value (``None``: not set).
        help: The field's entry in its class docstring, on one line.
        choices: The allowed values, where the field is a `choice`.
        flag: The CLI flag where it is not `flag(name)` (``field(metadata={"flag": ...})``).
        methods: Where a config class stands for several (quantization methods): the ones that
            take the option, ``None`` for all.
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple | None = None
    flag: str | None = None
    methods: tuple | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("flag", "methods"):  # said only where they say something
            if data[key] is None:
                del data[key]
        return data


def option_specs(cls: type) -> list[OptionSpec]:
    """The options of a config class, one per field: the class's own first, then those it
    inherits (the text options), each class's in declaration order. A class that stands for
    several (the quantization methods' base) lists its options itself (``__option_specs__``)."""
    custom = getattr(cls, "__option_specs__", None)
    if custom is not None and (found := custom()) is not None:
        return found
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # a field's home is the most basic class declaring it (FinetuneConfig's own default for
    # ``data`` keeps it among the text options)
    home = {n: klass for klass in cls.__mro__ for n in vars(klass).get("__annotations__", {}) if n in fields}
    order = [n for klass in cls.__mro__ for n in vars(klass).get("__annotations__", {}) if home.get(n) is klass]
    specs = []
    for f in (fields[n] for n in order):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        specs.append(OptionSpec(f.name, _kind(hints[f.name]), default, helps.get(f.name, ""),
                                f.metadata.get("choices"), f.metadata.get("flag")))
    return specs


def _kind(hint) -> str:
    """The option kind of a field's type: ``int | None`` is ``int``, ``list[list[int]] | str`` is
    ``str`` (such a field is given on the command line as text the config parses)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if str in args:
            return "str"
        hint = args[0] if len(args) == 1 else str
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"list[{item.__name__}]" if item in (int, str, float) else "str"
    if hint in (bool, int, float, str):
        return hint.__name__
    return "str"


def plain_help(text: str, fields=frozenset(), spell=lambda name: name) -> str:
    """Docstring markup as plain text: ````x```` -> ``x``, and a field it names spelled by
    ``spell`` (the CLI spells ``max_steps`` as ``--max-steps``)."""
    return re.sub(r"``([^`]*)``", lambda m: spell(m.group(1)) if m.group(1) in fields else m.group(1), text)


_ATTRIBUTE = re.compile(r"^(\w+):\s*(.*)$")


def field_help(cls: type) -> dict[str, str]:
    """Each field's ``Attributes:`` entry from the docstrings of ``cls`` and its bases (the
    class's own entry wins), joined onto one line."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) if klass.__doc__ else None
        if not doc or "Attributes:" not in doc:
            continue
        name, lines = None, []
        for line in doc.split("Attributes:", 1)[1].splitlines():
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            match = _ATTRIBUTE.match(line.strip())
            if match and indent <= 4:
                if name:
                    found[name] = " ".join(lines)
                name, lines = match.group(1), [match.group(2)]
            elif name and indent > 4:
                lines.append(line.strip())
            else:
                break
        if name:
            found[name] = " ".join(lines)
    return found


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}", option=name)


def flag(name: str) -> str:
    """A config field as the CLI spells it: ``max_samples`` -> ``--max-samples``."""
    return "--" + name.replace("_", "-")


def check_positive(name: str, value: int | float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{flag(name)} must be a positive number, got {value!r}", option=name)


def check_share(name: str, value) -> None:
    """A share of something to keep or move: a number (not a bool) in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{flag(name)} must be in [0, 1), got {value!r}", option=name)


def check_block_size(value, name: str = "block_size") -> None:
    """Weights per quantization block: a power of two, at least 16 (what MatMulNBits takes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ConfigError(f"{flag(name)} must be a power of two, at least 16, got {value!r}", option=name)


def check_int(name: str, value, minimum: int, *, allow_none: bool = False) -> None:
    """An integer (not a bool) of at least ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag(name)} must be at least {minimum}, got {value!r}", option=name)


#: False while configs are checked for another machine (see `devices_elsewhere`).
_DEVICES_HERE = contextvars.ContextVar("compress_devices_here", default=True)


@contextlib.contextmanager
def devices_elsewhere() -> Iterator[None]:
    """Check device names, not whether this machine has them: for configs that run elsewhere.

    A batch sent to a Ray cluster is validated on a driver that may have no GPU; each job checks
    its devices again where it runs.
    """
    token = _DEVICES_HERE.set(False)
    try:
        yield
    finally:
        _DEVICES_HERE.reset(token)


def check_device(device: str) -> str:
    """Fail early on a device torch does not know or this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N", option="device") from None
    if not _DEVICES_HERE.get():
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"--device {device}: use cpu, cuda or cuda:N", option="device")
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu", option="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                              option="device")
    elif dev.type != "cpu" and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {device} is not available here; use cpu or cuda", option="device")
    return device
