"""The export stage on folders: a model in, an ONNX folder optimum loads out.

`compress export` and a recipe's ``export`` stage both run `run_export`; `quantize_config`
turns the flat options of a command or a recipe into the quantization method's config, the
split read from the configs themselves (`quantization.config.method_option_specs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TextFormat, option_specs
from ..contract import Stage, StageRun
from ..errors import ConfigError
from ..quantization.config import QuantMethod, method_config, method_option_specs, option_flag
from ..record import StageRecord
from .config import ExportConfig


def quantize_config(mode: str | None, values: dict[str, Any], given: set[str] | None = None) -> QuantMethod | None:
    """The quantization of an export from ``mode`` (``None``: fp32) and the options in
    ``values`` (a command's parsed flags: every method's options; other keys are ignored).

    Args:
        mode: The method's name, or ``None`` for no quantization.
        values: Option values by field name.
        given: The options the user set (a command's flags not left at their defaults); ``None``:
            every key of ``values`` (a recipe's). Only these reach the method, so each method
            applies its own defaults to the rest.

    Raises:
        ConfigError: an option given that the method does not take (the message names the
            methods that do), or any without a mode (it would be ignored); or a bad value.
    """
    text = {s.name for s in option_specs(TextFormat)}
    names = {s.name for s in method_option_specs()} - {"mode"}
    given = set(values) if given is None else set(given)
    asked = [n for n in values if n in names and n in given and n not in text]
    if mode is None:
        if asked:
            raise ConfigError(f"{', '.join(option_flag(n) for n in asked)} apply to --quantize or --fp16",
                              option=asked[0])
        return None
    # the text format (shared with the export's check text) always; the others where given
    return method_config(mode, **{n: values[n] for n in values if n in names and (n in text or n in given)})


def run_export(model, config: ExportConfig, output: str | Path, *, quantize: QuantMethod | None = None,
               overwrite: bool = False, trust_remote_code: bool = False, dtype=None) -> StageRecord:
    """Export ``model`` (a `LoadedModel`, folder, hub id or alias, read in ``dtype``: see
    `compressor.models.load_model`) to ``output``, quantized if ``quantize`` is given; see
    `compressor.export.export`."""
    from ..io import check_writable
    from ..models import LoadedModel, as_loaded
    from .stage import export

    check_writable(output, overwrite=overwrite, folder=True)
    # a model read here is this export's alone: its weights may go before the runtime's check
    return export(as_loaded(model, trust_remote_code=trust_remote_code, dtype=dtype), config, output,
                  quantize=quantize, overwrite=overwrite, release=not isinstance(model, LoadedModel))


def run(run: StageRun) -> StageRecord:
    """An ONNX folder as ``compress export`` writes it, quantized as a ``quantize`` stage before
    it says."""
    return run_export(run.model, run.config, run.output, quantize=run.fed.get("quantize"), overwrite=run.overwrite,
                      trust_remote_code=run.trust_remote_code, dtype=run.dtype)


#: The command is cli/export.py's own: its quantization flags come from the method registry.
STAGE = Stage("export", ExportConfig, run, writes="onnx", own_command=True,
              key_metrics=("metrics.precision", "metrics.file_bytes", "metrics.check.mean_cosine"))
