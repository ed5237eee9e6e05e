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
