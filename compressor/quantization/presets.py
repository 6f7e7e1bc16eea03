"""optimum's int8 presets: the settings an optimum user's ``AutoQuantizationConfig`` gives."""

from __future__ import annotations

import platform
from pathlib import Path

#: Instruction sets optimum has a quantization preset for; ``auto`` picks this machine's best.
ISAS = ("auto", "avx512_vnni", "avx512", "avx2", "arm64")


def host_isa() -> str:
    """The best optimum quantization preset this CPU runs: avx512_vnni, avx512, avx2 or arm64."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    for isa in ("avx512_vnni", "avx512f"):
        if isa in flags:
            return isa.replace("avx512f", "avx512")
    return "avx2"


def optimum_preset(isa: str, *, is_static: bool, per_channel: bool = False):
    """``AutoQuantizationConfig.<isa>(is_static=..., per_channel=...)``: what optimum users run."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    return getattr(AutoQuantizationConfig, host_isa() if isa == "auto" else isa)(is_static=is_static,
                                                                                   per_channel=per_channel)
