"""The kernels' own float32 sigmoid/tanh (vectorisable) against numpy, over every range that matters."""
import numpy as np
import pytest

from lstm_fast._forward import cell_gates_py, gate_math_py


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


def _ulps(got, ref, dtype):
    normal = np.abs(ref) > np.finfo(dtype).tiny
    return np.abs(got - ref)[normal] / np.spacing(np.abs(ref[normal]).astype(dtype)).astype(np.float64)


@pytest.mark.parametrize("dtype, max_ulp", [(np.float32, 6), (np.float64, 4)])
def test_sequence_cell_close_to_numpy_in_ulps(dtype, max_ulp):
    # the cell the sequence kernels run (AVX-512 for float32 where the CPU has it, 16 lanes with
    # a masked tail: the count is not a multiple of 16), every gate fed the same values
    x = _inputs().astype(dtype)
    x = x[np.abs(x) < 1e4]
    gates, h = cell_gates_py(np.ascontiguousarray(np.tile(x, (4, 1))), np.zeros(x.size, dtype))
    xl = x.astype(np.longdouble)
    with np.errstate(over="ignore"):
        sig = (1 / (1 + np.exp(-xl))).astype(np.float64)
    th = np.tanh(xl).astype(np.float64)
    for k, ref in ((0, sig), (1, sig), (2, th), (3, sig)):
        got = gates[k].astype(np.float64)
        assert np.isfinite(got).all()
        assert _ulps(got, ref, dtype).max() <= max_ulp, k
        assert np.abs(got - ref).max() < 4 * np.finfo(dtype).eps
    # c = f*0 + i*g and h = o*tanh(c) from the cell's own gates
    c_ref = gates[0].astype(np.longdouble) * gates[2]
    h_ref = (gates[3] * np.tanh(c_ref.astype(dtype).astype(np.longdouble))).astype(np.float64)
    assert np.abs(h.astype(np.float64) - h_ref).max() <= 8 * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequence_cell_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30], dtype)
    gates, _ = cell_gates_py(np.ascontiguousarray(np.tile(x, (4, 1))), np.zeros(x.size, dtype))
    assert np.isnan(gates[:, 0]).all()
    sig = gates[0, 1:]
    assert sig[0] == 1.0 and 0 <= sig[1] < 1e-37 and sig[2] == 0.5
    assert sig[4] == 1.0 and 0 <= sig[5] < 1e-37
    assert list(gates[2, 1:]) == [1.0, -1.0, 0.0, 0.0, 1.0, -1.0]


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
