"""The quantization stage in a recipe: ``quantize: {mode: int8, per_token: all}`` sets how the
``export`` stage right after it quantizes (a quantized graph is an export's, so the stage runs
inside the export; `compress export --quantize ...` takes the same options as flags)."""

from __future__ import annotations

from ..contract import Stage
from .config import QuantMethod

#: Its options are every registered method's (`QuantMethod` lists them: `method_option_specs`);
#: ``mode`` picks the method.
STAGE = Stage("quantize", QuantMethod, None, feeds="export")
