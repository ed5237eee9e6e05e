"""OpenMP facts of this build, and the thread count of scipy's BLAS while our kernels run.

Our kernels call BLAS from inside their own OpenMP threads, one GEMM per thread, so BLAS itself must
run single-threaded meanwhile (else 2 x 2 threads fight over 2 cores, and OpenBLAS serialises
concurrent threaded calls). scipy's OpenBLAS has one global thread count; `blas_single_enter` /
`blas_single_exit` set it to 1 for as long as any kernel call is running and restore it after.
Both are called with the GIL held, which is what makes the counter safe.
"""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int lf_openmp_enabled(void) { return 1; }
    static int lf_omp_max_threads(void) { return omp_get_max_threads(); }
    static int lf_openmp_version(void) { return _OPENMP; }
    #else
    static int lf_openmp_enabled(void) { return 0; }
    static int lf_omp_max_threads(void) { return 1; }
    static int lf_openmp_version(void) { return 0; }
    #endif
    #ifndef LSTM_FAST_CFLAGS
    #define LSTM_FAST_CFLAGS ""
    #endif
    static const char* lf_cflags(void) { return LSTM_FAST_CFLAGS; }
    """
    int lf_openmp_enabled() noexcept nogil
    int lf_omp_max_threads() noexcept nogil
    int lf_openmp_version() noexcept nogil
    const char* lf_cflags() noexcept nogil

ctypedef void (*set_threads_fn)(int) noexcept nogil
ctypedef int (*get_threads_fn)() noexcept nogil

cdef set_threads_fn _blas_set = NULL
cdef get_threads_fn _blas_get = NULL
cdef int _active_calls = 0
cdef int _saved_threads = 0


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(lf_openmp_enabled())


def openmp_version():
    """The _OPENMP date macro of the compiler (e.g. 201511), 0 for a serial build."""
    return lf_openmp_version()


def omp_max_threads():
    """omp_get_max_threads() of the OpenMP runtime (1 for a serial build)."""
    return lf_omp_max_threads()


def build_flags():
    """The compiler flags the extension was built with."""
    return lf_cflags().decode()


def set_blas_functions(size_t set_address, size_t get_address):
    """Install the addresses of scipy's `openblas_set_num_threads` / `openblas_get_num_threads`.

    Zero addresses switch the control off (a BLAS we do not know how to steer).
    """
    global _blas_set, _blas_get
    if _active_calls:
        raise RuntimeError("cannot change the BLAS thread control while a kernel is running")
    _blas_set = <set_threads_fn> set_address
    _blas_get = <get_threads_fn> get_address
    if set_address == 0 or get_address == 0:
        _blas_set = NULL
        _blas_get = NULL


def blas_control_enabled():
    return _blas_set != NULL


cpdef void blas_single_enter() noexcept:
    """Entering a kernel call: BLAS goes single-threaded (call with the GIL held)."""
    global _active_calls, _saved_threads
    if _blas_set == NULL:
        return
    if _active_calls == 0:
        _saved_threads = _blas_get()
        if _saved_threads != 1:
            _blas_set(1)
    _active_calls += 1


cpdef void blas_single_exit() noexcept:
    """Leaving a kernel call: the last one out restores BLAS's thread count."""
    global _active_calls
    if _blas_set == NULL or _active_calls == 0:
        return
    _active_calls -= 1
    if _active_calls == 0 and _saved_threads != 1:
        _blas_set(_saved_threads)


def reset_after_fork():
    """In a forked child no kernel call is running: drop the counter inherited from the parent
    (a call in flight in another parent thread) and give BLAS its thread count back."""
    global _active_calls
    if _active_calls and _blas_set != NULL and _saved_threads != 1:
        _blas_set(_saved_threads)
    _active_calls = 0
