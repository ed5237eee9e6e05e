"""What users paste into a bug report: `lstm_fast.show_config()` / `python -m lstm_fast info`."""
import os
import platform
import sys

import numpy as np

from . import _threading, _threads
from ._version import __version__


def config():
    """The build and runtime facts as a dict (version, OpenMP, threads, BLAS, CPU)."""
    info = {
        "lstm_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "openmp": _threading.openmp_enabled(),
        "openmp_version": _threading.openmp_version(),
        "threads": _threads.get_num_threads(),
        "threads_source": _threads.thread_source(),
        "cores_available": _threads._available_cores(),
        "affinity_cores": _threads._affinity_cores(),
        "cgroup_cpu_quota": _cgroup_text(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait": _omp_wait_text(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "build_flags": _threading.build_flags(),
        "blas_library": _threads.BLAS_LIBRARY,
        "blas_thread_control": _threading.blas_control_enabled(),
    }
    import scipy

    info["scipy"] = scipy.__version__
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("filepath") == _threads.BLAS_LIBRARY:
                info["blas"] = f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')})"
    except ImportError:
        pass
    info["cpu"] = _cpu_model()
    info["cpu_features"] = " ".join(_cpu_features()) or "unknown"
    from . import _cpu

    info.update(_cpu.summary())
    from . import _precision

    # the kernel path of each precision (freeze(precision=...)) on this CPU, under LSTM_FAST_ISA
    info["LSTM_FAST_ISA"] = os.environ.get("LSTM_FAST_ISA")
    from . import _forward

    # work buffers kept per thread between calls (docs/design.md, Robustness: Memory)
    keep = _forward.workspace_max_bytes()
    info["workspace_kept"] = (f"up to {keep >> 20} MB a buffer per thread (LSTM_FAST_WORKSPACE_MB="
                              f"{os.environ.get('LSTM_FAST_WORKSPACE_MB')})")
    for precision, path in _precision.paths().items():
        info[f"path {precision}"] = path
    return info


def _omp_wait_text():
    """The OpenMP wait settings libgomp was loaded with, and who set them."""
    from ._ompwait import SOURCE

    spin = os.environ.get("GOMP_SPINCOUNT")
    policy = os.environ.get("OMP_WAIT_POLICY")
    parts = [f"GOMP_SPINCOUNT={spin}"] if spin is not None else []
    parts += [f"OMP_WAIT_POLICY={policy}"] if policy is not None else []
    return f"{' '.join(parts) or 'libgomp default'} ({SOURCE})"


def _cgroup_text():
    limit = _threads._cgroup_limit_cached()
    return "none" if limit is None else f"{limit[0]:g} CPUs ({limit[1]})"


FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
            "avx512_vnni", "amx_tile", "asimd", "sve", "neon")


def _cpu_features():
    """SIMD features from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in FEATURES if name in flags]
    except OSError:
        pass
    return []


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def show_config():
    """Print the build and runtime configuration (version, OpenMP, threads, BLAS, CPU).

    The ``threads`` line says where the count came from: ``2 (affinity)``, ``1 (cgroup cpu.max
    quota 100000/100000)``, ``4 (OMP_NUM_THREADS)``, ``1 (set_num_threads)``, ...
    """
    info = config()
    info["threads"] = info.pop("threads_source")
    for key, value in info.items():
        print(f"{key:>20}: {value}")
