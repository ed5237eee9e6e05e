"""The CPU lstm_fast runs on, and the kernel parameters derived from it.

``describe()`` reads the CPU once (cpuid through src/lf_cpu.h, with /sys and sysconf as the
fallback for cache sizes): vendor, model name, vector ISA, L1d/L2/L3 sizes and an estimate of the
FMA throughput per core. ``derive(description)`` is a pure function of that description (never of
the thread count: every thread count must run the same operations, so that the bits do not change
with it) and returns the register tile, the k blocking and the recurrence-mode thresholds the
kernels use. The compiled modules read them once at import (``_apply``).

``LSTM_FAST_ISA`` caps the path: ``avx512``, ``avx2`` or ``generic`` (BLAS products and the
compiler-vectorised cell), or ``amx`` for no cap (helper kernels in reduced precision read the same
variable with ``amx|avx512|avx2|generic``; the float32 kernels here have no AMX path, so ``amx``
runs AVX-512 where the CPU has it). ``isa()`` is the path in use after the cap.
"""
import functools
import os
import warnings

ISA_ORDER = ("generic", "avx2", "avx512")        # float32 kernel paths, lowest first
ACCEPTED = ("amx", "avx512", "avx2", "generic")  # LSTM_FAST_ISA values
ENV = "LSTM_FAST_ISA"

# The constants measured on a Zen 4 core (32 KiB L1d, 1 MiB L2, 32 MiB L3, AVX-512 on 256-bit
# units) before they were derived; tests/test_cpu.py checks that derive() reproduces them there.
ZEN4_CONSTANTS = {
    "tile_rows": 8,
    "kc": 256,
    "kc_narrow": 64,
    "fused_max_bytes": 8 * 1024 * 1024,
    "wide_min_bytes": 128 * 1024,
    "wide_gemv_bytes": 2 * 1024 * 1024,
    "packed_wide_bytes": 512 * 1024,
    "packed_wide_max_bytes": 8 * 1024 * 1024,
    "interleave_min_bytes": 96 * 1024,
    "lowp_rows_max_bytes": 8 * 1024 * 1024,
}


def _sysfs_caches():
    """{level: (bytes, logical CPUs sharing)} of cpu0's data/unified caches from /sys (Linux)."""
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        if not name.startswith("index"):
            continue
        try:
            def read(field):
                with open(os.path.join(base, name, field)) as f:
                    return f.read().strip()
            if read("type") == "Instruction":
                continue
            level, size = int(read("level")), read("size")
            mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(size[-1:], 1)
            nbytes = int(size.rstrip("KMG")) * mult
            shared = 0
            for part in read("shared_cpu_list").split(","):
                a, _, b = part.partition("-")
                shared += (int(b) - int(a) + 1) if b else 1
            out[level] = (nbytes, shared)
        except (OSError, ValueError):
            continue
    return out


def _sysconf_caches():
    out = {}
    for level, key in ((1, "SC_LEVEL1_DCACHE_SIZE"), (2, "SC_LEVEL2_CACHE_SIZE"),
                       (3, "SC_LEVEL3_CACHE_SIZE")):
        try:
            value = os.sysconf(key)
        except (ValueError, OSError, AttributeError):
            continue
        if value and value > 0:
            out[level] = (value, 0)
    return out


def _proc_model_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def fma_units_estimate(vendor, family, model, model_name, isa):
    """FMA throughput per core in 512-bit FMAs a cycle (float32: 32 FMAs a cycle per unit),
    from the CPU model; the second element says where the number comes from.

    Sources and assumptions: Zen 4 (AMD family 0x19) executes AVX-512 on 256-bit units, two
    256-bit FMA pipes = one 512-bit FMA a cycle (AMD's Zen 4 software optimisation guide);
    Zen 5 (family 0x1A) has a full 512-bit datapath with two 512-bit FMA pipes in the server and
    desktop parts (AMD, Hot Chips 2024; the mobile parts are 256-bit, assumed from "Ryzen AI" in
    the name); Intel Xeon Scalable AVX-512 cores have two 512-bit FMA units (port 0+1 fused and
    port 5; some Bronze/Silver SKUs have one, not told apart here), Intel client AVX-512 cores one;
    AVX2 cores with FMA two 256-bit units = 1. Without FMA: 0.5."""
    name = model_name or ""
    if isa == "avx512":
        if vendor == "AuthenticAMD":
            if family >= 0x1A:
                if "Ryzen AI" in name:
                    return 1.0, "Zen 5 mobile: 512-bit ops on 256-bit units (assumed from the name)"
                return 2.0, "Zen 5: two 512-bit FMA pipes (AMD, Hot Chips 2024)"
            return 1.0, "Zen 4: AVX-512 on two 256-bit FMA pipes (AMD optimisation guide)"
        if vendor == "GenuineIntel":
            if "Xeon" in name:
                return 2.0, "Intel Xeon AVX-512: two 512-bit FMA units (Intel optimisation manual)"
            return 1.0, "Intel client AVX-512: one 512-bit FMA unit (ports 0+1 fused)"
        return 1.0, "unknown AVX-512 CPU: one 512-bit FMA unit assumed"
    if isa == "avx2":
        return 1.0, "AVX2+FMA: two 256-bit FMA units assumed"
    return 0.5, "no FMA vectors: assumed"


