"""cpuid through lf_cpu.h: the raw facts lstm_fast/_cpu.py describes the CPU with."""

cdef extern from "lf_cpu.h" nogil:
    ctypedef struct lf_cpu_info:
        int known
        char vendor[13]
        char brand[49]
        int family, model, stepping
        int avx2, fma, avx512f, avx512bw, avx512vl, avx512dq, avx512_bf16, avx512_vnni
        int amx_tile, amx_bf16, amx_int8
        int cpu_avx512f, cpu_amx_tile
        unsigned long long xcr0
        long l1d_bytes, l2_bytes, l3_bytes
        int l1d_shared, l2_shared, l3_shared
        int threads_per_core
    void lf_cpu_query(lf_cpu_info* info)


def query():
    """cpuid's answers as a dict ({"known": False} where cpuid is not available)."""
    cdef lf_cpu_info info
    lf_cpu_query(&info)
    if not info.known:
        return {"known": False}
    return {
        "known": True,
        "vendor": info.vendor.decode("ascii", "replace"),
        "brand": info.brand.decode("ascii", "replace").strip(),
        "family": info.family, "model": info.model, "stepping": info.stepping,
        "avx2": bool(info.avx2), "fma": bool(info.fma), "avx512f": bool(info.avx512f),
        "avx512bw": bool(info.avx512bw), "avx512vl": bool(info.avx512vl),
        "avx512dq": bool(info.avx512dq), "avx512_bf16": bool(info.avx512_bf16),
        "avx512_vnni": bool(info.avx512_vnni), "amx_tile": bool(info.amx_tile),
        "amx_bf16": bool(info.amx_bf16), "amx_int8": bool(info.amx_int8),
        "cpu_avx512f": bool(info.cpu_avx512f), "cpu_amx_tile": bool(info.cpu_amx_tile),
        "xcr0": int(info.xcr0),
        "l1d_bytes": info.l1d_bytes, "l2_bytes": info.l2_bytes, "l3_bytes": info.l3_bytes,
        "l1d_shared": info.l1d_shared, "l2_shared": info.l2_shared, "l3_shared": info.l3_shared,
        "threads_per_core": info.threads_per_core,
    }
