"""Robustness: property-based bad input, concurrency, thread control, fork, and leaks."""
import concurrent.futures
import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import lstm_fast as lf

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = lf.LSTM(3, 4, num_layers=2, bidirectional=True, seed=0)
CLEAR_ERRORS = (ValueError, TypeError, MemoryError)

BAD_DTYPES = [np.int8, np.int64, np.uint16, np.bool_, np.complex64, np.complex128, object, "U3", "S2"]


@SETTINGS
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=5), dtype=st.sampled_from(BAD_DTYPES))
def test_non_float_dtypes_raise_type_error(shape, dtype):
    x = np.zeros(shape, dtype=dtype)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        MODEL(x)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        MODEL.forward_train(x)


@SETTINGS
@given(shape=st.lists(st.integers(0, 7), min_size=0, max_size=5),
       dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_any_float_shape_gives_a_result_or_a_clear_error(shape, dtype):
    x = np.ones(shape, dtype=dtype)
    valid = len(shape) in (2, 3) and shape[-1] == 3 and shape[0] > 0 and (len(shape) == 2 or shape[1] > 0)
    if valid:
        out, (h, c) = MODEL(x)
        assert out.shape == tuple(shape[:-1]) + (8,)
        assert np.isfinite(out).all()
    else:
        with pytest.raises(ValueError) as info:
            MODEL(x)
        msg = str(info.value)
        assert "x " in msg or "x has" in msg or "x must" in msg, msg


@SETTINGS
@given(seq_len=st.integers(1, 6), batch=st.integers(1, 5), order=st.sampled_from(["C", "F"]),
       step=st.sampled_from([1, 2, -1]), data=st.data())
def test_unusual_layouts_equal_their_contiguous_copy(seq_len, batch, order, step, data):
    rng = np.random.default_rng(seq_len * 10 + batch)
    base = rng.standard_normal((seq_len * abs(step), batch, 3 * abs(step)))
    base = np.asarray(base, order=order)
    x = base[::step, :, ::step] if step != 1 else base
    x = x[:seq_len]
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    x = x.astype(dtype, order=order, copy=False) if dtype != np.float64 else x
    got = MODEL(x)[0]
    expected = MODEL(np.ascontiguousarray(x))[0]
    assert_array_equal(got, expected)


@SETTINGS
@given(values=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-45, 0.0, 3.0]),
                       min_size=12, max_size=12))
def test_special_values_never_crash(values):
    x = np.array(values, np.float32).reshape(2, 2, 3)
    out, (h, c) = MODEL(x)
    finite_in = np.isfinite(x).all()
    if finite_in:
        assert np.isfinite(out).all(), "finite input must give finite output"
    assert out.shape == (2, 2, 8)


@SETTINGS
@given(h_shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       c_shape=st.lists(st.integers(0, 5), min_size=1, max_size=4))
def test_wrong_state_shapes(h_shape, c_shape):
    x = np.zeros((3, 2, 3), np.float32)
    good = (4, 2, 4)
    if tuple(h_shape) == good and tuple(c_shape) == good:
        MODEL(x, (np.zeros(h_shape), np.zeros(c_shape)))
        return
    with pytest.raises(ValueError, match=r"(h0|c0) has shape .* expected \(4, 2, 4\)"):
        MODEL(x, (np.zeros(h_shape), np.zeros(c_shape)))


@SETTINGS
@given(lengths=st.lists(st.integers(-3, 9), min_size=0, max_size=6))
def test_lengths_validation(lengths):
    x = np.zeros((6, 4, 3), np.float32)
    ok = len(lengths) == 4 and all(1 <= n <= 6 for n in lengths)
    if ok:
        out, _ = MODEL(x, lengths=lengths)
        for b, n in enumerate(lengths):
            assert not out[n:, b].any()
    else:
        with pytest.raises(ValueError, match="lengths"):
            MODEL(x, lengths=lengths)


@SETTINGS
@given(key=st.sampled_from(sorted(MODEL.state_dict())), drop=st.booleans(),
       extra=st.integers(1, 3))
