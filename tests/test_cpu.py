"""The CPU description, the parameters derived from it, LSTM_FAST_ISA, and every kernel path
(AVX-512, AVX2 + FMA, generic BLAS) against torch.nn.LSTM, bitwise across thread counts."""
import os
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import lstm_fast as lf
from lstm_fast import _cpu, _forward

from conftest import tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = [p for p in _cpu.ISA_ORDER
         if _cpu.ISA_ORDER.index(p) <= _cpu.ISA_ORDER.index(_cpu.describe()["best_isa"])]


def test_zen4_description_reproduces_the_constants_measured_there():
    # the block sizes and thresholds were measured on a Zen 4 core; derived from its
    # description they must come out exactly as they were, so Zen 4 keeps its choices
    got = _cpu.derive(_cpu.zen4_description())
    assert {k: got[k] for k in _cpu.ZEN4_CONSTANTS} == _cpu.ZEN4_CONSTANTS


def test_xeon_167_description_derives_its_own_blocking():
    # issue 15's Intel core: 48 KiB L1d and 2 MiB L2 give larger k blocks and mode thresholds
    # than Zen 4's, and a 12 x 32 register tile (24 accumulators, fewer panel loads an FMA)
    got = _cpu.derive(_cpu.xeon_167_description())
    assert got == {"tile_rows": 12, "tile_cols": 32, "avx2_tile_rows": 6, "avx2_tile_cols": 16,
                   "kc": 384, "kc_narrow": 96, "fused_max_bytes": 2 * 1024 * 1024,
                   "wide_min_bytes": 256 * 1024, "wide_gemv_bytes": 4 * 1024 * 1024,
                   "packed_wide_bytes": 1024 * 1024, "packed_wide_max_bytes": 2 * 1024 * 1024,
                   "interleave_min_bytes": 144 * 1024, "wide_fused_max_bytes": 8 * 1024 * 1024,
                   "lowp_rows_max_bytes": 1536 * 1024}
    assert got["kc"] * 32 * 4 == 48 * 1024             # one panel block fills L1d
    assert got != _cpu.derive(_cpu.zen4_description())


def test_derive_is_a_function_of_the_description_only():
    d = dict(_cpu.zen4_description())
    first = _cpu.derive(d)
    with lf.threads(2):
        assert _cpu.derive(d) == first
    assert d == _cpu.zen4_description()              # not modified
    # an Intel Xeon-like core: 48 KiB L1d, 2 MiB L2, two 512-bit FMA units
    xeon = dict(d, vendor="GenuineIntel", model_name="Intel(R) Xeon(R) Platinum", family=6,
                model=0x8F, l1d_bytes=48 * 1024, l2_bytes=2 * 1024 * 1024,
                l3_bytes=105 * 1024 * 1024, fma_units_512=2.0)
    px = _cpu.derive(xeon)
    assert px["tile_rows"] == 12 and px["kc"] == 384 and px["kc_narrow"] == 96
    assert px["packed_wide_bytes"] == 1024 * 1024 and px["wide_min_bytes"] == 256 * 1024
    assert px["interleave_min_bytes"] == 144 * 1024
    # Intel's mesh L3 is no place to stream the weights from once per chunk: L2 bounds the fused
    # step and the per-chunk passes there, a quarter of the L3 on AMD
    assert px["fused_max_bytes"] == px["packed_wide_max_bytes"] == 2 * 1024 * 1024
    amd = _cpu.derive(dict(xeon, vendor="AuthenticAMD"))
    assert amd["fused_max_bytes"] == amd["packed_wide_max_bytes"] == 105 * 1024 * 1024 // 4
    # the reduced-precision row split likewise: 3/4 of L2 on Intel, the stream cache on AMD
    assert px["lowp_rows_max_bytes"] == 1536 * 1024
    assert amd["lowp_rows_max_bytes"] == 105 * 1024 * 1024 // 4
    # missing sizes fall back to the Zen 4 ones
    assert _cpu.derive({}) == first


def test_fma_estimates_name_their_source():
    assert _cpu.fma_units_estimate("AuthenticAMD", 0x19, 0x11, "AMD EPYC 9554", "avx512")[0] == 1
    assert _cpu.fma_units_estimate("AuthenticAMD", 0x1A, 0x02, "AMD EPYC 9555", "avx512")[0] == 2
    assert _cpu.fma_units_estimate("GenuineIntel", 6, 0x8F, "Intel(R) Xeon(R) Gold 6430",
                                   "avx512")[0] == 2
    assert _cpu.fma_units_estimate("AuthenticAMD", 0x19, 0x01, "AMD EPYC 7763", "avx2")[0] == 1
    for args in (("AuthenticAMD", 0x1A, 2, "", "avx512"), ("X", 0, 0, "", "generic")):
        assert _cpu.fma_units_estimate(*args)[1]


