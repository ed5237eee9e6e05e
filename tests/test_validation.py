"""Bad input gets a clear ValueError/TypeError naming what is wrong; never a crash."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lstm_fast as lf


@pytest.fixture
def model():
    return lf.LSTM(4, 6, num_layers=2, bidirectional=True, seed=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_size=0, hidden_size=4), ValueError, "input_size must be >= 1"),
    (dict(input_size=4, hidden_size=-3), ValueError, "hidden_size must be >= 1"),
    (dict(input_size=float("nan"), hidden_size=4), TypeError, "input_size must be an int"),
    (dict(input_size=4.0, hidden_size=4), TypeError, "input_size must be an int"),
    (dict(input_size=True, hidden_size=4), TypeError, "input_size must be an int"),
    (dict(input_size="4", hidden_size=4), TypeError, "input_size must be an int"),
    (dict(input_size=4, hidden_size=4, num_layers=0), ValueError, "num_layers must be >= 1"),
    (dict(input_size=4, hidden_size=4, proj_size=4), ValueError, "proj_size must be smaller"),
    (dict(input_size=4, hidden_size=4, proj_size=-1), ValueError, "proj_size must be >= 0"),
    (dict(input_size=4, hidden_size=4, dropout=1.5), ValueError, "dropout"),
    (dict(input_size=4, hidden_size=4, dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (dict(input_size=4, hidden_size=4, dtype=np.float16), TypeError, "dtype must be float32 or float64"),
    (dict(input_size=4, hidden_size=2**40), ValueError, "too large"),
])
def test_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        lf.LSTM(**kwargs)


@pytest.mark.parametrize("x, error, match", [
    (np.zeros((5, 3, 3), np.float32), ValueError, "x has 3 features, expected input_size=4"),
    (np.zeros((5, 3, 4, 1), np.float32), ValueError, "must be 3-D"),
    (np.zeros(4, np.float32), ValueError, "must be 3-D"),
    (np.zeros((0, 3, 4), np.float32), ValueError, "0 time steps"),
    (np.zeros((5, 0, 4), np.float32), ValueError, "batch of 0"),
    (np.zeros((5, 3, 4), np.int64), TypeError, "floating-point"),
    (np.zeros((5, 3, 4), bool), TypeError, "floating-point"),
    (np.zeros((5, 3, 4), np.complex64), TypeError, "floating-point"),
    (np.zeros((5, 3, 4), object), TypeError, "floating-point"),
    ("not an array", TypeError, "floating-point"),
])
def test_bad_x(model, x, error, match):
    with pytest.raises(error, match=match):
        model(x)


def test_bad_states(model):
    x = np.zeros((5, 3, 4), np.float32)
    good_h = np.zeros((4, 3, 6), np.float32)
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 3, 6\), expected \(4, 3, 6\)"):
        model(x, (np.zeros((2, 3, 6), np.float32), good_h))
    with pytest.raises(ValueError, match=r"c0 has shape \(4, 3, 5\), expected \(4, 3, 6\)"):
        model(x, (good_h, np.zeros((4, 3, 5), np.float32)))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        model(x, good_h)
    with pytest.raises(TypeError, match="h0 must be a floating-point"):
        model(x, (good_h.astype(np.int32), good_h))


def test_torch_bfloat16_names_the_argument(model):
    torch = pytest.importorskip("torch")
    x = torch.zeros((5, 3, 4), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16.*float16, float32 or float64"):
        model(x)
    # the float32 tensor of the same values is accepted, so the refusal is about the dtype
    out, _ = model(x.float())
    assert out.shape == (5, 3, 12)
    good_h = torch.zeros((4, 3, 6))
    with pytest.raises(TypeError, match=r"h0 has dtype torch.bfloat16"):
        model(x.float(), (good_h.bfloat16(), good_h))
    with pytest.raises(TypeError, match=r"c0 has dtype torch.bfloat16"):
        model(x.float(), (good_h, good_h.bfloat16()))


@pytest.mark.parametrize("lengths, error, match", [
    ([5, 5], ValueError, r"lengths has shape \(2,\), expected \(3,\)"),
    ([5, 0, 3], ValueError, "lengths must lie in 1..5"),
    ([5, 6, 3], ValueError, "lengths must lie in 1..5"),
    ([5, -1, 3], ValueError, "lengths must lie in 1..5"),
    ([5.0, 2.0, 3.0], TypeError, "lengths must be integers"),
    ([[5, 2, 3]], ValueError, "lengths has shape"),
])
def test_bad_lengths(model, lengths, error, match):
    with pytest.raises(error, match=match):
        model(np.zeros((5, 3, 4), np.float32), lengths=lengths)


def test_lengths_need_batched_input(model):
    with pytest.raises(ValueError, match="unbatched"):
        model(np.zeros((5, 4), np.float32), lengths=[5])


def test_state_dict_errors_leave_model_unchanged(model):
    sd = model.state_dict()
    bad = dict(sd)
    del bad["weight_hh_l1"]
    with pytest.raises(ValueError, match="missing keys \\['weight_hh_l1'\\]"):
        model.load_state_dict(bad)
    bad = dict(sd, extra=np.zeros(3))
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        model.load_state_dict(bad)
    model.load_state_dict(bad, strict=False)   # unexpected keys are fine when not strict
    bad = dict(sd)
    bad["weight_ih_l0"] = np.ones((24, 5), np.float32)
    bad["bias_ih_l0"] = np.full(24, 7.0, np.float32)
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l0'\] has shape \(24, 5\), expected \(24, 4\)"):
        model.load_state_dict(bad)
    assert not (model.state_dict()["bias_ih_l0"] == 7.0).any(), "a failed load must change nothing"
    bad = dict(sd, weight_ih_l0=sd["weight_ih_l0"].astype(np.int64))
    with pytest.raises(TypeError, match="weight_ih_l0"):
        model.load_state_dict(bad)
    with pytest.raises(TypeError, match="mapping"):
        model.load_state_dict([1, 2, 3])


def test_cell_errors():
    cell = lf.LSTMCell(3, 5)
    with pytest.raises(ValueError, match="x has 4 features, expected input_size=3"):
        cell(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"h has shape \(2, 4\), expected \(2, 5\)"):
        cell(np.zeros((2, 3), np.float32), (np.zeros((2, 4)), np.zeros((2, 5))))
    with pytest.raises(ValueError, match="must be 2-D"):
        cell(np.zeros((1, 2, 3), np.float32))


@pytest.mark.parametrize("value, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_bad_thread_counts(value, error):
    with pytest.raises(error, match="n_threads"):
        lf.set_num_threads(value)
    with pytest.raises(error, match="n_threads"):
        with lf.threads(value):
            pass


def test_thread_settings():
    before = lf.get_num_threads()
    with lf.threads(1):
        assert lf.get_num_threads() == 1
        with lf.threads(3):
            assert lf.get_num_threads() == 3
        assert lf.get_num_threads() == 1
    assert lf.get_num_threads() == before
    lf.set_num_threads(1)
    try:
        assert lf.get_num_threads() == 1
    finally:
        lf.set_num_threads(before)


def test_nan_and_inf_propagate_without_crash():
    m = lf.LSTM(3, 4, seed=0, dtype=np.float64)
    x = np.zeros((4, 2, 3))
    x[1, 0, 0] = np.nan
    x[2, 1, 1] = np.inf
    out, (h, c) = m(x)
    assert np.isnan(out[1:, 0]).all()          # NaN reaches every later step of sequence 0
    assert np.isfinite(out[:1, 0]).all()
    assert np.isfinite(out[:, 1]).all()          # an inf input saturates gates: finite outputs
    big = np.full((3, 1, 3), 1e30)
    out, _ = m(big)                             # huge but finite: saturated gates, no NaN
    assert np.isfinite(out).all()


def test_crash_prone_inputs_in_a_child_process():
    """Odd layouts and extreme sizes run in a child: a segfault fails this test, not the suite."""
    code = textwrap.dedent("""
        import numpy as np, lstm_fast as lf
        m = lf.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, seed=0)
        x = np.random.default_rng(0).standard_normal((7, 9, 3)).astype(np.float32)
        ref = m(x)[0]
        assert np.array_equal(m(np.asfortranarray(x))[0], ref)
        assert np.array_equal(m(x[::-1][::-1])[0], ref)
        m(x, lengths=np.array([7, 1, 1, 1, 1, 1, 1, 1, 1]))
        m(x[:1, :1])
        try:
            m(np.zeros((2**20, 2**12, 3), np.float32)[:, :, :0].reshape(2**20, 2**12, 0))
        except (ValueError, MemoryError):
            pass
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