def test_state_dict_key_and_shape_errors(key, drop, extra):
    sd = MODEL.state_dict()
    if drop:
        del sd[key]
        match = "missing keys"
    else:
        sd[key] = np.zeros(sd[key].shape[:-1] + (sd[key].shape[-1] + extra,), np.float32)
        match = "has shape"
    m = lf.LSTM(3, 4, num_layers=2, bidirectional=True, seed=1)
    before = m.state_dict()
    with pytest.raises(ValueError, match=match):
        m.load_state_dict(sd)
    for k, v in before.items():
        assert_array_equal(m.state_dict()[k], v)


def test_sizes_that_overflow_are_refused_before_allocation():
    from lstm_fast import _validate

    with pytest.raises(MemoryError, match="more than can be addressed"):
        _validate.check_size_product(2, 2**31, 2**31, 4 * 2**20)
    m = lf.LSTM(2, 8)
    x = np.lib.stride_tricks.as_strided(np.zeros(2, np.float32), shape=(2**20, 2**20, 2), strides=(0, 0, 4))
    with pytest.raises((MemoryError, ValueError)):
        m(x)


def test_crash_prone_calls_in_a_child_process():
    """Each crash-prone call in a child process: a segfault fails this test, not the suite."""
    code = textwrap.dedent("""
        import numpy as np, lstm_fast as lf
        m = lf.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, seed=0)
        tried = 0
        for x in [np.zeros((1, 1, 3), np.float32), np.full((2, 3, 3), np.nan, np.float32),
                  np.full((4, 2, 3), 1e38, np.float32), np.zeros((3, 1, 3), np.float64)[::-1]]:
            m(x); m.forward_train(x); tried += 1
        for lengths in ([1, 1, 1], [4, 1, 4]):
            x = np.ones((4, 3, 3), np.float32)
            out, _, cache = m.forward_train(x, lengths=lengths)
            m.backward(cache, np.ones_like(out)); tried += 1
        s = lf.LSTM(3, 4, num_layers=2)
        st = s.zero_state(1)
        for _ in range(100):
            y, st = s.step(np.full((1, 3), np.inf, np.float32), st)
        tried += 1
        print(tried)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "7"


# ---------------------------------------------------------------------------- concurrency
def test_many_python_threads_share_one_model():
    """400 calls of mixed shapes from 8 Python threads give the serial results, bit for bit."""
    m = lf.LSTM(5, 16, num_layers=2, bidirectional=True, seed=0)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((int(rng.integers(1, 12)), int(rng.integers(1, 40)), 5)).astype(np.float32)
              for _ in range(400)]
    from threadpoolctl import threadpool_info

    from lstm_fast import _threads

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["filepath"] == _threads.BLAS_LIBRARY]

    before = blas_threads()
    serial = [m(x)[0] for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda x: m(x)[0], inputs))
    for a, b in zip(serial, parallel):
        assert_array_equal(a, b)
    assert blas_threads() == before, "scipy's BLAS gets its thread count back after the calls"


def test_concurrent_steps_equal_serial_ones():
    # Python threads stepping one model at once, each step on two threads where its weights
    # (2 MB) may split in packed panels (an OpenMP team per caller), or through the sequence
    # kernel from 8 rows; the live cell past 32 rows; and the reduced-precision models' step
    # plans, made by whichever caller steps first
    base = lf.LSTM(256, 256, seed=3)
    m = base.freeze()
    reduced = [base.freeze(precision=p) for p in ("bfloat16", "int8")]
    cell = lf.LSTMCell(256, 256, seed=4)
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((b, 256)).astype(np.float32) for b in (1, 3, 40) * 12]

    def both(x):
        with lf.threads(2):
            y, (h, c) = m.step(x, m.zero_state(len(x)))
            low = [f.step(x, f.zero_state(len(x)))[1][1] for f in reduced]
            return (y, c, cell(x)[1], *low)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(both, inputs))
    serial = [both(x) for x in inputs]
    for a, b in zip(serial, parallel):
        for u, w in zip(a, b):
            assert_array_equal(u, w)


def test_threads_context_is_per_python_thread():
    seen = {}

    def worker(n):
        with lf.threads(n):
            seen[n] = lf.get_num_threads()
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(worker, [1, 2, 3]))
    assert seen == {1: 1, 2: 2, 3: 3}


def test_threadpoolctl_sees_and_limits_our_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from lstm_fast import _threading

    if not _threading.openmp_enabled():
        pytest.skip("serial build")
    apis = {lib["user_api"] for lib in threadpoolctl.threadpool_info()}
    assert "openmp" in apis
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert lf.get_num_threads() == 1


def test_omp_num_threads_is_honoured():
    code = "import lstm_fast as lf; print(lf.get_num_threads())"
    env = dict(os.environ, OMP_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "3", out.stderr


def test_fork_after_threads_started_does_not_hang():
    code = textwrap.dedent("""
        import multiprocessing as mp, numpy as np, lstm_fast as lf
        m = lf.LSTM(8, 32, seed=0)
        x = np.random.default_rng(0).standard_normal((20, 64, 8)).astype(np.float32)
        with lf.threads(2):
            ref = m(x)[0]                       # OpenMP threads now exist in the parent
        def child(q):
            q.put(bool(np.array_equal(m(x)[0], ref)))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        p.join(60)
        print("hung" if p.is_alive() else q.get(timeout=5))
        if p.is_alive():
            p.kill()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


# ---------------------------------------------------------------------------- leaks
def _rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_leaks_over_many_calls():
    """10,000 calls of each entry point keep RSS and tracemalloc flat."""
    m = lf.LSTM(4, 8, num_layers=2, seed=0)
    cell = lf.LSTMCell(4, 8, seed=0)
    x = np.ones((3, 2, 4), np.float32)
    state = m.zero_state(2)
    reduced = [m.freeze(precision=p) for p in ("bfloat16", "int8")]

    def every_entry_point():
        m(x)
        m(x, lengths=[3, 1])
        out, _, cache = m.forward_train(x)
        m.backward(cache, out)
        m.step(x[0], state)
        cell(x[0])
        reduced[0](x, lengths=[3, 1])
        for f in reduced:
            f._lowp_step = None          # a step plan made and dropped each time
            f.step(x[0], state)
        try:
            m(np.zeros((3, 2, 5), np.float32))   # the error path too
        except ValueError:
            pass

    for _ in range(500):
        every_entry_point()
    gc.collect()
    tracemalloc.start()
    rss_before = _rss_kb()
    snap_before = tracemalloc.take_snapshot()
    for _ in range(10_000):
        every_entry_point()
    gc.collect()
    grown_py = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap_before, "filename"))
    tracemalloc.stop()
    grown_rss = _rss_kb() - rss_before
    assert grown_py < 200_000, f"Python allocations grew by {grown_py} bytes"
    assert grown_rss < 8_000, f"RSS grew by {grown_rss} kB over 10,000 rounds"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_step_plans_free_what_they_hold():
    """50,000 step plans of a 6-layer reduced-precision model made and dropped keep RSS flat
    (each holds about 1 KB of C layer descriptions: 50 MB if they were kept)."""
    from lstm_fast import _lowp

    f = lf.LSTM(3, 4, num_layers=6, seed=0).freeze(precision="bfloat16")

    def plans(n):
        for _ in range(n):
            _lowp.StepPlan(f.precision, f._lowp_kernel, f._lowp, 3, 4, 4)
    plans(2000)
    rss_before = _rss_kb()
    plans(50_000)
    assert _rss_kb() - rss_before < 8_000


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_work_buffers_are_reused_and_freed_with_their_thread():
    """Work buffers (packed weights, projection buffer, backward's dz, ...) are kept per thread
    between calls: a larger call in between changes no bits of a smaller one, and the buffers of
    threads that have exited are freed (60 threads x several MB would otherwise stay)."""
    import threading
    small = lf.LSTM(8, 64, seed=0)
    big = lf.LSTM(64, 256, seed=1)
    x_small = np.random.default_rng(0).standard_normal((7, 3, 8)).astype(np.float32)
    x_big = np.random.default_rng(1).standard_normal((20, 16, 64)).astype(np.float32)
    first = small(x_small)[0]
    out, _, cache = big.forward_train(x_big)
    big.backward(cache, out)
    assert_array_equal(small(x_small)[0], first)

    def train_once():
        out, _, cache = big.forward_train(x_big)
        big.backward(cache, out)

    for _ in range(5):                 # warm the allocator
        t = threading.Thread(target=train_once)
        t.start()
        t.join()
    gc.collect()
    rss_before = _rss_kb()
    for _ in range(60):
        t = threading.Thread(target=train_once)
        t.start()
        t.join()
    gc.collect()
    grown_rss = _rss_kb() - rss_before
    assert grown_rss < 40_000, f"RSS grew by {grown_rss} kB over 60 short-lived threads"