def test_description_of_this_cpu():
    d = _cpu.describe()
    for key in ("vendor", "model_name", "features", "best_isa", "l1d_bytes", "l2_bytes",
                "l3_bytes", "l3_bytes_per_core", "fma_units_512", "fma_units_source"):
        assert key in d, key
    assert d["best_isa"] in _cpu.ISA_ORDER
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert d["source"] == "cpuid"
        assert d["l1d_bytes"] >= 16 * 1024 and d["l2_bytes"] >= 256 * 1024
        flags = open("/proc/cpuinfo").read()
        assert ("avx512f" in flags) == ("avx512f" in d["features"])
        assert (" avx2 " in flags) == ("avx2" in d["features"])
    info = lf._config.config()
    assert _cpu.isa() in info["cpu_isa"] and "kc=" in info["kernel_params"]
    assert d["model_name"] in info["cpu_description"]


def test_sysfs_fallback_reads_cache_sizes():
    caches = _cpu._sysfs_caches()
    if not os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        pytest.skip("no sysfs cache directory")
    assert 1 in caches and caches[1][0] >= 16 * 1024


def _run(code, isa):
    env = dict(os.environ)
    if isa is None:
        env.pop(_cpu.ENV, None)
    else:
        env[_cpu.ENV] = isa
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "amx", "AVX2"])
def test_environment_caps_the_path(isa):
    out = _run("import lstm_fast._cpu as c, lstm_fast._forward as f, lstm_fast._backward, "
               "lstm_fast._step\nprint(c.isa(), f.packed_gemm_active(), f.kernel_settings()['isa'])",
               isa)
    best = _cpu.describe()["best_isa"]
    cap = {"amx": "avx512"}.get(isa.lower(), isa.lower())
    want = _cpu.ISA_ORDER[min(_cpu.ISA_ORDER.index(best), _cpu.ISA_ORDER.index(cap))]
    assert out.stdout.split() == [want, str(want != "generic"), want]
    assert out.stderr == ""


def test_unknown_isa_warns_with_the_accepted_values_and_is_ignored():
    out = _run("import warnings\nwarnings.simplefilter('always')\nimport lstm_fast as lf\n"
               "from lstm_fast import _cpu\nprint(_cpu.isa())", "sse9")
    assert out.stdout.split() == [_cpu.describe()["best_isa"]]
    assert "LSTM_FAST_ISA" in out.stderr and "sse9" in out.stderr
    for name in _cpu.ACCEPTED:
        assert name in out.stderr


def test_private_setter_checks_its_argument():
    with pytest.raises(ValueError, match="avx512, avx2|generic"):
        _cpu._set_isa("avx1024")


@pytest.fixture(params=PATHS)
def isa(request):
    """Runs a test on each kernel path this CPU has (lstm_fast._cpu._set_isa)."""
    got = _cpu._set_isa(request.param)
    assert got == request.param and _cpu.isa() == request.param
    assert _forward.kernel_settings()["isa"] == request.param
    assert _forward.packed_gemm_active() == (request.param != "generic")
    yield request.param
    _cpu._set_isa(None)


def _torch_forward(m, x, lengths=None):
    torch = pytest.importorskip("torch")
    t = torch.nn.LSTM(m.input_size, m.hidden_size, num_layers=m.num_layers,
                      bidirectional=m.bidirectional, proj_size=m.proj_size)
    t.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in m.state_dict().items()})
    with torch.no_grad():
        out, (h, c) = t(torch.from_numpy(x))
    return out.numpy(), h.numpy(), c.numpy()


