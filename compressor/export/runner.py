"""The export stage on folders: a model in, an ONNX folder optimum loads out.

`compress export` and a recipe's ``export`` stage both run `run_export`; `quantize_config`
turns the command's quantization flags into the options of the export's quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import flag, option_specs
from ..errors import ConfigError
from ..quantization.config import QuantizeConfig
from ..record import StageRecord
from .config import ExportConfig

#: QuantizeConfig fields that are not quantization options of their own (the mode picks one;
#: the text format is the export's too).
_NOT_QUANTIZATION = ("mode", "text_column", "encoding")


def quantize_config(mode: str | None, values: dict[str, Any]) -> QuantizeConfig | None:
    """The quantization of an export from ``mode`` (``None``: fp32) and the other
    `QuantizeConfig` values in ``values``.

    Raises:
        ConfigError: a quantization option set away from its default without a mode (it would
            be ignored), or a bad value.
    """
    specs = [s for s in option_specs(QuantizeConfig) if s.name in values]
    if mode is None:
        given = [s.name for s in specs if s.name not in _NOT_QUANTIZATION and values[s.name] != s.default]
        if given:
            raise ConfigError(f"{', '.join(flag(n) for n in given)} apply to --quantize or --fp16", option=given[0])
        return None
    return QuantizeConfig.from_dict({**{s.name: values[s.name] for s in specs}, "mode": mode})


def run_export(model, config: ExportConfig, output: str | Path, *, quantize: QuantizeConfig | None = None,
               overwrite: bool = False, trust_remote_code: bool = False) -> StageRecord:
    """Export ``model`` (a `LoadedModel`, folder, hub id or alias) to ``output``, quantized if
    ``quantize`` is given; see `compressor.export.export`."""
    from ..io import check_writable
    from ..models import as_loaded
    from .stage import export

    check_writable(output, overwrite=overwrite, folder=True)
    return export(as_loaded(model, trust_remote_code=trust_remote_code), config, output, quantize=quantize,
                  overwrite=overwrite)
