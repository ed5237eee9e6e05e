"""Thread counts: one place that resolves how many OpenMP threads a kernel call gets.

Until `set_num_threads` is called, the count is the cores this process may use: its affinity mask
(os.sched_getaffinity: taskset, cpuset, a container's --cpuset-cpus) capped by its cgroup CPU
quota rounded up (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us: docker --cpus,
Kubernetes CPU limits). OMP_NUM_THREADS, when set, wins, and threadpoolctl's limits on the
"openmp" API (omp_get_max_threads) lower it, as for any OpenMP library. `None` means every core
this process may use, `-1` the same, `0` is an error. `with threads(n):` overrides the count for
the calling Python thread only. docs/threads.md says more.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
import time
from typing import Iterator

from . import _threading

class _ThreadOverride(threading.local):
    # a class default, so a thread without an override reads None without a failed lookup
    n_threads = None


_local = _ThreadOverride()


def _affinity_cores():
    """The CPUs in this process's affinity mask (taskset, cpuset, numactl), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read_first_line(path):
    try:
        with open(path) as f:
            return f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_dirs(mount, path):
    """The cgroup directory of `path` under `mount` and its ancestors up to the mount, deepest
    first. A path that does not exist under the mount (a container that sees the host's path
    without a cgroup namespace) falls back to the mount itself, which is then the container's."""
    parts = [p for p in path.strip().split("/") if p and p not in (".", "..")]
    dirs = [os.path.join(mount, *parts[:k]) if k else mount for k in range(len(parts), -1, -1)]
    return [d for d in dirs if os.path.isdir(d)] or ([mount] if os.path.isdir(mount) else [])


def cgroup_cpu_limit(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """The CPU quota of this process's cgroup as (cpus, description), or None without a quota.

    cpus is quota / period as a float (``cpu.max`` "150000 100000" is 1.5); the tightest limit of
    the process's cgroup and its ancestors wins. Reads cgroup v2 ``cpu.max`` (under `root`, or
    `root`/unified on a hybrid layout) and cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    (under `root`/cpu, `root`/cpu,cpuacct, ...). `root` and `proc_cgroup` are parameters so that
    tests can point them at fake files.
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    best = None

    def consider(cpus, text):
        nonlocal best
        if cpus > 0 and (best is None or cpus < best[0]):
            best = (cpus, text)

    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":                  # cgroup v2: "0::/path"
            for mount in (root, os.path.join(root, "unified")):
                for d in _cgroup_dirs(mount, path):
                    text = _read_first_line(os.path.join(d, "cpu.max"))
                    if not text:
                        continue
                    words = text.split()
                    try:
                        if words[0] == "max":
                            continue
                        quota = int(words[0])
                        period = int(words[1]) if len(words) > 1 else 100000
                    except (ValueError, IndexError):
                        continue
                    if period > 0:
                        consider(quota / period, f"cgroup cpu.max quota {quota}/{period}")
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            names = controllers.split(",")
            mounts = [",".join(names), ",".join(reversed(names)), "cpu", "cpu,cpuacct", "cpuacct,cpu"]
            seen = set()
            for name in mounts:
                mount = os.path.join(root, name)
                if mount in seen:
                    continue
                seen.add(mount)
                for d in _cgroup_dirs(mount, path):
                    quota = _read_first_line(os.path.join(d, "cpu.cfs_quota_us"))
                    period = _read_first_line(os.path.join(d, "cpu.cfs_period_us"))
                    try:
                        quota, period = int(quota), int(period)
                    except (TypeError, ValueError):
                        continue
                    if quota > 0 and period > 0:
                        consider(quota / period, f"cgroup cpu.cfs_quota_us {quota}/{period}")
    return best


_cgroup_cache = []   # [result] once read: a quota is read once per process (and again after fork)


def _cgroup_limit_cached():
    if not _cgroup_cache:
        _cgroup_cache.append(cgroup_cpu_limit())
    return _cgroup_cache[0]


AFFINITY_REFRESH = 1.0   # seconds: the affinity mask is read again at most this often
_affinity_cache = [-1e30, 0]   # [time read, cores]


def _affinity_cores_cached():
    # sched_getaffinity costs about 1.5 us from Python, as much as a whole step() call of a small
    # model: the mask is read again once a second, so a taskset/cpuset change is seen within that
    now = time.monotonic()
    if now - _affinity_cache[0] >= AFFINITY_REFRESH:
        _affinity_cache[1] = _affinity_cores()
        _affinity_cache[0] = now
    return _affinity_cache[1]


def _usable_cores():
    """(count, source): the cores this process may use, the affinity mask capped by a cgroup
    quota rounded up (a quota of 1.5 CPUs gives 2 threads, of 0.5 one)."""
    n = _affinity_cores_cached()
    limit = _cgroup_limit_cached()
    if limit is not None:
        quota_cores = max(1, math.ceil(limit[0] - 1e-9))
        if quota_cores < n:
            return quota_cores, limit[1]
    return n, "affinity"


def _available_cores():
    """How many cores this process may use: the affinity mask capped by the cgroup CPU quota."""
    return _usable_cores()[0]


def _omp_env():
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(env) if env.isdigit() and int(env) > 0 else 0


# read once, as the OpenMP runtime reads it once when it loads (at import)
_OMP_ENV = _omp_env()
_OPENMP = _threading.openmp_enabled()


def _default_threads_and_source():
    """The default count and where it came from.

    OMP_NUM_THREADS, when set, is the OpenMP runtime's count and wins. Otherwise the cores this
    process may use (affinity, cgroup quota), and never more than the OpenMP runtime's count
    (threadpoolctl's limits on the "openmp" API lower it).
    """
    if _OPENMP:
        omp = _threading.omp_max_threads()
        if _OMP_ENV:
            return max(1, omp), "OMP_NUM_THREADS"
        cores, source = _usable_cores()
        if omp < cores:
            return max(1, omp), "OpenMP runtime (omp_get_max_threads, e.g. a threadpoolctl limit)"
        return cores, source
    if _OMP_ENV:
        return _OMP_ENV, "OMP_NUM_THREADS"
    return _usable_cores()


def _default_threads():
    return _default_threads_and_source()[0]


def thread_source():
    """A sentence for show_config: the count the next call gets and where it came from."""
    if _in_forked_child:
        return "1 (forked child: one thread)"
    if _local.n_threads is not None:
        return f"{_local.n_threads} (lstm_fast.threads)"
    if _global_threads is not None:
        return f"{_global_threads} (set_num_threads)"
    n, source = _default_threads_and_source()
    return f"{n} ({source})"


_global_threads = None   # None: follow the OpenMP runtime until set_num_threads is called
_in_forked_child = False


def _after_fork_in_child():
    # GNU libgomp's thread pool does not survive fork(): a parallel region in the child of a
    # process that had started OpenMP threads hangs. The child therefore runs single-threaded
    # (the kernels take no OpenMP region at all with one thread).
    global _in_forked_child
    _in_forked_child = True
    _cgroup_cache.clear()
    _affinity_cache[0] = -1e30
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