@functools.lru_cache(maxsize=1)
def describe():
    """The CPU as a dict: vendor, model name, family/model, ISA features, the best float32 kernel
    path the CPU (and OS) supports, cache sizes (L1d and L2 per core, L3 of one instance and per
    core), and the FMA throughput estimate. Read once per process."""
    raw = {"known": False}
    try:
        from . import _cpuid
        raw = _cpuid.query()
    except ImportError:
        pass
    desc = {"source": "cpuid" if raw.get("known") else "sysfs"}
    desc["vendor"] = raw.get("vendor", "")
    desc["model_name"] = raw.get("brand") or _proc_model_name() or "unknown"
    desc["family"] = raw.get("family", 0)
    desc["model"] = raw.get("model", 0)
    feats = [k for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                         "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
             if raw.get(k)]
    desc["features"] = feats
    if raw.get("cpu_avx512f") and not raw.get("avx512f"):
        desc["note"] = "the CPU has AVX-512F but the OS does not enable its registers (XCR0)"
    if raw.get("avx512f") and raw.get("avx512bw") and raw.get("avx512vl") and raw.get("fma"):
        best = "avx512"
    elif raw.get("avx2") and raw.get("fma"):
        best = "avx2"
    else:
        best = "generic"
    desc["best_isa"] = best
    desc["amx"] = bool(raw.get("amx_bf16"))
    sys_caches = _sysfs_caches() or _sysconf_caches()
    for level, key in ((1, "l1d"), (2, "l2"), (3, "l3")):
        nbytes, shared = raw.get(f"{key}_bytes", 0), raw.get(f"{key}_shared", 0)
        if not nbytes and level in sys_caches:
            nbytes, shared = sys_caches[level]
        desc[f"{key}_bytes"] = int(nbytes or 0)
        desc[f"{key}_shared_cpus"] = int(shared or 0)
    tpc = raw.get("threads_per_core") or 1
    # L1d and L2 are private to a core on every x86 server CPU we know; L3 is shared by the
    # cores of a CCX / die: per core = instance / cores sharing it (logical CPUs / threads a core)
    shared_cores = max(1, desc["l3_shared_cpus"] // tpc) if desc["l3_shared_cpus"] else 1
    desc["l3_bytes_per_core"] = desc["l3_bytes"] // shared_cores if desc["l3_bytes"] else 0
    fma, why = fma_units_estimate(desc["vendor"], desc["family"], desc["model"],
                                  desc["model_name"], best)
    desc["fma_units_512"] = fma
    desc["fma_units_source"] = why
    return desc


def zen4_description():
    """The Zen 4 core the original constants were measured on (AMD EPYC family 0x19): 32 KiB L1d,
    1 MiB L2, 32 MiB L3 (one CCX), AVX-512 on 256-bit units."""
    return {"source": "reference", "vendor": "AuthenticAMD", "model_name": "AMD EPYC (Zen 4)",
            "family": 0x19, "model": 0x11,
            "features": ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                         "avx512_bf16", "avx512_vnni"],
            "best_isa": "avx512", "amx": False,
            "l1d_bytes": 32 * 1024, "l2_bytes": 1024 * 1024, "l3_bytes": 32 * 1024 * 1024,
            "l1d_shared_cpus": 2, "l2_shared_cpus": 2, "l3_shared_cpus": 16,
            "l3_bytes_per_core": 4 * 1024 * 1024, "fma_units_512": 1.0,
            "fma_units_source": "Zen 4: AVX-512 on two 256-bit FMA pipes"}


