"""Model files, converters from torch and Keras, streaming steps, pickling and Dask."""
import os
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import lstm_fast as lf
from lstm_fast import reference

from conftest import tol


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_and_load_round_trip(tmp_path, suffix, dtype):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    m = lf.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True, dropout=0.25,
                bias=False, dtype=dtype, seed=0)
    path = tmp_path / f"model{suffix}"
    m.save(path)
    back = lf.load(path)
    assert repr(back) == repr(m)
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(dtype)
    assert_array_equal(back(x)[0], m(x)[0])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_corrupt_and_foreign_files_are_clear_errors(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    m = lf.LSTM(4, 6, seed=0)
    path = tmp_path / f"model{suffix}"
    m.save(path)
    data = path.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable|not an lstm_fast"):
        lf.load(truncated)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError):
        lf.load(garbage)
    with pytest.raises(ValueError, match="end in .npz or .safetensors"):
        lf.load(tmp_path / "model.pt")


def test_npz_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, __config__=np.array([{"format": "lstm_fast.LSTM/1"}], dtype=object))
    with pytest.raises(ValueError, match="not a readable"):
        lf.load(path)


def test_mismatched_weights_are_a_clear_error(tmp_path):
    m = lf.LSTM(4, 6, seed=0)
    path = tmp_path / "m.npz"
    np.savez(path, __config__=np.array('{"format": "lstm_fast.LSTM/1", "input_size": 4, "hidden_size": 5, '
                                       '"num_layers": 1, "bias": true, "batch_first": false, "dropout": 0.0, '
                                       '"bidirectional": false, "proj_size": 0, "dtype": "float32"}'),
             **m.state_dict())
    with pytest.raises(ValueError, match="has shape"):
        lf.load(path)
    np.savez(path, **m.state_dict())
    with pytest.raises(ValueError, match="no configuration"):
        lf.load(path)


