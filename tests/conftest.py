import numpy as np
import pytest

import lstm_fast as lf

RTOL = {np.float32: 2e-5, np.float64: 1e-12}
ATOL = {np.float32: 2e-6, np.float64: 1e-13}


def tol(dtype):
    dtype = np.dtype(dtype).type
    return dict(rtol=RTOL[dtype], atol=ATOL[dtype])


def make_model(input_size=5, hidden_size=7, dtype=np.float64, seed=0, **kw):
    return lf.LSTM(input_size, hidden_size, dtype=dtype, seed=seed, **kw)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=[True, False], ids=["packed", "blas"])
def packed(request):
    """Runs a test with the packed float32 kernels (lf_pgemm.h, on the path lstm_fast._cpu.isa()
    names: AVX-512 or AVX2) and with BLAS alone."""
    from lstm_fast import _cpu, _forward
    if request.param and not _forward.packed_gemm_active():
        pytest.skip(f"the packed kernel needs AVX-512 or AVX2 + FMA (path: {_cpu.isa()})")
    _forward.set_packed_gemm(request.param)
    yield request.param
    _forward.set_packed_gemm(True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run only when asked for (-m slow, or a -m expression naming it)."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="a long sweep: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