def xeon_167_description():
    """The Intel Xeon family 6 model 167 (0xa7) core of issue 15 (AVX-512 and AMX, two 512-bit
    FMA units): 48 KiB L1d, 2 MiB L2 per core; the L3 as this KVM guest reports it (480 MiB)."""
    return {"source": "reference", "vendor": "GenuineIntel", "model_name": "Intel(R) Xeon(R) Processor",
            "family": 6, "model": 0xA7,
            "features": ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                         "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"],
            "best_isa": "avx512", "amx": True,
            "l1d_bytes": 48 * 1024, "l2_bytes": 2 * 1024 * 1024, "l3_bytes": 480 * 1024 * 1024,
            "fma_units_512": 2.0,
            "fma_units_source": "Intel Xeon AVX-512: two 512-bit FMA units"}


def derive(description):
    """Kernel parameters from a CPU description (a pure function: same description, same
    parameters; the thread count is no input, so the bits never depend on it).

    - tile_rows: rows of the AVX-512 register tile (x 32 columns, one packed panel), 8 or 12.
      8 rows = 16 zmm accumulators: two 512-bit FMA units with 4 cycles of latency need 8
      independent chains, so 16 already cover a core with two units; 12 rows (24 accumulators,
      fewer panel loads per FMA) was measured on Zen 5 (two 512-bit FMA pipes) and was no faster
      (within +-3 % on the GEMM-bound rows, noise both ways; that page was lost), so 8 on
      every CPU but Intel cores with two 512-bit units, where 12 measured 5-10 % faster on the
      GEMM-bound rows (Xeon family 6 model 167); both give the same bits.
    - avx2_tile_rows / avx2_tile_cols: the AVX2 tile, 6 rows x 16 columns (12 ymm accumulators of
      16 registers), half a panel at a time.
    - kc: k per block of the k-blocked products (weight gradients): a block of one panel
      (kc x 32 floats) fills L1d. kc_narrow: the same for products of at most 64 columns, a
      quarter of L1d (the panel slice stays in L1 beside A's rows).
    - fused_max_bytes / packed_wide_max_bytes: W_ih + W_hh (fused per-step projection), W_hh
      (one pass per step instead of per chunk) up to the cache each chunk's pass may stream the
      weights from at the FMA rate: a quarter of the L3 instance on AMD (a CCX's own L3), the L2
      on Intel, whose mesh L3 feeds one core too slowly (Xeon family 6 model 207, 1 thread:
      (25,128,1024,1024) 422 -> 362 ms and (50,64,512,512) 103 -> 93-96 ms with one pass per
      step; its 260 MiB L3 gave 65 MiB before).
    - wide_min_bytes (BLAS, batch > 1): an eighth of L2; wide_gemv_bytes (BLAS, batch 1): 2 x L2.
    - packed_wide_bytes: W_hh beyond half of L2 for a single work item.
    - interleave_min_bytes: batch-1 steps interleave the projection from 3 x L1d of W_hh.
    - wide_fused_max_bytes: wide mode's steps project their own inputs (one pass a step over
      W_ih and W_hh) up to 4 x L2 of both (Xeon family 6 model 207: 8 MB faster, 32 MB slower
      than the up-front projection; on Zen 4 wide mode starts beyond it).
    - lowp_rows_max_bytes: an int8/bfloat16 layer runs split by rows, each thread (or one alone,
      from 16 rows) projecting its own inputs step by step, up to 3/4 of L2 of W_ih + W_hh (+ W_hr)
      on Intel (Xeon family 6 model 207, 2 MiB L2, two threads: int8 0.85x-0.97x the time up to
      1.5 MB, 1.05x at 2 MB; bfloat16 0.86x-0.95x up to 1.5 MB, 0.99x-1.01x at 2-2.3 MB); on AMD
      up to the stream cache, a quarter of the L3 (Zen 4, 1 MiB L2, 32 MiB L3, 1 and 2 threads:
      bfloat16 0.85x-0.96x the time with 1-4 MB of weights, int8 0.88x-0.94x with 2 MB, 1.00x-1.01x
      with 8 MB; bfloat16's 16 MB 1.02x slower, so it stays out).
    Missing sizes take the Zen 4 values."""
    l1d = description.get("l1d_bytes") or 32 * 1024
    l2 = description.get("l2_bytes") or 1024 * 1024
    l3 = description.get("l3_bytes") or 32 * 1024 * 1024
    panel_row = 32 * 4                            # bytes of one k-row of a packed panel
    # 12 rows on Intel cores with two 512-bit FMA units: 5-10 % faster on the three GEMM-bound
    # rows of the grid on Xeon family 6 model 167 (docs/performance.md); Zen 5 measured no faster
    intel = description.get("vendor") == "GenuineIntel"
    two_fma_intel = intel and (description.get("fma_units_512") or 1.0) >= 2.0
    tile_rows = 12 if two_fma_intel else 8
    # Intel's L3 is a mesh of slices, a few MB per core at 15-20 GB/s a core: a pass over the
    # weights per chunk (or per fused step) must find them in L2 there
    stream_cache = l2 if intel else l3 // 4
    return {
        "tile_rows": tile_rows,
        "tile_cols": 32,
        "avx2_tile_rows": 6,
        "avx2_tile_cols": 16,
        "kc": max(64, l1d // panel_row // 16 * 16),
        "kc_narrow": max(16, l1d // 4 // panel_row // 16 * 16),
        "fused_max_bytes": stream_cache,
        "wide_min_bytes": l2 // 8,
        "wide_gemv_bytes": 2 * l2,
        "packed_wide_bytes": l2 // 2,
        "packed_wide_max_bytes": stream_cache,
        "interleave_min_bytes": 3 * l1d,
        "wide_fused_max_bytes": 4 * l2,
        "lowp_rows_max_bytes": 3 * l2 // 4 if intel else max(3 * l2 // 4, stream_cache),
    }


def _ceiling():
    """LSTM_FAST_ISA, checked: the cap it names, or None (unset, empty or unknown)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in ACCEPTED:
        warnings.warn(f"{ENV}={os.environ.get(ENV)!r} is not one of {', '.join(ACCEPTED)}; "
                      f"ignored (the best path the CPU has is used)", RuntimeWarning, stacklevel=3)
        return None
    return "avx512" if value == "amx" else value


_override = None      # _set_isa's choice (tests), over the environment's


@functools.lru_cache(maxsize=1)
def _env_isa():
    best = describe()["best_isa"]
    cap = _ceiling()
    if cap is None:
        return best
    return ISA_ORDER[min(ISA_ORDER.index(best), ISA_ORDER.index(cap))]


def isa():
    """The float32 kernel path in use: "avx512", "avx2" or "generic" (the best the CPU has,
    capped by LSTM_FAST_ISA)."""
    if _override is not None:
        return _override
    return _env_isa()


def params():
    """derive(describe()): the kernel parameters of this CPU."""
    return derive(describe())


def kernel_settings():
    """(isa code 0/1/2, params) for the compiled modules' _set_kernel."""
    return ISA_ORDER.index(isa()), params()


def _apply():
    """Hands the path and parameters to the compiled modules already imported."""
    import sys
    code, p = kernel_settings()
    for name in ("lstm_fast._forward", "lstm_fast._backward", "lstm_fast._step", "lstm_fast._lowp"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "_set_kernel"):
            mod._set_kernel(code, p)


def _set_isa(name):
    """Private (tests, benchmarks): run the path `name` ("avx512", "avx2", "generic"), capped by
    what the CPU has; None returns to LSTM_FAST_ISA's choice. Not thread-safe: no call may run."""
    global _override
    if name is not None:
        if name not in ISA_ORDER:
            raise ValueError(f"isa must be one of {', '.join(ISA_ORDER)} or None, got {name!r}")
        best = describe()["best_isa"]
        name = ISA_ORDER[min(ISA_ORDER.index(best), ISA_ORDER.index(name))]
    _override = name
    _apply()
    return isa()


def summary():
    """Lines for show_config: the description and the derived parameters."""
    d, p = describe(), params()
    kib = lambda n: f"{n // 1024} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:g} MiB"
    return {
        "cpu_description": (f"{d['model_name']} ({d['vendor']} family {d['family']:#x} model "
                            f"{d['model']:#x}); L1d {kib(d['l1d_bytes'])}, L2 {kib(d['l2_bytes'])}, "
                            f"L3 {kib(d['l3_bytes'])} ({kib(d['l3_bytes_per_core'])} a core); "
                            f"{d['fma_units_512']:g} x 512-bit FMA a cycle ({d['fma_units_source']})"),
        "cpu_isa": f"{isa()} (best {d['best_isa']}, {ENV}={os.environ.get(ENV)!r}); "
                   f"features: {' '.join(d['features']) or 'none'}",
        "kernel_params": ", ".join(f"{k}={v}" for k, v in p.items()),
    }
