"""The export stage on folders: a model in, an ONNX folder optimum loads out.

`compress export` and a recipe's ``export`` stage both run `run_export`; `quantize_config`
turns the flat options of a command or a recipe into the quantization method's config, the
split read from the configs themselves (`quantization.config.method_option_specs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TextFormat, flag, option_specs
from ..contract import Stage, StageRun
from ..errors import ConfigError
from ..quantization.config import QuantMethod, method_config, method_option_specs, methods
from ..record import StageRecord
from .config import ExportConfig


def quantize_config(mode: str | None, values: dict[str, Any]) -> QuantMethod | None:
    """The quantization of an export from ``mode`` (``None``: fp32) and the options in
    ``values`` (a command's parsed flags: every method's options, each at its flat default when
    not given; other keys are ignored).

    Raises:
        ConfigError: an option given (away from its default) that the method does not take, or
            any without a mode (it would be ignored); or a bad value.
    """
    text = {s.name for s in option_specs(TextFormat)}
    specs = [s for s in method_option_specs() if s.name in values and s.name != "mode"]
    given = [s.name for s in specs if s.name not in text and values[s.name] != s.default]
    if mode is None:
        if given:
            raise ConfigError(f"{', '.join(flag(n) for n in given)} apply to --quantize or --fp16", option=given[0])
        return None
    own = {s.name for s in option_specs(methods()[mode])} if mode in methods() else set()
    # the method's own options as given (or at their flat defaults), the others only where given:
    # then the method refuses them by name
    return method_config(mode, **{s.name: values[s.name] for s in specs if s.name in own or s.name in given})


def run_export(model, config: ExportConfig, output: str | Path, *, quantize: QuantMethod | None = None,
               overwrite: bool = False, trust_remote_code: bool = False) -> StageRecord:
    """Export ``model`` (a `LoadedModel`, folder, hub id or alias) to ``output``, quantized if
    ``quantize`` is given; see `compressor.export.export`."""
    from ..io import check_writable
    from ..models import as_loaded
    from .stage import export

    check_writable(output, overwrite=overwrite, folder=True)
    return export(as_loaded(model, trust_remote_code=trust_remote_code), config, output, quantize=quantize,
                  overwrite=overwrite)


def run(run: StageRun) -> StageRecord:
    """An ONNX folder as ``compress export`` writes it, quantized as a ``quantize`` stage before
    it says."""
    return run_export(run.model, run.config, run.output, quantize=run.fed.get("quantize"), overwrite=run.overwrite,
                      trust_remote_code=run.trust_remote_code)


#: The command is cli/export.py's own: its quantization flags come from the method registry.
STAGE = Stage("export", ExportConfig, run, writes="onnx", own_command=True,
              key_metrics=("metrics.precision", "metrics.file_bytes", "metrics.check.mean_cosine"))
