"""Which kernel path runs each precision: the CPU's features, capped by LSTM_FAST_ISA.

Paths: "amx" (AMX tiles, TDPBF16PS / TDPBUSD), "avx512_bf16" (VDPBF16PS), "avx512_vnni"
(VPDPBUSD), "avx512_fma" and "avx2_fma" (bfloat16 on CPUs without VDPBF16PS: VDPBF16PS's chain
in float32 FMAs, the same bits), "avx2" (int8 on CPUs without VPDPBUSD: VPMADDWD, exact sums, the
same bits), "generic" (portable C, the same numerics). Detection is in C (lf_lowp.h):
__builtin_cpu_supports for AVX512-BF16/VNNI; CPUID plus the Linux tile-state permission
(arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) for AMX, a refusal meaning no AMX.

LSTM_FAST_ISA (amx | avx512 | avx2 | generic) is a ceiling: the best path at or below it. It is
read in one place, `isa_ceiling()`, with the float32 kernels' semantics (lstm_fast._cpu).
"""
from __future__ import annotations

import os

PRECISIONS = ("float32", "bfloat16", "int8")
REDUCED = ("bfloat16", "int8")
ISA_LEVELS = ("generic", "avx2", "avx512", "amx")   # lowest first

# a path forced by tests (_force_path), or None
_forced = None


def isa_ceiling() -> str:
    """The highest instruction set the kernels may use: LSTM_FAST_ISA, or "amx" (no cap). An
    unknown value is ignored, as lstm_fast._cpu (which reads the same variable) warns."""
    from . import _cpu

    value = os.environ.get(_cpu.ENV, "").strip().lower()
    return value if value in ISA_LEVELS else "amx"


def check_precision(precision) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def _kernel_path(path):
    """The kernel's own name of a reported path."""
    return {"avx512_bf16": "avx512", "avx512_vnni": "avx512"}.get(path, path)


_FORCEABLE = ("generic", "avx512_bf16", "avx512_vnni", "avx512_fma", "avx2_fma", "avx2", "amx",
              "amx_emulated")


def path_for(precision: str) -> str:
    """The path `precision` runs on here: amx, avx512_bf16 or avx512_fma or avx2_fma (bfloat16),
    avx512_vnni or avx2 (int8), or generic (float32 reports the float32 kernels: "avx512", "avx2" or
    "generic")."""
    from . import _lowp

    check_precision(precision)
    if precision == "float32":
        from . import _cpu

        return _cpu.isa()
    if _forced is not None:
        return _forced
    level = ISA_LEVELS.index(isa_ceiling())
    if level >= 3 and _lowp.path_ok(precision, "amx"):
        return "amx"
    if level >= 2 and _lowp.path_ok(precision, "avx512"):
        return "avx512_bf16" if precision == "bfloat16" else "avx512_vnni"
    if level >= 2 and _lowp.path_ok(precision, "avx512_fma"):
        return "avx512_fma"
    if level >= 1 and precision == "bfloat16" and _lowp.path_ok(precision, "avx2_fma"):
        return "avx2_fma"
    if level >= 1 and precision == "int8" and _lowp.path_ok(precision, "avx2"):
        return "avx2"
    return "generic"


def _force_path(path: str | None) -> None:
    """Tests: every later freeze runs `path` (one of _FORCEABLE; amx_emulated is the AMX tile
    logic over emulated tiles); None returns to detection."""
    global _forced
    if path is not None and path not in _FORCEABLE:
        raise ValueError(f"unknown path {path!r}")
    _forced = path


def paths() -> dict:
    """precision -> path on this CPU, for show_config."""
    out = {}
    for p in PRECISIONS:
        try:
            out[p] = path_for(p)
        except ValueError as exc:   # a bad LSTM_FAST_ISA
            out[p] = f"error: {exc}"
    return out