# ---------------------------------------------------------------------------- torch and Keras
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_torch(dtype):
    torch = pytest.importorskip("torch")
    t = torch.nn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True, proj_size=3)
    t = (t.double() if dtype == np.float64 else t).eval()
    m = lf.LSTM.from_torch(t)
    assert m.batch_first and m.bidirectional and m.proj_size == 3 and m.dtype == dtype
    x = np.random.default_rng(0).standard_normal((3, 7, 5)).astype(dtype)
    with torch.no_grad():
        expected = t(torch.from_numpy(x))[0].numpy()
    assert_allclose(m(x)[0], expected, **tol(dtype))
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        lf.LSTM.from_torch(torch.nn.GRU(2, 3))


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend in this process")
    return keras


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_from_keras_layer(return_sequences, return_state, go_backwards):
    keras = _keras()
    keras.utils.set_random_seed(0)
    layer = keras.layers.LSTM(6, return_sequences=return_sequences, return_state=return_state,
                              go_backwards=go_backwards, unit_forget_bias=True)
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    expected = layer(x)
    mirror = lf.LSTM.from_keras(layer)
    got = mirror(x)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    got = got if isinstance(got, list) else [got]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_allclose(a, keras.ops.convert_to_numpy(b), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("merge_mode", ["concat", "sum"])
def test_from_keras_bidirectional(merge_mode):
    keras = _keras()
    keras.utils.set_random_seed(1)
    layer = keras.layers.Bidirectional(keras.layers.LSTM(5, return_sequences=True), merge_mode=merge_mode)
    x = np.random.default_rng(1).standard_normal((2, 6, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(layer(x))
    assert_allclose(lf.LSTM.from_keras(layer)(x), expected, rtol=1e-5, atol=2e-6)


def test_from_keras_refuses_other_activations():
    keras = _keras()
    layer = keras.layers.LSTM(4, activation="relu")
    layer.build((None, 3, 2))
    with pytest.raises(ValueError, match="activation='tanh'"):
        lf.LSTM.from_keras(layer)


# ---------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_layers, proj_size, bias", [(1, 0, True), (3, 0, False), (2, 3, True)])
@pytest.mark.parametrize("batch", [1, 5])
def test_steps_equal_the_whole_sequence(dtype, num_layers, proj_size, bias, batch):
    m = lf.LSTM(4, 8, num_layers=num_layers, proj_size=proj_size, bias=bias, batch_first=True,
                dtype=dtype, seed=0)
    x = np.random.default_rng(0).standard_normal((batch, 9, 4)).astype(dtype)
    state = m.zero_state(batch)
    before = [s.copy() for s in state]
    outputs = []
    for t in range(9):
        y, new_state = m.step(x[:, t], state)
        for old, kept in zip(state, before if t == 0 else state):
            assert_array_equal(old, kept)   # the given state is not modified
        state = new_state
        outputs.append(y.copy())
    out, (h_n, c_n) = m(x)
    assert_allclose(np.stack(outputs, axis=1), out, **tol(dtype))
    assert_allclose(state[0], h_n, **tol(dtype))
    assert_allclose(state[1], c_n, **tol(dtype))


@pytest.mark.parametrize("input_size, hidden, proj", [(37, 20, 7), (128, 128, 0), (16, 9, 0)])
@pytest.mark.parametrize("batch", [1, 2, 7, 32, 33])
def test_float32_steps_match_the_reference(input_size, hidden, proj, batch):
    # float32 steps of up to 32 rows run lf_gemv_rows (AVX-512 or AVX2): weight rows in fours and
    # a remainder, input rows in blocks and a remainder, W in chunks of 16 KB, k in 16-lane
    # chunks and a masked tail; 33 rows take sgemm
    m = lf.LSTM(input_size, hidden, num_layers=2, proj_size=proj, dtype=np.float32, seed=2)
    x = np.random.default_rng(3).standard_normal((6, batch, input_size)).astype(np.float32)
    state = m.zero_state(batch)
    outputs = []
    for t in range(6):
        y, state = m.step(x[t], state)
        outputs.append(y.copy())
    ref_out, (ref_h, ref_c) = reference.lstm(x.astype(np.float64), m.state_dict(), 2, False)
    assert_allclose(np.stack(outputs), ref_out, **tol(np.float32))
    assert_allclose(state[0], ref_h, **tol(np.float32))
    assert_allclose(state[1], ref_c, **tol(np.float32))


@pytest.mark.parametrize("batch", [2, 5, 32])
@pytest.mark.parametrize("frozen", [False, True])
def test_float32_step_rows_do_not_depend_on_their_batch(batch, frozen):
    # each output of lf_gemv_rows (a live model's step) and of the packed kernel (a frozen one's)
    # sums its k in one order whatever the rows beside it: a batch's step gives each row the bits
    # of that row stepped alone (a mixed-up row or stride fails). 130 inputs: W_ih in two chunks
    # of rows (lf_gemv_rows' 16 KB), 52 rows, 6 projected
    from lstm_fast import _forward
    if not _forward.packed_gemm_active():
        pytest.skip("BLAS steps (no AVX2/AVX-512 kernels): sgemv and sgemm sum in other orders")
    m = lf.LSTM(130, 13, num_layers=2, proj_size=6, seed=4)
    if frozen:
        m = m.freeze()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, 130)).astype(np.float32)
    state = (rng.standard_normal((2, batch, 6)).astype(np.float32),
             rng.standard_normal((2, batch, 13)).astype(np.float32))
    y, (h, c) = m.step(x, state)
    for r in range(batch):
        y_r, (h_r, c_r) = m.step(x[r:r + 1], (state[0][:, r:r + 1], state[1][:, r:r + 1]))
        assert_array_equal(y[r:r + 1], y_r)
        assert_array_equal(h[:, r:r + 1], h_r)
        assert_array_equal(c[:, r:r + 1], c_r)


def _assert_steps_give(m, x, state, want, want_h, want_c):
    # stepping m over x from `state` gives the sequence's outputs and final state bit for bit,
    # on one thread and on two
    start = state
    for n_threads in (1, 2):
        with lf.threads(n_threads):
            state, outputs = start, []
            for x_t in x:
                y, state = m.step(x_t, state)
                outputs.append(y.copy())
        assert_array_equal(np.stack(outputs), want)
        assert_array_equal(state[0], want_h)
        assert_array_equal(state[1], want_c)


@pytest.mark.parametrize("num_layers, proj_size, bias", [(1, 0, True), (3, 0, False), (2, 7, True)])
@pytest.mark.parametrize("batch", [1, 3, 8, 40])
def test_frozen_float32_steps_give_the_sequence_bits(num_layers, proj_size, bias, batch):
    # a frozen model's float32 step runs the products of the sequence kernel over the weights
    # packed at freeze (the StepPlan below 8 rows or on one thread, the sequence kernel itself
    # with T = 1 on more): stepping gives the bits of m(x), on any thread count
    # (H = 40: a partial panel; batch 40: the sequence kernel's two chunks of rows)
    m = lf.LSTM(21, 40, num_layers=num_layers, proj_size=proj_size, bias=bias, seed=6).freeze()
    if m.kernel_path == "blas":
        pytest.skip("the packed kernel needs AVX-512F or AVX2 + FMA")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, batch, 21)).astype(np.float32)
    hx = (rng.standard_normal((num_layers, batch, m.hidden_out)).astype(np.float32),
          rng.standard_normal((num_layers, batch, 40)).astype(np.float32))
    want, (want_h, want_c) = m(x, hx)
    _assert_steps_give(m, x, hx, want, want_h, want_c)
    y1, _ = m.step(x[0, 0], (hx[0][:, 0], hx[1][:, 0]))     # unbatched: the row's bits
    assert_array_equal(y1, want[0, 0])


@pytest.mark.parametrize("batch", [33, 40])
def test_float32_steps_of_many_rows_give_the_sequence_bits(batch):
    # a live model's step of more than 32 rows (lf_gemv_rows' limit) runs the sequence kernel
    # with T = 1, packing the weights as a call does: the bits of m(x) on any thread count
    m = lf.LSTM(21, 40, num_layers=2, proj_size=7, seed=8)
    if m.freeze().kernel_path == "blas":
        pytest.skip("the packed kernel needs AVX-512F or AVX2 + FMA")
    x = np.random.default_rng(9).standard_normal((4, batch, 21)).astype(np.float32)
    want, (want_h, want_c) = m(x)
    _assert_steps_give(m, x, m.zero_state(batch), want, want_h, want_c)


