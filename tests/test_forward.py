"""Inference exactness: against torch.nn.LSTM, ONNX's reference evaluator and our numpy reference."""
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import lstm_fast as lf
from lstm_fast import reference

from conftest import tol

CONFIGS = [
    # (num_layers, bidirectional, proj_size)
    (1, False, 0),
    (1, True, 0),
    (2, False, 0),
    (2, True, 3),
    (3, True, 0),
    (3, False, 4),
]
CONFIG_IDS = [f"L{l}-{'bi' if b else 'uni'}-p{p}" for l, b, p in CONFIGS]


def _model_and_input(dtype, num_layers, bidirectional, proj_size, seq_len=9, batch=7,
                     input_size=5, hidden=8, seed=0, batch_first=False):
    m = lf.LSTM(input_size, hidden, num_layers=num_layers, bidirectional=bidirectional,
                proj_size=proj_size, dtype=dtype, seed=seed, batch_first=batch_first)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((seq_len, batch, input_size)).astype(dtype)
    return m, x


# ---------------------------------------------------------------------------- numpy reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("batch", [1, 7, 33], ids=["b1", "b7", "b33"])
@pytest.mark.parametrize("mode", [1, 2], ids=["chunked", "wide"])
def test_matches_numpy_reference(dtype, config, batch, mode):
    m, x = _model_and_input(dtype, *config, batch=batch)
    m._recurrence_mode = mode
    out, (h_n, c_n) = m(x)
    ref_out, (ref_h, ref_c) = reference.lstm(x.astype(np.float64), m.state_dict(),
                                             num_layers=config[0], bidirectional=config[1])
    assert_allclose(out, ref_out, **tol(dtype))
    assert_allclose(h_n, ref_h, **tol(dtype))
    assert_allclose(c_n, ref_c, **tol(dtype))
    assert out.dtype == dtype and out.flags.c_contiguous


@pytest.mark.parametrize("mode", [1, 2], ids=["chunked", "wide"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_lengths_match_numpy_reference(config, mode):
    m, x = _model_and_input(np.float64, *config, batch=11)
    m._recurrence_mode = mode
    lengths = np.array([9, 1, 4, 9, 2, 7, 7, 3, 5, 8, 6])
    rng = np.random.default_rng(3)
    L, D = config[0], 2 if config[1] else 1
    h0 = rng.standard_normal((L * D, 11, m.hidden_out))
    c0 = rng.standard_normal((L * D, 11, m.hidden_size))
    out, (h_n, c_n) = m(x, (h0, c0), lengths=lengths)
    ref_out, (ref_h, ref_c) = reference.lstm(x, m.state_dict(), L, config[1], h0, c0, lengths)
    assert_allclose(out, ref_out, **tol(np.float64))
    assert_allclose(h_n, ref_h, **tol(np.float64))
    assert_allclose(c_n, ref_c, **tol(np.float64))
    for b, n in enumerate(lengths):
        assert not out[n:, b].any(), "outputs past a sequence's length must be 0"


# ---------------------------------------------------------------------------- torch


def _torch():
    return pytest.importorskip("torch")


def _torch_lstm(m):
    torch = _torch()
    t = torch.nn.LSTM(m.input_size, m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                      batch_first=m.batch_first, bidirectional=m.bidirectional,
                      proj_size=m.proj_size)
    t = t.double() if m.dtype == np.float64 else t.float()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    return t.eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbi", "bti"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_matches_torch(dtype, config, batch_first, with_state):
    torch = _torch()
    m, x = _model_and_input(dtype, *config, batch_first=batch_first)
    if batch_first:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    t = _torch_lstm(m)
    args = ()
    if with_state:
        rng = np.random.default_rng(7)
        n_states = m.num_layers * m.num_directions
        h0 = rng.standard_normal((n_states, 7, m.hidden_out)).astype(dtype)
        c0 = rng.standard_normal((n_states, 7, m.hidden_size)).astype(dtype)
        args = ((h0, c0),)
    out, (h_n, c_n) = m(x, *args)
    with torch.no_grad():
        t_args = tuple((torch.from_numpy(a[0]), torch.from_numpy(a[1])) for a in args)
        t_out, (t_h, t_c) = t(torch.from_numpy(x), *t_args)
    assert_allclose(out, t_out.numpy(), **tol(dtype))
    assert_allclose(h_n, t_h.numpy(), **tol(dtype))
    assert_allclose(c_n, t_c.numpy(), **tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbi", "bti"])
def test_lengths_match_torch_packed(dtype, config, batch_first):
    torch = _torch()
    m, x = _model_and_input(dtype, *config, batch=10, batch_first=batch_first)
    lengths = np.array([3, 9, 1, 9, 5, 6, 2, 8, 4, 7])
    if batch_first:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    out, (h_n, c_n) = m(x, lengths=lengths)
    t = _torch_lstm(m)
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            torch.from_numpy(x), torch.from_numpy(lengths), batch_first=batch_first,
            enforce_sorted=False)
        t_packed, (t_h, t_c) = t(packed)
        t_out, _ = torch.nn.utils.rnn.pad_packed_sequence(t_packed, batch_first=batch_first,
                                                           total_length=9)
    assert_allclose(out, t_out.numpy(), **tol(dtype))
    assert_allclose(h_n, t_h.numpy(), **tol(dtype))
    assert_allclose(c_n, t_c.numpy(), **tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS[:4], ids=CONFIG_IDS[:4])
def test_unbatched_matches_torch(dtype, config):
    torch = _torch()
    m, x = _model_and_input(dtype, *config, batch=1)
    x2 = x[:, 0, :]
    n_states = m.num_layers * m.num_directions
    rng = np.random.default_rng(5)
    h0 = rng.standard_normal((n_states, m.hidden_out)).astype(dtype)
    c0 = rng.standard_normal((n_states, m.hidden_size)).astype(dtype)
    out, (h_n, c_n) = m(x2, (h0, c0))
    assert out.shape == (9, m.num_directions * m.hidden_out)
    assert h_n.shape == (n_states, m.hidden_out)
    with torch.no_grad():
        t_out, (t_h, t_c) = _torch_lstm(m)(torch.from_numpy(x2),
                                           (torch.from_numpy(h0), torch.from_numpy(c0)))
    assert_allclose(out, t_out.numpy(), **tol(dtype))
    assert_allclose(h_n, t_h.numpy(), **tol(dtype))
    assert_allclose(c_n, t_c.numpy(), **tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_state_dict_loads_unchanged(dtype, bias):
    """A state_dict exported from torch ({k: v.numpy()}) loads as is and gives torch's outputs."""
    torch = _torch()
    torch.manual_seed(0)
    t = torch.nn.LSTM(6, 10, num_layers=2, bias=bias, bidirectional=True)
    t = (t.double() if dtype == np.float64 else t).eval()
    m = lf.LSTM(6, 10, num_layers=2, bias=bias, bidirectional=True, dtype=dtype)
    m.load_state_dict({k: v.detach().numpy() for k, v in t.state_dict().items()})
    assert list(m.state_dict()) == list(t.state_dict())
    x = np.random.default_rng(0).standard_normal((12, 4, 6)).astype(dtype)
    with torch.no_grad():
        t_out, _ = t(torch.from_numpy(x))
    assert_allclose(m(x)[0], t_out.numpy(), **tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(), (6,), (40,)])
def test_cell_matches_torch(dtype, bias, shape):
    # up to 32 rows the step kernel (lf_gemv_rows / gemv), more the sequence kernel
    torch = _torch()
    cell = lf.LSTMCell(5, 9, bias=bias, dtype=dtype, seed=3)
    t = torch.nn.LSTMCell(5, 9, bias=bias)
    t = t.double() if dtype == np.float64 else t
    t.load_state_dict({k: torch.from_numpy(v) for k, v in cell.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape + (5,)).astype(dtype)
    h = rng.standard_normal(shape + (9,)).astype(dtype)
    c = rng.standard_normal(shape + (9,)).astype(dtype)
    h1, c1 = cell(x, (h, c))
    with torch.no_grad():
        th, tc = t(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)))
    assert h1.shape == shape + (9,)
    assert_allclose(h1, th.numpy(), **tol(dtype))
    assert_allclose(c1, tc.numpy(), **tol(dtype))
    h0, c0 = cell(x)   # zero state by default
    with torch.no_grad():
        th0, tc0 = t(torch.from_numpy(x))
    assert_allclose(h0, th0.numpy(), **tol(dtype))
    assert_allclose(c0, tc0.numpy(), **tol(dtype))


def test_cell_sees_its_parameters_change_after_a_call():
    # the cell's step plan holds pointers to its arrays: writes into parameters() and
    # load_state_dict() after the first call must reach the next one, and pickling drops it
    torch = _torch()
    cell = lf.LSTMCell(6, 10, seed=1)
    x = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    h_before = cell(x)[0].copy()
    cell.parameters()["bias_hh"][:] += 0.5
    cell.load_state_dict({**cell.state_dict(), "weight_ih": cell.state_dict()["weight_ih"] * 2})
    t = torch.nn.LSTMCell(6, 10)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in cell.state_dict().items()})
    with torch.no_grad():
        th, tc = t(torch.from_numpy(x))
    h, c = cell(x)
    assert not np.allclose(h, h_before)
    assert_allclose(h, th.numpy(), **tol(np.float32))
    assert_allclose(c, tc.numpy(), **tol(np.float32))
    copy = pickle.loads(pickle.dumps(cell))
    assert_array_equal(copy(x)[0], h)


