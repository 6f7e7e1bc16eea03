"""Base class for stage configs: plain dataclasses that check themselves and round-trip JSON."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from collections.abc import Iterator
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound="StageConfig")


@dataclasses.dataclass
class StageConfig:
    """A stage's options. Subclasses validate in ``__post_init__`` and raise `ConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

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

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{cls.__name__}: not valid JSON: {e}") from None
        return cls.from_dict(data)


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