@pytest.mark.parametrize("batch", [1, 5, 12, 24, 32])
@pytest.mark.parametrize("frozen", [False, True])
def test_float32_step_split_over_threads_gives_the_one_thread_bits(batch, frozen):
    # weights past 1 MB (STEP_SPLIT_MIN_BYTES): two threads may split the hidden units; a
    # shape's first 16 calls try one thread, then both (lf_split.h), so 20 calls include split
    # ones. Live: 202 units and 70 projected rows, shares of 16 with four-row tiles left over.
    # Frozen (batches below 32 split whole packed panels, 32 runs the sequence kernel): 224
    # units, shares of 32 columns, the projection's last panel partial; its steps also give the
    # sequence's bits.
    H = 224 if frozen else 202
    m = lf.LSTM(300, H, num_layers=2, proj_size=70, seed=8)
    if frozen:
        m = m.freeze()
    rng = np.random.default_rng(9)
    x = rng.standard_normal((batch, 300)).astype(np.float32)
    state = (rng.standard_normal((2, batch, 70)).astype(np.float32),
             rng.standard_normal((2, batch, H)).astype(np.float32))
    if frozen and m.kernel_path != "blas":
        want, (want_h, want_c) = m(x[None], state)
        y, (h, c) = m.step(x, state)
        assert_array_equal(y, want[0])
        assert_array_equal(h, want_h)
        assert_array_equal(c, want_c)
    with lf.threads(1):
        y1, (h1, c1) = m.step(x, state)
    ref_out, (ref_h, ref_c) = reference.lstm(x[None].astype(np.float64), m.state_dict(), 2, False,
                                             h0=state[0].astype(np.float64),
                                             c0=state[1].astype(np.float64))
    assert_allclose(y1, ref_out[0], **tol(np.float32))
    assert_allclose(c1, ref_c, **tol(np.float32))
    with lf.threads(2):
        for _ in range(20):
            y2, (h2, c2) = m.step(x, state)
            assert_array_equal(y2, y1)
            assert_array_equal(h2, h1)
            assert_array_equal(c2, c1)
    torch = pytest.importorskip("torch")       # and torch's own LSTM on the same weights
    t = torch.nn.LSTM(300, H, num_layers=2, proj_size=70)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    with torch.no_grad():
        t_out, (t_h, t_c) = t(torch.from_numpy(x[None]),
                              tuple(torch.from_numpy(s) for s in state))
    assert_allclose(y2, t_out[0].numpy(), **tol(np.float32))
    assert_allclose(h2, t_h.numpy(), **tol(np.float32))
    assert_allclose(c2, t_c.numpy(), **tol(np.float32))


def test_step_unbatched_and_errors():
    m = lf.LSTM(3, 4, num_layers=2, seed=0)
    state = m.zero_state()
    y, (h, c) = m.step(np.ones(3, np.float32), state)
    assert y.shape == (4,) and h.shape == (2, 4)
    assert_allclose(y, m(np.ones((1, 3), np.float32))[0][0], **tol(np.float32))
    with pytest.raises(ValueError, match="x_t has shape"):
        m.step(np.ones((2, 5), np.float32), m.zero_state(2))
    with pytest.raises(ValueError, match="state h has shape"):
        m.step(np.ones((2, 3), np.float32), m.zero_state(3))
    with pytest.raises(TypeError, match="state must be"):
        m.step(np.ones((2, 3), np.float32), None)
    with pytest.raises(ValueError, match="bidirectional"):
        lf.LSTM(3, 4, bidirectional=True).step(np.ones(3), None)


def test_step_sees_parameter_updates():
    m = lf.LSTM(3, 4, seed=0, dtype=np.float64)
    x = np.ones((1, 3))
    y0, _ = m.step(x, m.zero_state(1))
    m.parameters()["bias_hh_l0"][:] += 0.5
    y1, _ = m.step(x, m.zero_state(1))
    assert_allclose(y1, m(x[None])[0][0], **tol(np.float64))
    assert not np.allclose(y0, y1)


# ---------------------------------------------------------------------------- pickling and Dask
def test_pickle_holds_weights_and_config():
    m = lf.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    back = pickle.loads(pickle.dumps(m))
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    assert_array_equal(back(x)[0], m(x)[0])
    assert set(m.__getstate__()) == {"config", "state"}


def test_dask_predict_on_a_local_cluster():
    pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    import dask.array as da

    m = lf.LSTM(3, 6, num_layers=2, batch_first=True, seed=0)
    x = np.random.default_rng(0).standard_normal((40, 7, 3)).astype(np.float32)
    expected = m(x)[0]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster):
        lazy = lf.dask.predict(m, da.from_array(x, chunks=(10, 7, 3)))
        assert lazy.chunks == ((10, 10, 10, 10), (7,), (6,))
        result = lazy.compute()
    assert_allclose(result, expected, **tol(np.float32))