def test_initialisation_matches_torch_bounds():
    m = lf.LSTM(3, 16, num_layers=2, bidirectional=True, proj_size=4, seed=0)
    sd = m.state_dict()
    torch = _torch()
    t = torch.nn.LSTM(3, 16, num_layers=2, bidirectional=True, proj_size=4)
    assert {k: v.shape for k, v in sd.items()} == {k: tuple(v.shape) for k, v in t.state_dict().items()}
    bound = 1 / np.sqrt(16)
    for name, value in sd.items():
        assert np.abs(value).max() <= bound, name
        assert np.abs(value).max() > 0.8 * bound, name   # really spread over the interval
    assert not np.array_equal(sd["weight_ih_l0"][:16], sd["weight_ih_l0"][16:32])


# ---------------------------------------------------------------------------- ONNX reference
def _onnx_lstm(x, m, h0=None, c0=None):
    """Run m's single layer through onnx.reference's LSTM operator (written by ONNX, not us)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    sd, H, D = m.state_dict(), m.hidden_size, m.num_directions
    to_onnx = [0, 3, 1, 2]   # torch gate blocks i,f,g,o -> ONNX i,o,f,c

    def reorder(w):
        return np.concatenate([w.reshape(4, H, -1)[q] for q in to_onnx]).reshape(w.shape)

    names = ["_l0", "_l0_reverse"][:D]
    W = np.stack([reorder(sd["weight_ih" + n]) for n in names])
    R = np.stack([reorder(sd["weight_hh" + n]) for n in names])
    B = np.stack([np.concatenate([reorder(sd["bias_ih" + n]), reorder(sd["bias_hh" + n])]) for n in names])
    elem = TensorProto.DOUBLE if x.dtype == np.float64 else TensorProto.FLOAT
    inputs = ["X", "W", "R", "B", "", "initial_h", "initial_c"] if h0 is not None else ["X", "W", "R", "B"]
    node = helper.make_node("LSTM", inputs, ["Y", "Y_h", "Y_c"], hidden_size=H,
                            direction="bidirectional" if D == 2 else "forward")
    graph_inputs = [helper.make_tensor_value_info(n, elem, None) for n in inputs if n]
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(n, elem, None) for n in ("Y", "Y_h", "Y_c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    feeds = {"X": x, "W": W, "R": R, "B": B}
    if h0 is not None:
        feeds.update(initial_h=h0, initial_c=c0)
    return ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_onnx_reference(dtype, bidirectional, with_state):
    m, x = _model_and_input(dtype, 1, bidirectional, 0, batch=6)
    D = m.num_directions
    h0 = c0 = None
    if with_state:
        rng = np.random.default_rng(11)
        h0 = rng.standard_normal((D, 6, 8)).astype(dtype)
        c0 = rng.standard_normal((D, 6, 8)).astype(dtype)
    Y, Y_h, Y_c = _onnx_lstm(x, m, h0, c0)
    out, (h_n, c_n) = m(x, None if h0 is None else (h0, c0))
    # ONNX Y is (T, D, B, H); ours concatenates the directions on the feature axis
    assert_allclose(out, Y.transpose(0, 2, 1, 3).reshape(out.shape), **tol(dtype))
    assert_allclose(h_n, Y_h, **tol(dtype))
    assert_allclose(c_n, Y_c, **tol(dtype))


# ---------------------------------------------------------------------------- threads and layouts
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["auto", "chunked", "wide"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch, hidden", [(1, 8), (7, 33), (64, 40), (70, 16)], ids=["one", "odd", "mid", "chunks"])
@pytest.mark.parametrize("config", [(1, True, 0), (2, False, 3)], ids=["bi", "proj"])
def test_thread_count_does_not_change_bits(mode, dtype, batch, hidden, config):
    m = lf.LSTM(6, hidden, num_layers=config[0], bidirectional=config[1], proj_size=config[2],
                dtype=dtype, seed=2)
    m._recurrence_mode = mode
    x = np.random.default_rng(4).standard_normal((13, batch, 6)).astype(dtype)
    lengths = np.random.default_rng(5).integers(1, 14, size=batch)
    results = []
    for n in (1, 2, 3):
        with lf.threads(n):
            results.append((m(x), m(x, lengths=lengths)))
    for other in results[1:]:
        for (o1, (h1, c1)), (o2, (h2, c2)) in zip(results[0], other):
            assert_array_equal(o1, o2)
            assert_array_equal(h1, h2)
            assert_array_equal(c1, c2)


def test_layouts_give_the_same_result():
    m = lf.LSTM(4, 6, bidirectional=True, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3, 4))
    expected = m(x)[0]
    assert_array_equal(m(np.asfortranarray(x))[0], expected)
    strided = np.zeros((10, 3, 8))
    strided[::2, :, ::2] = x
    assert_array_equal(m(strided[::2, :, ::2])[0], expected)
    ro = x.copy()
    ro.flags.writeable = False
    assert_array_equal(m(ro)[0], expected)
    assert_array_equal(m(x[::-1].copy()[::-1])[0], expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS + [(3, True, 0)], ids=CONFIG_IDS + ["L3-bi-p0"])
@pytest.mark.parametrize("batch", [1, 7], ids=["b1", "b7"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["auto", "chunked", "wide"])
def test_plain_call_gives_the_general_path_bits(dtype, config, batch, mode):
    # m(x) with no states or lengths runs forward_plain (one Cython call for every layer); given
    # full lengths or zero states, the same model takes the general path (validation, one
    # forward_layer call per layer): the same operations, so the same bits. Each layer's input
    # is the previous layer's fresh output, so layers >= 2 check it is held while it is read.
    m, x = _model_and_input(dtype, *config, seq_len=23, batch=batch, hidden=40)
    m._recurrence_mode = mode
    n_states = m.num_layers * m.num_directions
    zeros = (np.zeros((n_states, batch, m.hidden_out), dtype), np.zeros((n_states, batch, m.hidden_size), dtype))
    out, (h_n, c_n) = m(x)
    for general in (m(x, lengths=[x.shape[0]] * batch), m(x, zeros)):
        assert_array_equal(out, general[0])
        assert_array_equal(h_n, general[1][0])
        assert_array_equal(c_n, general[1][1])
    assert out.shape == (23, batch, m.num_directions * m.hidden_out) and out.dtype == dtype
    assert h_n.shape == (n_states, batch, m.hidden_out) and c_n.shape == (n_states, batch, m.hidden_size)
    ref_out, (ref_h, ref_c) = reference.lstm(x.astype(np.float64), m.state_dict(),
                                             num_layers=config[0], bidirectional=config[1])
    assert_allclose(out, ref_out, **tol(dtype))
    assert_allclose(c_n, ref_c, **tol(dtype))


def test_plain_call_leaves_other_inputs_to_the_general_path():
    # forward_plain takes only C-contiguous (T, B, I) ndarrays of the model's dtype; everything
    # else is converted or refused by the general path exactly as before
    m = lf.LSTM(4, 6, num_layers=2, dtype=np.float32, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
    expected, (h_n, c_n) = m(x)

    class Sub(np.ndarray):
        pass

    for other in (x.astype(np.float64), x.tolist(), x.view(Sub), np.asfortranarray(x)):
        got, (got_h, got_c) = m(other)
        assert type(got) is np.ndarray
        assert_array_equal(got, expected)
        assert_array_equal(got_c, c_n)
    from lstm_fast import _forward
    if _forward.packed_gemm_active():
        # a row's bits do not depend on its batch with the packed kernels (one FMA chain each)
        assert_array_equal(m(x[:, 1])[0], expected[:, 1])               # unbatched (T, I)
    else:
        # BLAS (LSTM_FAST_ISA=generic, CPUs with neither AVX-512 nor AVX2): gemv for one row,
        # gemm for a batch, whose sums may round differently
        assert_allclose(m(x[:, 1])[0], expected[:, 1], **tol(np.float32))
    with pytest.raises(ValueError, match="features"):
        m(np.zeros((5, 3, 3), np.float32))
    with pytest.raises(ValueError, match="0 time steps"):
        m(np.zeros((0, 3, 4), np.float32))
    with pytest.raises(ValueError, match="batch of 0"):
        m(np.zeros((5, 0, 4), np.float32))
    with pytest.raises(TypeError):
        m(x.astype(np.int32))
    bf = lf.LSTM(4, 6, num_layers=2, dtype=np.float32, seed=0, batch_first=True)
    assert_array_equal(bf(np.ascontiguousarray(x.transpose(1, 0, 2)))[0], expected.transpose(1, 0, 2))


def test_float_inputs_are_cast_to_model_dtype():
    m = lf.LSTM(4, 6, dtype=np.float32, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3, 4))
    out64, _ = m(x)
    out32, _ = m(x.astype(np.float32))
    assert out64.dtype == np.float32
    assert_array_equal(out64, out32)


def test_state_dict_round_trip():
    a = lf.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, seed=1)
    b = lf.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, seed=2)
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
    assert not np.array_equal(a(x)[0], b(x)[0])
    b.load_state_dict(a.state_dict())
    assert_array_equal(a(x)[0], b(x)[0])
    for k, v in a.state_dict().items():
        assert_array_equal(b.state_dict()[k], v)


def test_parameters_are_live_views():
    m = lf.LSTM(3, 4, seed=0, dtype=np.float64)
    x = np.ones((2, 1, 3))
    before = m(x)[0]
    m.parameters()["bias_ih_l0"][:] += 1.0
    after = m(x)[0]
    assert not np.allclose(before, after)
    ref, _ = reference.lstm(x, m.state_dict())
    assert_allclose(after, ref, **tol(np.float64))


def test_inputs_are_not_modified():
    m = lf.LSTM(3, 4, num_layers=2, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    h0 = np.ones((2, 2, 4), np.float32)
    c0 = np.ones((2, 2, 4), np.float32)
    copies = [a.copy() for a in (x, h0, c0)]
    m(x, (h0, c0))
    for a, b in zip((x, h0, c0), copies):
        assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_wide_mode_on_large_hidden_matches_torch(dtype, packed):
    """With BLAS products a W_hh beyond L2 takes the wide path, with the packed kernel a single
    batch chunk of a large W_hh does; both checked against torch."""
    torch = _torch()
    from lstm_fast import _forward
    if packed:
        # the threshold is derived from this CPU's L2: a hidden size whose W_hh (with proj 200)
        # is just past it
        settings = _forward.kernel_settings()
        limit, itemsize = settings["packed_wide_bytes"], np.dtype(dtype).itemsize
        hidden = max(300, -(-limit // (4 * 200 * itemsize)) + 1)
        # ... and short of the size from which even two work items take one pass a step
        assert 4 * hidden * 200 * itemsize < settings["packed_wide_max_bytes"]
        assert _forward.recurrence_mode(5, hidden, 200, np.dtype(dtype).itemsize, True, 2) == "chunked"
        assert _forward.recurrence_mode(5, hidden, 200, np.dtype(dtype).itemsize, True, 1) == "wide"
        m = lf.LSTM(24, hidden, proj_size=200, dtype=dtype, seed=0)
    else:
        assert _forward.recurrence_mode(5, 300, 200, np.dtype(dtype).itemsize) == "wide"
        m = lf.LSTM(24, 300, bidirectional=True, proj_size=200, dtype=dtype, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 5, 24)).astype(dtype)
    lengths = np.array([6, 2, 5, 6, 1])
    out, (h_n, c_n) = m(x, lengths=lengths)
    t = _torch_lstm(m)
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                                         enforce_sorted=False)
        t_packed, (t_h, t_c) = t(packed)
        t_out, _ = torch.nn.utils.rnn.pad_packed_sequence(t_packed, total_length=6)
    assert_allclose(out, t_out.numpy(), **tol(dtype))
    assert_allclose(h_n, t_h.numpy(), **tol(dtype))
    assert_allclose(c_n, t_c.numpy(), **tol(dtype))


# ---------------------------------------------------------------------------- packed float32 GEMM
# lf_pgemm.h runs the float32 products where the CPU has AVX-512; these tests check both paths.
@pytest.mark.parametrize("mode", [1, 2], ids=["chunked", "wide"])
@pytest.mark.parametrize("shape", [
    # (input, hidden, proj, batch): 4H and P off the 32-column panels, row tiles of 8 and their
    # remainders, one-column inputs, and K beyond one tile's unrolling
    (1, 5, 0, 1), (3, 5, 3, 9), (33, 17, 0, 17), (7, 40, 0, 2), (70, 9, 5, 16), (2, 64, 33, 8),
])
def test_packed_and_blas_paths_match_the_reference(packed, mode, shape):
    input_size, hidden, proj, batch = shape
    m = lf.LSTM(input_size, hidden, num_layers=2, bidirectional=True, proj_size=proj,
                dtype=np.float32, seed=4)
    m._recurrence_mode = mode
    x = np.random.default_rng(5).standard_normal((6, batch, input_size)).astype(np.float32)
    lengths = np.random.default_rng(6).integers(0, 7, size=batch)
    out, (h_n, c_n) = m(x, lengths=lengths)
    ref_out, (ref_h, ref_c) = reference.lstm(x.astype(np.float64), m.state_dict(), 2, True,
                                             lengths=lengths)
    assert_allclose(out, ref_out, **tol(np.float32))
    assert_allclose(h_n, ref_h, **tol(np.float32))
    assert_allclose(c_n, ref_c, **tol(np.float32))


@pytest.mark.parametrize("mode", [1, 2], ids=["chunked", "wide"])
def test_packed_rows_do_not_depend_on_their_batch(mode):
    # every output of lf_pgemm/lf_pgemv is one FMA chain over k in order, whichever row tile holds
    # it: a sequence alone gives the same bits as inside a batch of 11 (tile of 8 + remainder 3)
    from lstm_fast import _forward
    if not _forward.packed_gemm_active():
        pytest.skip("the packed kernel needs AVX-512F")
    m = lf.LSTM(12, 40, proj_size=20, dtype=np.float32, seed=1)
    m._recurrence_mode = mode
    x = np.random.default_rng(2).standard_normal((5, 11, 12)).astype(np.float32)
    whole, _ = m(x)
    for b in (0, 8, 10):
        alone, _ = m(x[:, b:b + 1])
        assert_array_equal(alone[:, 0], whole[:, b])


@pytest.mark.parametrize("shape", [(100, 32, 128), (41, 128, 96), (30, 300, 96), (19, 8, 160),
                                   (100, 32, 64), (41, 20, 64)])
def test_batch1_interleaved_projection_gives_the_up_front_bits(shape):
    # batch 1, W_hh beyond L1: each step projects an eighth of the next 8 steps' inputs inside its
    # W_hh product (_gates_interleaved); wide mode, and chunked mode with the interleaving off,
    # project all inputs up front with the same sums. Lengths cover a lone short block, one block,
    # blocks projected in steps and short tails; I=300 > H runs tile work past the row product.
    from lstm_fast import _forward
    if not _forward.packed_gemm_active():
        pytest.skip("the interleaved projection needs the packed kernel (AVX-512F)")
    T, I, H = shape
    m = lf.LSTM(I, H, num_layers=2, bidirectional=True, dtype=np.float32, seed=7)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((T, 1, I)).astype(np.float32)
    hx = (rng.standard_normal((4, 1, H)).astype(np.float32), rng.standard_normal((4, 1, H)).astype(np.float32))

    def run(model, mode, interleave, length, h0, inputs=x):
        _forward.set_interleaved_projection(interleave)
        try:
            model._recurrence_mode = mode
            return model(inputs, h0, lengths=[length])
        finally:
            _forward.set_interleaved_projection(True)

    def run_clobbered(model, length, h0):
        # the projection buffer is kept between calls: fill it with other inputs' values first,
        # so that a projection the interleaved steps skip cannot read the right ones by chance
        run(model, 2, False, length, h0, inputs=-x)
        return run(model, 3 if model is one else 1, True, length, h0)

    one = lf.LSTM(I, H, dtype=np.float32, seed=9)
    for length in [n for n in (1, 7, 8, 15, 16, 17, 24, 33) if n < T] + [T]:
        got = run_clobbered(m, length, hx)
        for want in (run(m, 2, True, length, hx), run(m, 1, False, length, hx)):
            assert_array_equal(got[0], want[0], err_msg=f"length {length}")
            assert_array_equal(got[1][0], want[1][0])
            assert_array_equal(got[1][1], want[1][1])
    ref_out, (ref_h, ref_c) = reference.lstm(x.astype(np.float64), m.state_dict(), 2, True, hx[0], hx[1])
    out, (h_n, c_n) = got                    # chunked at full length
    assert_allclose(out, ref_out, **tol(np.float32))
    assert_allclose(c_n, ref_c, **tol(np.float32))
    # split mode on two threads: each thread projects its own units' gate columns
    with lf.threads(2):
        for length in (5, 17, T):
            got = run_clobbered(one, length, None)
            want = run(one, 2, True, length, None)
            assert_array_equal(got[0], want[0], err_msg=f"split, length {length}")
            assert_array_equal(got[1][1], want[1][1])


def test_batch1_random_configurations_give_one_set_of_bits():
    # batch 1 runs the most paths (interleaved projection, split mode with per-thread packing,
    # chunked, wide): random sizes, projections, layers, directions and lengths must give the
    # same bits in every mode and thread count as wide mode with every input projected up front,
    # and match the float64 reference
    from lstm_fast import _forward
    rng = np.random.default_rng(11)
    for trial in range(40):
        H = int(rng.choice([32, 64, 96, 128, 160, 192]))
        I = int(rng.integers(1, 300))
        P = int(rng.choice([0, 0, 0, 16, 40]))
        L, bi, T = int(rng.integers(1, 3)), bool(rng.integers(0, 2)), int(rng.integers(1, 60))
        m = lf.LSTM(I, H, num_layers=L, bidirectional=bi, proj_size=P if P < H else 0,
                    dtype=np.float32, seed=trial)
        x = rng.standard_normal((T, 1, I)).astype(np.float32)
        length = [int(rng.integers(1, T + 1))]
        _forward.set_interleaved_projection(False)
        try:
            m._recurrence_mode = 2
            want, (want_h, want_c) = m(x, lengths=length)
        finally:
            _forward.set_interleaved_projection(True)
        one_thread = {}
        for n_threads in (1, 2):
            with lf.threads(n_threads):
                for mode in (0, 1, 3):
                    m._recurrence_mode = mode
                    out, (h_n, c_n) = m(x, lengths=length)
                    where = f"trial {trial}: H={H} I={I} L={L} bi={bi} T={T} {n_threads} threads mode {mode}"
                    if _forward.packed_gemm_active():
                        assert_array_equal(out, want, err_msg=where)
                        assert_array_equal(h_n, want_h, err_msg=where)
                        assert_array_equal(c_n, want_c, err_msg=where)
                    else:
                        # BLAS path (LSTM_FAST_ISA=generic): a mode's own products (gemv, or
                        # axpys over W_hh.T for small batch-1 steps) round their own way; the
                        # thread count still never changes a bit
                        assert_allclose(out, want, err_msg=where, **tol(np.float32))
                        if n_threads == 1:
                            one_thread[mode] = (out, c_n)
                        else:
                            assert_array_equal(out, one_thread[mode][0], err_msg=where)
                            assert_array_equal(c_n, one_thread[mode][1], err_msg=where)
        ref_out, _ = reference.lstm(x.astype(np.float64), m.state_dict(), L, bi,
                                    lengths=np.array(length))
        assert_allclose(want, ref_out, **tol(np.float32))


def test_split_choice_follows_the_measured_speed():
    # auto mode picks split mode or one thread per shape from the measured ticks per step of each
    # (lf_split_choose): a run of 8 calls of each way first (one thread, then split), then the faster, with a run of 8 calls
    # of the other way (only the last 4 measured) from call 56 (a first choice confirmed early),
    # then every 512 calls times the measured ratio of the slower way to the faster
    from lstm_fast import _forward
    n = 4000
    split = [100] * n                       # split twice as fast as one thread ...
    one = [200] * n
    for i in range(2000, n):                # ... then twice as slow (a busy machine)
        split[i] = 400
    ways = _forward.split_choice_trace(123457, split, one)
    assert ways[:16] == [0] * 8 + [1] * 8
    assert sum(ways[16:2000]) / len(ways[16:2000]) > 0.95       # mostly split
    # runs exploring one thread, about 2 x 512 calls apart (one thread measured 2x slower; the
    # chooser's ticks per step round up by one tick)
    runs = [i for i in range(16, 2000) if ways[i] == 0]
    assert runs[:8] == list(range(56, 64))
    assert len(runs) == 16 and runs[8:] == list(range(runs[8], runs[8] + 8))
    assert 1000 <= runs[8] - runs[0] <= 1024
    assert sum(ways[2100:]) / len(ways[2100:]) < 0.05          # switched to one thread
    assert sum(ways[2100:3100]) == 8                           # and explores split
    # a shape where one thread is slightly faster from the start runs on one thread
    ways = _forward.split_choice_trace(987653, [100] * 600, [90] * 600)
    assert sum(ways[16:]) / 584 < 0.1
    # a call after a pause (sleeping threads to wake) is measured apart from back-to-back calls:
    # one very slow call there leaves split mode chosen for the calls that follow it
    import time
    _forward.split_choice_trace(555557, [100] * 200, [200] * 200)
    time.sleep(0.05)
    ways = _forward.split_choice_trace(555557, [10 ** 6] + [100] * 40, [200] * 41)
    assert ways[1:41] == [1] * 40     # (the call after the pause starts its regime's run)


def test_split_choice_outlasts_one_slow_call_but_not_a_slowdown():
    # each measured call counts at most twice the average so far: one split call 10x its pace (a
    # guest's vCPU taken away for a moment) leaves split mode chosen, where counted whole it
    # lifted the average past one thread's for the next ~1200 calls; a lasting slowdown still
    # turns the choice within three calls
    from lstm_fast import _forward
    n = 1200
    split = [100] * n
    split[300] = 1000
    for i in range(600, n):
        split[i] = 1000
    ways = _forward.split_choice_trace(919193, split, [150] * n)
    assert ways[64:300] == [1] * 236
    assert ways[300:600] == [1] * 300
    assert ways[603:700] == [0] * 97
    assert sum(ways[700:]) <= 8                # at most one exploring run of split mode


def test_split_choice_corrects_a_first_choice_made_in_a_transient():
    # split mode measured slow in its first run only (the other vCPU busy for those calls):
    # the early run of the other way, calls 56-63, finds it faster and the shape takes it from
    # then on, instead of some 1000 calls later
    from lstm_fast import _forward
    n = 200
    split = [400] * 16 + [100] * (n - 16)
    ways = _forward.split_choice_trace(272727, split, [200] * n)
    assert ways[:16] == [0] * 8 + [1] * 8
    assert ways[16:56] == [0] * 40            # one thread, as first measured
    assert ways[56:64] == [1] * 8             # the confirming run
    assert ways[64:] == [1] * (n - 64)        # split mode, measured faster


def test_split_choice_explores_a_much_slower_way_rarely():
    # exploring costs 8 calls of the other way: where it is 40x slower (split mode with a core
    # busy), runs come 40 x 512 calls apart, so that they cost ~1.6 % of the calls' time as at a
    # ratio of 1, instead of the 60 % of a run every 512 calls
    from lstm_fast import _forward
    n = 21000
    ways = _forward.split_choice_trace(313133, [4000] * n, [100] * n)
    assert ways[:16] == [0] * 8 + [1] * 8
    runs = [i for i in range(16, n) if ways[i] == 1]
    assert runs[:8] == list(range(56, 64))                    # the first run, as for any ratio
    assert len(runs) == 16 and runs[8:] == list(range(runs[8], runs[8] + 8))
    assert 39 * 512 <= runs[8] - runs[0] <= 40 * 512          # then none for ~40 x 512 calls


def test_split_budget_is_twice_one_threads_pace_in_the_calls_regime():
    # a split call past twice one thread's measured ticks a step (in its own regime: back to back
    # or after a pause) finishes on one thread; no budget before one thread was measured, and
    # none for a call that runs on one thread anyway
    from lstm_fast import _forward
    key = 646463
    assert _forward.split_budget_of(key, 1) == 0                    # shape not seen yet
    _forward.split_choice_trace(key, [100] * 40, [300] * 40)         # back to back: one 300 ticks
    assert _forward.split_budget_of(key, 1) == 2 * 301              # (ticks a step round up by 1)
    assert _forward.split_budget_of(key, 0) == 0                    # a one-thread call
    assert _forward.split_budget_of(key, 1 | 4) == 0                # no paused call measured yet


def test_split_choice_after_pauses_is_measured_on_its_own():
    # calls spaced by pauses (a server's sporadic requests) pay for waking the threads, which
    # back-to-back calls never do: they are measured and chosen apart, so that split mode, 20x
    # slower after each pause, loses there while it keeps winning back to back
    from lstm_fast import _forward
    key = 777773
    _forward.split_choice_trace(key, [100] * 70, [200] * 70)         # back to back: split
    paused = _forward.split_choice_trace(key, [4000] * 30, [200] * 30, pause=0.003)
    assert paused[:8] == [0] * 8 and paused[8:16] == [1] * 8          # a run of each way
    assert paused[16:] == [0] * 14                                   # then one thread
    assert _forward.split_choice_trace(key, [100] * 20, [200] * 20)[1:] == [1] * 19
    # where back-to-back calls measured split mode slower, calls after pauses (which add the
    # threads' waking to it) run on one thread without trying split mode
    key = 777781
    _forward.split_choice_trace(key, [400] * 40, [200] * 40)         # back to back: one thread
    assert _forward.split_choice_trace(key, [100] * 20, [200] * 20, pause=0.003) == [0] * 20


def test_split_choice_measures_calls_longer_than_the_idle_threshold():
    # calls of 3 ms (past the chooser's ~1 ms pause threshold, as when a busy core slows split
    # mode down) are still measured: the pause counts from the end of the last call
    # (lf_split_ended), so that the choice follows split mode becoming slower
    from lstm_fast import _forward
    n = 60
    ways = _forward.split_choice_trace(424243, [400] * n, [100] * n, hold=0.003)
    assert ways[8:16] == [1] * 8
    assert ways[24:56] == [0] * 32          # one thread, measured faster
    assert ways[56:] == [1] * (n - 56)      # the early run confirming the first choice


def flat(res):
    out, (h, c) = res
    return [out, h, c]


@pytest.mark.parametrize("shape", [(40, 1, 32, 64), (30, 1, 128, 128), (25, 3, 16, 96), (12, 5, 8, 256)])
def test_split_mode_gives_the_chunked_bits(shape):
    # split mode shares each step's 32-unit panels between the threads and meets at a spin barrier;
    # every value must be the one chunked mode computes on one thread, lengths and states included
    from lstm_fast import _forward
    if not _forward.packed_gemm_active():
        pytest.skip("split mode needs the packed kernel (AVX-512F)")
    T, B, I, H = shape
    m = lf.LSTM(I, H, dtype=np.float32, seed=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    hx = (rng.standard_normal((1, B, H)).astype(np.float32), rng.standard_normal((1, B, H)).astype(np.float32))
    lengths = rng.integers(1, T + 1, size=B)
    with lf.threads(1):
        m._recurrence_mode = 1
        ref_out, (ref_h, ref_c) = m(x, hx, lengths=lengths)
        ref_full = m(x, hx)
        _, _, ref_cache = m.forward_train(x, hx, lengths=lengths)
        ref_grads = m.backward(ref_cache, np.ones_like(ref_out))
    with lf.threads(2):
        for mode in (3, 0):              # forced, and what the shapes pick with two threads
            m._recurrence_mode = mode
            out, (h_n, c_n) = m(x, hx, lengths=lengths)
            assert_array_equal(out, ref_out)
            assert_array_equal(h_n, ref_h)
            assert_array_equal(c_n, ref_c)
        # the calling thread runs the first steps alone while the others wake (here forced: 1
        # to 13 steps, or all), packing every panel itself; the team shares the units from the
        # next step on, and (budget of one tick) hands them back to the calling thread a step
        # later: the same bits, live and frozen (prepacked). A call on other inputs first leaves
        # its projections in the kept buffers, so that a block's projection left unfinished
        # where the way changes mid-block (batch 1: interleaved) shows.
        frozen = m.freeze()
        x_other = rng.standard_normal((T, B, I)).astype(np.float32)
        for model in (m, frozen):
            model._recurrence_mode = 3
            for alone in (0, 1, 5, 8, 9, 13, T + 5):
                for budget in (0, 1):
                    model(x_other, hx)
                    _forward.set_split_alone(alone)
                    _forward.set_split_budget(budget)
                    try:
                        out, (h_n, c_n) = model(x, hx, lengths=lengths)
                        model(x_other, hx)
                        full = model(x, hx)
                    finally:
                        _forward.set_split_alone(0)
                        _forward.set_split_budget(0)
                    assert_array_equal(out, ref_out, err_msg=str((alone, budget)))
                    assert_array_equal(h_n, ref_h)
                    assert_array_equal(c_n, ref_c)
                    for got, want in zip(flat(full), flat(ref_full)):
                        assert_array_equal(got, want, err_msg=str((alone, budget)))
        # split mode past its budget (one tick a step: after its first step) hands the steps
        # left to the calling thread: the same bits
        m._recurrence_mode = 3
        _forward.set_split_budget(1)
        try:
            out, (h_n, c_n) = m(x, hx, lengths=lengths)
        finally:
            _forward.set_split_budget(0)
        assert_array_equal(out, ref_out)
        assert_array_equal(h_n, ref_h)
        assert_array_equal(c_n, ref_c)
        m._recurrence_mode = 3
        _, _, cache = m.forward_train(x, hx, lengths=lengths)
        grads = m.backward(cache, np.ones_like(ref_out))
        from lstm_fast import _backward     # and stopped after its first step (its budget)
        _backward.set_split_budget(1)
        try:
            stopped = m.backward(cache, np.ones_like(ref_out))
        finally:
            _backward.set_split_budget(0)
        late = []                           # the team joining after 1, 4 or all steps
        for alone in (1, 4, T + 5):
            _backward.set_split_alone(alone)
            try:
                late.append(m.backward(cache, np.ones_like(ref_out)))
            finally:
                _backward.set_split_alone(0)
    for got in [grads, stopped] + late:            # backward's split mode: the same bits too
        for name, value in ref_grads.params.items():
            assert_array_equal(got.params[name], value, err_msg=name)
        assert_array_equal(got.input, ref_grads.input)
        assert_array_equal(got.hx[0], ref_grads.hx[0])
        assert_array_equal(got.hx[1], ref_grads.hx[1])
    ref_out64, _ = reference.lstm(x.astype(np.float64), m.state_dict(), 1, False,
                                  h0=hx[0].astype(np.float64), c0=hx[1].astype(np.float64), lengths=lengths)
    assert_allclose(out, ref_out64, **tol(np.float32))


# ---------------------------------------------------------------------------- frozen models
FROZEN_SHAPES = [
    # (num_layers, bidirectional, proj_size, input_size, hidden, batch): interleaved batch 1
    # (H=128, and H=64 with I <= 32), split-capable batch 3, batched, projection, stacks
    (1, False, 0, 20, 128, 1),
    (1, False, 0, 16, 64, 1),
    (1, False, 0, 12, 64, 3),
    (2, True, 0, 9, 40, 7),
    (2, False, 5, 9, 32, 1),
    (3, True, 3, 6, 8, 33),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", FROZEN_SHAPES, ids=[str(s) for s in FROZEN_SHAPES])
@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["auto", "chunked", "wide", "split"])
def test_frozen_model_gives_the_same_bits(dtype, shape, mode):
    # a frozen model reads its weights packed once (float32, packed kernel); every call path
    # (plain, states, lengths, unbatched, batch_first, step) gives the source model's bits
    layers, bi, proj, I, H, B = shape
    m = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, proj_size=proj, dtype=dtype, seed=3)
    m._recurrence_mode = mode
    f = m.freeze()
    assert isinstance(f, lf.FrozenLSTM) and isinstance(f, lf.LSTM)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((21, B, I)).astype(dtype)
    n_states = layers * (2 if bi else 1)
    hx = (rng.standard_normal((n_states, B, m.hidden_out)).astype(dtype),
          rng.standard_normal((n_states, B, H)).astype(dtype))
    lengths = rng.integers(1, 22, size=B)
    for n_threads in (1, 2):
        with lf.threads(n_threads):
            for args, kwargs in (((x,), {}), ((x, hx), {}), ((x,), {"lengths": lengths}),
                                 ((x[:, 0],), {})):
                want, (want_h, want_c) = m(*args, **kwargs)
                got, (got_h, got_c) = f(*args, **kwargs)
                assert_array_equal(got, want)
                assert_array_equal(got_h, want_h)
                assert_array_equal(got_c, want_c)
    if not bi:
        state = m.zero_state(B)
        got = f.step(x[0], state)[0]
        if f.kernel_path != "blas":
            # float32 on the packed kernel: the frozen step multiplies the packed weights as the
            # sequence kernel does (the bits of the call), the live model's step its unpacked rows
            assert_array_equal(got, m(x[:1])[0][0])
            assert_allclose(got, m.step(x[0], state)[0], **tol(dtype))
        else:
            assert_array_equal(got, m.step(x[0], state)[0])
    ref_out, (_, ref_c) = reference.lstm(x.astype(np.float64), m.state_dict(), num_layers=layers,
                                         bidirectional=bi)
    out, (_, c_n) = f(x)
    assert_allclose(out, ref_out, **tol(dtype))
    assert_allclose(c_n, ref_c, **tol(dtype))
    if mode == 0:                                   # and torch.nn.LSTM with the same weights
        torch = _torch()
        with torch.no_grad():
            t_out, (_, t_c) = _torch_lstm(f)(torch.from_numpy(x))
        assert_allclose(out, t_out.numpy(), **tol(dtype))
        assert_allclose(c_n, t_c.numpy(), **tol(dtype))


@pytest.mark.parametrize("shape", FROZEN_SHAPES, ids=[str(s) for s in FROZEN_SHAPES])
@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["auto", "chunked", "wide", "split"])
def test_frozen_model_reads_the_weights_it_packed(shape, mode):
    # Rewrite a frozen model's arrays behind its back: with the packed kernel its products read
    # only the copy packed when it was frozen, so its outputs stay those of the old weights on
    # every path. (Were any path to read the arrays or to pack anew, it would see the new ones.)
    from lstm_fast import _forward
    if not _forward.packed_gemm_active():
        pytest.skip("the packed kernel needs AVX-512F")
    layers, bi, proj, I, H, B = shape
    m = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, proj_size=proj, dtype=np.float32, seed=3)
    m._recurrence_mode = mode
    f = m.freeze()
    assert f._packed is not None and len(f._packed) == layers
    x = np.random.default_rng(12).standard_normal((21, B, I)).astype(np.float32)
    lengths = np.random.default_rng(13).integers(1, 22, size=B)
    want = [m(x), m(x, lengths=lengths)]
    weights = f._w_ih + f._w_hh + (f._w_hr or [])
    for w in weights:
        w.flags.writeable = True
        w *= -0.5
    other = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, proj_size=proj, seed=0)
    other.load_state_dict(f.state_dict())
    assert not np.allclose(other(x)[0], want[0][0])           # the arrays did change
    with lf.threads(2):
        for (w_out, (w_h, w_c)), (g_out, (g_h, g_c)) in zip(want, [f(x), f(x, lengths=lengths)]):
            assert_array_equal(g_out, w_out)
            assert_array_equal(g_h, w_h)
            assert_array_equal(g_c, w_c)


def test_frozen_model_is_a_fixed_copy():
    m = lf.LSTM(6, 32, num_layers=2, proj_size=4, dtype=np.float32, seed=0)
    x = np.random.default_rng(0).standard_normal((17, 1, 6)).astype(np.float32)
    f = m.freeze()
    before = f(x)[0]
    m.parameters()["weight_hh_l0"][...] *= 2          # the source model changes ...
    m.reset_parameters(5)
    assert_array_equal(f(x)[0], before)                # ... its frozen copy does not
    assert not np.array_equal(m(x)[0], before)
    assert_array_equal(m.freeze()(x)[0], m(x)[0])     # freezing again takes the new weights
    assert f.freeze() is f
    for name, p in f.parameters().items():
        assert not p.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            p[...] = 0
    for call in (lambda: f.load_state_dict(m.state_dict()), lambda: f.reset_parameters(1),
                 lambda: f.forward_train(x), lambda: f.backward(None, x)):
        with pytest.raises(TypeError, match="FrozenLSTM's weights are fixed"):
            call()
    with pytest.raises(TypeError, match="LSTM.freeze"):
        lf.FrozenLSTM(6, 32)
    assert repr(f).startswith("FrozenLSTM(6, 32, num_layers=2, proj_size=4")
    assert_array_equal(f(x)[0], before)
    bf = lf.LSTM(6, 32, batch_first=True, bidirectional=True, dtype=np.float32, seed=1)
    x_bti = np.ascontiguousarray(x.transpose(1, 0, 2))
    want, (want_h, _) = bf(x_bti)
    got, (got_h, _) = bf.freeze()(x_bti)
    assert got.shape == (1, 17, 64)
    assert_array_equal(got, want)
    assert_array_equal(got_h, want_h)


def test_frozen_model_pickles_copies_and_saves(tmp_path):
    import copy
    import pickle

    m = lf.LSTM(5, 64, bidirectional=True, dtype=np.float32, seed=1)
    f = m.freeze()
    x = np.random.default_rng(1).standard_normal((19, 2, 5)).astype(np.float32)
    want = f(x)[0]
    for g in (pickle.loads(pickle.dumps(f)), copy.deepcopy(f), copy.copy(f)):
        assert type(g) is lf.FrozenLSTM
        assert all(not p.flags.writeable for p in g.parameters().values())
        assert (g._packed is None) == (f._packed is None)
        assert_array_equal(g(x)[0], want)
    path = tmp_path / "frozen.npz"
    f.save(path)
    loaded = lf.load(path)                             # files hold weights: loaded as an LSTM
    assert type(loaded) is lf.LSTM
    assert_array_equal(loaded(x)[0], want)


def test_frozen_model_calls_from_threads_agree():
    from concurrent.futures import ThreadPoolExecutor

    f = lf.LSTM(16, 64, dtype=np.float32, seed=2).freeze()
    xs = [np.random.default_rng(i).standard_normal((20, 1 + i % 3, 16)).astype(np.float32)
          for i in range(8)]
    want = [f(x)[0] for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: f(x)[0], xs * 4))
    for i, g in enumerate(got):
        assert_array_equal(g, want[i % len(xs)])


def test_prepacked_weights_are_checked():
    from lstm_fast import _forward
    from lstm_fast._core import run_layer
    if not _forward.packed_gemm_active():
        pytest.skip("the packed kernel needs AVX-512F")
    m = lf.LSTM(4, 32, dtype=np.float32, seed=0)
    no_proj = np.empty((1, 0, 32), np.float32)
    packed = _forward.pack_weights(m._w_ih[0], m._w_hh[0], no_proj)
    assert packed.ctypes.data % 64 == 0 and not packed.flags.writeable
    with pytest.raises(ValueError, match="not one layer's"):
        _forward.pack_weights(m._w_ih[0], m._w_ih[0][:, :, :3].copy(), no_proj)
    x = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)
    lens, order = np.full(2, 6, np.intp), np.arange(2, dtype=np.intp)

    def run(prepacked, dtype=np.float32):
        h, c = np.zeros((1, 2, 32), dtype), np.zeros((1, 2, 32), dtype)
        y = np.empty((6, 2, 32), dtype)
        run_layer(x.astype(dtype), m._w_ih[0].astype(dtype), m._w_hh[0].astype(dtype),
                  m._bias_sums(0).astype(dtype), None, order, lens, h, c, y, 1,
                  prepacked=prepacked)
        return y

    assert_array_equal(run(packed), m(x)[0])
    with pytest.raises(ValueError, match="64-byte aligned array of"):
        run(packed[:-32])                                  # wrong size
    unaligned = np.empty(packed.size + 16, np.float32)
    start = 1 if unaligned.ctypes.data % 64 == 0 else 0
    unaligned = unaligned[start:start + packed.size]
    unaligned[...] = packed
    with pytest.raises(ValueError, match="64-byte aligned array of"):
        run(unaligned)                                     # misaligned
    with pytest.raises(TypeError, match="float32"):
        run(packed, np.float64)
    with pytest.raises(ValueError, match="64-byte aligned array of"):
        _forward.forward_plain(x, m._w_ih, m._w_hh, m._b_ih, m._b_hh, None, 1, 0, [packed[32:]])


@pytest.mark.parametrize("shape", [(512, 512, False, 0), (300, 520, True, 200)])
def test_weights_packed_by_every_thread_give_the_same_bits(shape):
    # from 1M floats of packed weights, each thread packs a share of the panels (_pack_part):
    # the same packed copy as one thread's, or as a frozen model's (packed once, serially)
    I, H, bi, P = shape
    m = lf.LSTM(I, H, bidirectional=bi, proj_size=P, dtype=np.float32, seed=4)
    other = lf.LSTM(I, H, bidirectional=bi, proj_size=P, dtype=np.float32, seed=5)
    x = np.random.default_rng(6).standard_normal((3, 5, I)).astype(np.float32)
    results = []
    for n in (1, 2):
        with lf.threads(1):
            other(x)        # the kept work buffer then holds other weights: a panel left out shows
        with lf.threads(n):
            results.append(m(x))
            results.append(m.freeze()(x))
    for out, (h_n, c_n) in results[1:]:
        assert_array_equal(out, results[0][0])
        assert_array_equal(c_n, results[0][1][1])
    ref_out, _ = reference.lstm(x.astype(np.float64), m.state_dict(), 1, bi)
    assert_allclose(results[0][0], ref_out, **tol(np.float32))


@pytest.mark.parametrize("mode", [0, 2], ids=["auto", "wide"])
@pytest.mark.parametrize("shape", [(16, 32, 64, False, 0), (9, 40, 96, True, 24)])
def test_packing_over_another_models_copy_reads_this_models_weights(shape, mode):
    # with several threads, packing compares the kept packed copy and writes only what differs
    # (lf_store_packed): after a call of a model whose weights differ in one value, and in the
    # sign of a zero, each model must still compute with its own weights
    B, I, H, bi, P = shape
    a = lf.LSTM(I, H, bidirectional=bi, proj_size=P, dtype=np.float32, seed=8)
    a.parameters()["weight_ih_l0"][0, 0] = 0.0
    b = lf.LSTM(I, H, bidirectional=bi, proj_size=P, dtype=np.float32, seed=8)
    b.parameters()["weight_ih_l0"][0, 0] = -0.0
    b.parameters()["weight_hh_l0"][5, 3] += 1e-3
    a._recurrence_mode = b._recurrence_mode = mode
    x = np.random.default_rng(9).standard_normal((6, B, I)).astype(np.float32)
    with lf.threads(1):
        ref_a, ref_b = a(x)[0], b(x)[0]
    assert np.isfinite(ref_a).all() and not np.array_equal(ref_a, ref_b)
    with lf.threads(2):
        for _ in range(3):
            assert_array_equal(a(x)[0], ref_a)
            assert_array_equal(b(x)[0], ref_b)
    ref_out, _ = reference.lstm(x.astype(np.float64), b.state_dict(), 1, bi)
    assert_allclose(ref_b, ref_out, **tol(np.float32))
    torch = _torch()
    with torch.no_grad():
        t_out, _ = _torch_lstm(b)(torch.from_numpy(x))
    assert_allclose(ref_b, t_out.numpy(), **tol(np.float32))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_wide_mode_projecting_step_by_step_gives_the_up_front_bits(bidirectional):
    # wide mode with more than 8 rows projects each step's inputs beside its W_hh product when
    # W_ih + W_hh is at most wide_fused_max_bytes: the same FMA chains as the up-front projection,
    # so the same bits, with rows gathered by length (variable lengths, reversed direction) or
    # read in place (equal lengths)
    from lstm_fast import _cpu, _forward
    if not _forward.packed_gemm_active():
        pytest.skip("the packed kernel is not active (generic path)")
    m = lf.LSTM(24, 64, bidirectional=bidirectional, seed=5)
    m._recurrence_mode = 2
    rng = np.random.default_rng(6)
    x = rng.standard_normal((9, 21, 24)).astype(np.float32)
    lengths = rng.integers(1, 10, size=21)
    code, params = _cpu.kernel_settings()
    runs = []
    try:
        for limit in (1 << 40, 0):
            _forward._set_kernel(code, dict(params, wide_fused_max_bytes=limit))
            for n in (1, 2):
                with lf.threads(n):
                    runs.append([m(x), m(x, lengths=lengths)])
    finally:
        _cpu._apply()
    for (out, state), (out_ref, state_ref) in zip(sum(runs[1:], []), runs[0] * 3):
        assert_array_equal(out, out_ref)
        assert_array_equal(state[0], state_ref[0])
        assert_array_equal(state[1], state_ref[1])
    torch = _torch()
    with torch.no_grad():
        torch_out = _torch_lstm(m)(torch.from_numpy(x))[0].numpy()
    assert_allclose(runs[0][0][0], torch_out, rtol=1e-5, atol=2e-6)


def test_packed_chunks_follow_the_threads_and_keep_the_bits():
    # the chunked recurrence on the packed kernel takes one chunk per thread (at least two, but
    # one on the AVX2 path's single thread; 8 to 64 rows in multiples of 8): the chunk changes
    # with the thread count, the bits must not. The forward's bits on 1, 2 and 3 threads at batch
    # 70 are test_thread_count_does_not_change_bits' ("chunked-...-chunks"); here the chunks,
    # torch, and the gradients after those forwards
    from lstm_fast import _forward
    one = 64 if _forward.kernel_settings()["isa"] == "avx2" else 32
    assert [_forward.packed_chunk(64, n) for n in (1, 2, 3, 4, 16)] == [one, 32, 24, 16, 8]
    assert _forward.packed_chunk(5, 2) == 5 and _forward.packed_chunk(1000, 1) == 64
    assert _forward.packed_chunk(70, 2) != _forward.packed_chunk(70, 3)
    m = lf.LSTM(12, 40, num_layers=2, bidirectional=True, seed=2)
    m._recurrence_mode = 1
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 70, 12)).astype(np.float32)
    lengths = rng.integers(1, 8, size=70)
    torch = _torch()
    with torch.no_grad():
        torch_out = _torch_lstm(m)(torch.from_numpy(x))[0].numpy()
    with lf.threads(3):
        assert_allclose(m(x)[0], torch_out, rtol=1e-5, atol=2e-6)
    # the training step after forward_train's chunks of 1, 2 and 3 threads: the same gradients
    g_out = rng.standard_normal((7, 70, 80)).astype(np.float32)
    grads = []
    for n in (1, 2, 3):
        with lf.threads(n):
            _, _, cache = m.forward_train(x, lengths=lengths)
            grads.append(m.backward(cache, g_out))
    for got in grads[1:]:
        assert_array_equal(got.input, grads[0].input)
        for name in got.params:
            assert_array_equal(got.params[name], grads[0].params[name], err_msg=name)