# shapes that reach every recurrence mode and kernel: batch 1 (row products, interleaved
# projection at H=128, split on two threads), batch 16 (chunked, fused), a wide batch, panel
# edges (4H, P off 32 columns), I > H, projections and two directions
SHAPES = [
    # T, B, I, H, layers, bidirectional, proj
    (20, 1, 32, 64, 1, False, 0),
    (24, 1, 128, 128, 1, False, 0),
    (30, 1, 300, 96, 2, False, 0),
    (12, 16, 40, 72, 1, True, 0),
    (10, 64, 64, 256, 1, False, 0),
    (9, 11, 7, 13, 2, True, 5),
    (6, 9, 70, 40, 1, False, 17),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_every_path_matches_torch_and_is_the_same_for_one_and_two_threads(isa, shape):
    T, B, I, H, L, bi, P = shape
    m = lf.LSTM(I, H, num_layers=L, bidirectional=bi, proj_size=P, dtype=np.float32, seed=3)
    x = np.random.default_rng(4).standard_normal((T, B, I)).astype(np.float32)
    t_out, t_h, t_c = _torch_forward(m, x)
    results = {}
    for n in (1, 2):
        with lf.threads(n):
            for mode in (0, 1, 2, 3):
                m._recurrence_mode = mode
                out, (h, c) = m(x)
                assert_allclose(out, t_out, **tol(np.float32))
                assert_allclose(h, t_h, **tol(np.float32))
                assert_allclose(c, t_c, **tol(np.float32))
                if n == 1:
                    results[mode] = (out, c)
                else:
                    assert_array_equal(out, results[mode][0], err_msg=f"{isa} mode {mode}")
                    assert_array_equal(c, results[mode][1], err_msg=f"{isa} mode {mode}")


@pytest.mark.parametrize("batch", [1, 5, 32, 33])
@pytest.mark.parametrize("frozen", [False, True])
def test_every_path_steps_like_torch(isa, batch, frozen):
    # live: up to 32 rows lf_gemv_rows in AVX-512 or AVX2 tiles, then the sequence kernel
    # (gemv/sgemm on the generic path); frozen: the packed panels in AVX-512 or AVX2
    m = lf.LSTM(37, 20, num_layers=2, proj_size=7, dtype=np.float32, seed=6)
    x = np.random.default_rng(7).standard_normal((6, batch, 37)).astype(np.float32)
    t_out, t_h, t_c = _torch_forward(m, x)
    stepper = m.freeze() if frozen else m
    state, outputs = stepper.zero_state(batch), []
    for t in range(6):
        y, state = stepper.step(x[t], state)
        outputs.append(y.copy())
    assert_allclose(np.stack(outputs), t_out, **tol(np.float32))
    assert_allclose(state[0], t_h, **tol(np.float32))
    assert_allclose(state[1], t_c, **tol(np.float32))
    assert m.freeze().kernel_path == ("blas" if isa == "generic" else isa)


@pytest.mark.parametrize("shape", [(15, 1, 64, 128, 1, False, 0), (8, 9, 33, 40, 1, True, 0),
                                   (12, 20, 130, 64, 2, False, 0), (7, 5, 9, 13, 1, False, 4)])
def test_every_path_trains_like_torch_autograd_and_thread_count_free(isa, shape):
    torch = pytest.importorskip("torch")
    T, B, I, H, L, bi, P = shape
    m = lf.LSTM(I, H, num_layers=L, bidirectional=bi, proj_size=P, dtype=np.float32, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    gy = rng.standard_normal((T, B, m.num_directions * (P or H))).astype(np.float32)
    t = torch.nn.LSTM(I, H, num_layers=L, bidirectional=bi, proj_size=P)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    xt = torch.from_numpy(x.copy()).requires_grad_()
    out, _ = t(xt)
    out.backward(torch.from_numpy(gy))
    first = None
    for n in (1, 2):
        with lf.threads(n):
            _, _, cache = m.forward_train(x)
            g = m.backward(cache, gy)
        assert_allclose(g.input, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
        for name, p in t.named_parameters():
            ref = p.grad.numpy()
            assert_allclose(g.params[name], ref, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(ref).max()),
                            err_msg=name)
        if first is None:
            first = g
        else:
            assert_array_equal(g.input, first.input)
            for name in first.params:
                assert_array_equal(g.params[name], first.params[name], err_msg=name)


def test_cell_of_every_path_within_a_few_ulps(isa):
    # the sequence kernels' cell (AVX-512, AVX2 or the vectorised scalar loop) against numpy in
    # float64, over a range that covers the clamps, the masked tail (37 units) and small values
    z = np.linspace(-12, 12, 4 * 37).astype(np.float32).reshape(4, 37)
    c = np.linspace(-3, 3, 37).astype(np.float32)
    gates, h = _forward.cell_gates_py(z, c.copy())
    z64 = z.astype(np.float64)
    sig = 1 / (1 + np.exp(-z64))
    ref = np.stack([sig[0], sig[1], np.tanh(z64[2]), sig[3]])
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (np.abs(gates - ref) / ulp).max() <= 6
    c_new = ref[1] * c + ref[0] * ref[2]
    assert_allclose(h, ref[3] * np.tanh(c_new), rtol=2e-6, atol=1e-7)


def test_tile_rows_do_not_change_a_bit():
    # the AVX-512 register tile's rows (8, or 12 on cores with two 512-bit FMA units) and the k
    # blocking follow the CPU; every output is one FMA chain, so the bits must not follow them
    if _cpu.describe()["best_isa"] != "avx512":
        pytest.skip("the AVX-512 tile needs AVX-512")
    from lstm_fast import _backward
    m = lf.LSTM(70, 96, num_layers=2, dtype=np.float32, seed=2)
    x = np.random.default_rng(3).standard_normal((30, 37, 70)).astype(np.float32)
    base = _cpu.params()
    runs = []
    try:
        for rows, kc, kcn in ((8, 256, 64), (12, 384, 96), (12, 64, 16)):
            p = dict(base, tile_rows=rows, kc=kc, kc_narrow=kcn)
            for mod in (_forward, _backward):
                mod._set_kernel(2, p)
            out, _ = m(x)
            _, _, cache = m.forward_train(x)
            g = m.backward(cache, np.ones_like(out))
            runs.append((out, g.params["weight_ih_l0"], g.params["weight_hh_l1"], g.input))
    finally:
        _cpu._apply()
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert_array_equal(a, b)
