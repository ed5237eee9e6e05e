"""The kernels' own float32 sigmoid/tanh (vectorisable) against numpy, over every range that matters."""
import numpy as np
import pytest

from lstm_fast._forward import gate_math_py


def _inputs():
    return np.concatenate([
        np.linspace(-100, 100, 400001),
        np.linspace(-1e-3, 1e-3, 2001),
        np.geomspace(1e-30, 1e3, 2000), -np.geomspace(1e-30, 1e3, 2000),
        [0.0, 1e30, -1e30, np.finfo(np.float32).max, -np.finfo(np.float32).max],
    ]).astype(np.float32)


@pytest.mark.parametrize("function, exact", [
    ("sigmoid", lambda z: 1 / (1 + np.exp(-z))),
    ("tanh", np.tanh),
])
@pytest.mark.parametrize("dtype, max_ulp", [(np.float32, 6), (np.float64, 4)])
def test_close_to_numpy_in_ulps(function, exact, dtype, max_ulp):
    x = _inputs().astype(dtype)
    with np.errstate(over="ignore"):
        ref = exact(x.astype(np.longdouble)).astype(np.float64)
    got = gate_math_py(x, function).astype(np.float64)
    assert np.isfinite(got).all(), "finite input must give finite output"
    normal = np.abs(ref) > np.finfo(dtype).tiny
    ulps = np.abs(got - ref)[normal] / np.spacing(np.abs(ref[normal]).astype(dtype)).astype(np.float64)
    assert ulps.max() <= max_ulp
    assert np.abs(got - ref).max() < 4 * np.finfo(dtype).eps   # saturated tails included


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("function", ["sigmoid", "tanh"])
def test_special_values(dtype, function):
    x = np.array([np.nan, np.inf, -np.inf, 0.0], dtype)
    got = gate_math_py(x, function)
    assert np.isnan(got[0])
    if function == "sigmoid":
        assert got[1] == 1.0 and 0 <= got[2] < 1e-37 and got[3] == 0.5
    else:
        assert got[1] == 1.0 and got[2] == -1.0 and got[3] == 0.0
