"""Thread counts: one place that resolves how many OpenMP threads a kernel call gets.

Until `set_num_threads` is called, the count is the OpenMP runtime's own (omp_get_max_threads):
OMP_NUM_THREADS and threadpoolctl's limits on the "openmp" API steer lstm_fast like any OpenMP
library. `None` means every core this process may use, `-1` the same, `0` is an error.
`with threads(n):` overrides the count for the calling Python thread only.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator

from . import _threading

class _ThreadOverride(threading.local):
    # a class default, so a thread without an override reads None without a failed lookup
    n_threads = None


_local = _ThreadOverride()


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _default_threads():
    """The OpenMP runtime's count (OMP_NUM_THREADS, threadpoolctl), the cores without OpenMP."""
    if _threading.openmp_enabled():
        return max(1, _threading.omp_max_threads())
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return _available_cores()


_global_threads = None   # None: follow the OpenMP runtime until set_num_threads is called
_in_forked_child = False


def _after_fork_in_child():
    # GNU libgomp's thread pool does not survive fork(): a parallel region in the child of a
    # process that had started OpenMP threads hangs. The child therefore runs single-threaded
    # (the kernels take no OpenMP region at all with one thread).
    global _in_forked_child
    _in_forked_child = True
    _threading.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _resolve(n_threads, name="n_threads"):
    if n_threads is None or (not isinstance(n_threads, bool) and n_threads == -1):
        return _available_cores()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int):
        try:
            import numpy as np

            if isinstance(n_threads, np.integer):
                n_threads = int(n_threads)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an int, None or -1, got {type(n_threads).__name__}") from None
    if n_threads == -1:
        return _available_cores()
    if n_threads <= 0:
        raise ValueError(f"{name} must be a positive int, None or -1 (all cores), got {n_threads}")
    return n_threads


def set_num_threads(n_threads: int | None) -> None:
    """Set the number of threads lstm_fast's kernels use from now on, in every Python thread.

    Parameters
    ----------
    n_threads : int or None
        A positive count; ``None`` or ``-1`` mean every core this process may use. Before any
        call, lstm_fast follows the OpenMP runtime (OMP_NUM_THREADS, threadpoolctl).
    """
    global _global_threads
    _global_threads = _resolve(n_threads)


def get_num_threads() -> int:
    """The number of threads the next kernel call from this Python thread will use."""
    if _in_forked_child:
        return 1
    override = _local.n_threads
    if override is not None:
        return override
    return _global_threads if _global_threads is not None else _default_threads()


@contextlib.contextmanager
def threads(n_threads: int | None) -> Iterator[int]:
    """Context manager: use `n_threads` threads inside the block, in this Python thread only.

    >>> with lstm_fast.threads(1):
    ...     out, _ = model(x)
    """
    previous = _local.n_threads
    _local.n_threads = _resolve(n_threads)
    try:
        yield _local.n_threads
    finally:
        _local.n_threads = previous


def _find_scipy_openblas():
    """The ctypes handle and symbol prefix of the OpenBLAS that scipy.linalg.cython_blas calls.

    Found through threadpoolctl among the loaded libraries: the one shipped with scipy (its
    file lies under scipy's install), or the only OpenBLAS when there is just one. None otherwise.
    """
    import scipy
    import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS before we look for it)

    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    candidates = [
        lib for lib in ThreadpoolController().lib_controllers if lib.internal_api == "openblas"
    ]
    scipy_root = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
    own = [
        lib for lib in candidates
        if os.path.abspath(lib.filepath).startswith(scipy_root)
        and "scipy" in os.path.basename(os.path.dirname(lib.filepath))
    ]
    if len(own) == 1:
        return own[0]
    if len(candidates) == 1:
        return candidates[0]
    return None


def _install_blas_control():
    """Give the kernels scipy's OpenBLAS set/get-thread functions, so they can run it single-threaded."""
    lib = _find_scipy_openblas()
    if lib is None:
        return None
    dynlib = lib.dynlib
    for prefix in ("scipy_", ""):
        for suffix in ("", "64_"):
            try:
                set_fn = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}")
                get_fn = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}")
            except AttributeError:
                continue
            _threading.set_blas_functions(
                ctypes.cast(set_fn, ctypes.c_void_p).value, ctypes.cast(get_fn, ctypes.c_void_p).value
            )
            return lib.filepath
    return None


BLAS_LIBRARY = _install_blas_control()
