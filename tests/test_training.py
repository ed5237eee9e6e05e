"""Training: gradients against torch.autograd and finite differences, optimizers against torch.optim,
reproducibility, errors, and a memory task that an LSTM must really learn."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import lstm_fast as lf

GRAD_TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=2e-5)}

CONFIGS = [
    # (num_layers, bidirectional, proj_size, batch_first, with_lengths)
    (1, False, 0, False, False),
    (1, True, 0, True, False),
    (2, False, 3, False, True),
    (2, True, 0, False, True),
    (3, True, 4, True, True),
]
IDS = [f"L{c[0]}-{'bi' if c[1] else 'uni'}-p{c[2]}-{'bf' if c[3] else 'tb'}-{'len' if c[4] else 'full'}" for c in CONFIGS]
LENGTHS = np.array([9, 1, 4, 9, 2, 7, 6])


def _torch():
    return pytest.importorskip("torch")


def _case(dtype, config, seed=0, batch=7, seq_len=9, input_size=5, hidden=8):
    L, bi, P, bf, with_len = config
    m = lf.LSTM(input_size, hidden, num_layers=L, bidirectional=bi, proj_size=P, batch_first=bf,
                dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 10)
    D, H_out = m.num_directions, m.hidden_out
    x = rng.standard_normal((batch, seq_len, input_size) if bf else (seq_len, batch, input_size)).astype(dtype)
    h0 = rng.standard_normal((L * D, batch, H_out)).astype(dtype)
    c0 = rng.standard_normal((L * D, batch, hidden)).astype(dtype)
    out_shape = (batch, seq_len, D * H_out) if bf else (seq_len, batch, D * H_out)
    g_out = rng.standard_normal(out_shape).astype(dtype)
    g_h = rng.standard_normal(h0.shape).astype(dtype)
    g_c = rng.standard_normal(c0.shape).astype(dtype)
    lengths = LENGTHS[:batch] if with_len else None
    return m, x, (h0, c0), (g_out, g_h, g_c), lengths


def _torch_grads(m, x, hx, grads, lengths):
    torch = _torch()
    t = torch.nn.LSTM(m.input_size, m.hidden_size, num_layers=m.num_layers, batch_first=m.batch_first,
                      bidirectional=m.bidirectional, proj_size=m.proj_size)
    t = t.double() if m.dtype == np.float64 else t.float()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    xt = torch.from_numpy(x).requires_grad_()
    h0 = torch.from_numpy(hx[0]).requires_grad_()
    c0 = torch.from_numpy(hx[1]).requires_grad_()
    if lengths is None:
        out, (h_n, c_n) = t(xt, (h0, c0))
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.from_numpy(lengths),
                                                         batch_first=m.batch_first, enforce_sorted=False)
        out, (h_n, c_n) = t(packed, (h0, c0))
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=m.batch_first,
                                                        total_length=x.shape[1 if m.batch_first else 0])
    loss = sum((a * torch.from_numpy(g)).sum() for a, g in zip((out, h_n, c_n), grads))
    loss.backward()
    return out.detach().numpy(), xt.grad.numpy(), (h0.grad.numpy(), c0.grad.numpy()), \
        {k: p.grad.numpy() for k, p in t.named_parameters()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradients_match_torch_autograd(dtype, config):
    m, x, hx, grads, lengths = _case(dtype, config)
    out, _, cache = m.forward_train(x, hx, lengths=lengths)
    g = m.backward(cache, grads[0], grads[1:])
    t_out, t_dx, t_dhx, t_params = _torch_grads(m, x, hx, grads, lengths)
    tol = GRAD_TOL[dtype]
    assert_allclose(out, t_out, **tol)
    assert_allclose(g.input, t_dx, **tol)
    assert_allclose(g.hx[0], t_dhx[0], **tol)
    assert_allclose(g.hx[1], t_dhx[1], **tol)
    assert list(g.params) == list(m.state_dict())
    for name, value in t_params.items():
        assert g.params[name].shape == value.shape, name
        assert_allclose(g.params[name], value, err_msg=name, **tol)


@pytest.mark.parametrize("mode", [1, 2], ids=["chunked", "wide"])
@pytest.mark.parametrize("config", CONFIGS[2:], ids=IDS[2:])
def test_gradients_in_both_recurrence_modes(mode, config):
    m, x, hx, grads, lengths = _case(np.float64, config)
    m._recurrence_mode = mode
    _, _, cache = m.forward_train(x, hx, lengths=lengths)
    g = m.backward(cache, grads[0], grads[1:])
    _, t_dx, _, t_params = _torch_grads(m, x, hx, grads, lengths)
    assert_allclose(g.input, t_dx, **GRAD_TOL[np.float64])
    for name, value in t_params.items():
        assert_allclose(g.params[name], value, err_msg=name, **GRAD_TOL[np.float64])


@pytest.mark.parametrize("mode", [1, 2], ids=["chunked", "wide"])
@pytest.mark.parametrize("batch", [1, 9], ids=["b1", "b9"])
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[2], CONFIGS[4]], ids=[IDS[1], IDS[2], IDS[4]])
def test_float32_gradients_on_both_product_paths(packed, mode, batch, config):
    # hidden 13 (4H = 52) and projections 3/4 fall off the packed kernel's 32-column panels
    m, x, hx, grads, _ = _case(np.float32, config, batch=batch, hidden=13)
    lengths = np.random.default_rng(1).integers(1, 10, size=batch) if config[4] else None
    m._recurrence_mode = mode
    _, _, cache = m.forward_train(x, hx, lengths=lengths)
    g = m.backward(cache, grads[0], grads[1:])
    _, t_dx, t_dhx, t_params = _torch_grads(m, x, hx, grads, lengths)
    assert_allclose(g.input, t_dx, **GRAD_TOL[np.float32])
    assert_allclose(g.hx[0], t_dhx[0], **GRAD_TOL[np.float32])
    for name, value in t_params.items():
        assert_allclose(g.params[name], value, err_msg=name, **GRAD_TOL[np.float32])


def test_float32_weight_gradients_over_long_sequences(packed):
    # T*B = 540 rows: the packed weight-gradient product (lf_pgemm_at) sums them in blocks of 256,
    # each output's partial sum carried from block to block; projections and lengths included
    config = (2, True, 3, False, True)
    m, x, hx, grads, _ = _case(np.float32, config, batch=9, seq_len=60, hidden=13)
    lengths = np.random.default_rng(2).integers(1, 61, size=9)
    lengths[3] = 60
    _, _, cache = m.forward_train(x, hx, lengths=lengths)
    g = m.backward(cache, grads[0], grads[1:])
    _, t_dx, _, t_params = _torch_grads(m, x, hx, grads, lengths)
    assert_allclose(g.input, t_dx, **GRAD_TOL[np.float32])
    for name, value in t_params.items():
        scale = np.abs(value).max()
        assert_allclose(g.params[name], value, err_msg=name, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_input_gradients_split_by_columns(dtype, bidirectional):
    # few rows (T*B < 4 * 256): dx runs in groups of 32 columns (70 = 32 + 32 + 6), on two threads
    # in one team with the weight gradients, directions added in order into each group
    config = (1, bidirectional, 0, False, False)
    m, x, hx, grads, _ = _case(dtype, config, batch=2, seq_len=30, input_size=70, hidden=16)
    with lf.threads(2):
        _, _, cache = m.forward_train(x, hx)
        g = m.backward(cache, grads[0], grads[1:])
    with lf.threads(1):
        _, _, cache = m.forward_train(x, hx)
        g1 = m.backward(cache, grads[0], grads[1:])
    assert_array_equal(g.input, g1.input)
    _, t_dx, _, t_params = _torch_grads(m, x, hx, grads, None)
    assert_allclose(g.input, t_dx, **GRAD_TOL[dtype])
    for name, value in t_params.items():
        assert_allclose(g.params[name], value, err_msg=name, **GRAD_TOL[dtype])


@pytest.mark.parametrize("shape", [(100, 128, 128), (37, 32, 128), (16, 64, 128), (41, 160, 256),
                                   (24, 256, 128)])
def test_batch1_input_gradient_inside_the_recurrence_gives_the_same_bits(shape):
    # batch 1 on one thread, H_out a multiple of 128: dx = dz @ W_ih runs in the recurrence's
    # products, 8-row tiles of the previous 8 iterations' times (_dh_prev_folded); with fewer than
    # 8 panels of dx columns each iteration takes a k-range of one (I=128: halves, I=32: eighths,
    # I=64: quarters), I=160 gives uneven whole panels, T=37 and 41 leave rows for after the loop.
    # Off, dx is one GEMM after the recurrence: the same sums, so the same bits; and torch agrees.
    from lstm_fast import _backward, _forward
    if not _forward.packed_gemm_active():
        pytest.skip("the folded input gradient needs the packed kernel (AVX-512F)")
    T, I, H = shape
    m, x, hx, grads, _ = _case(np.float32, (1, False, 0, False, False), batch=1, seq_len=T,
                               input_size=I, hidden=H)
    m._recurrence_mode = 1
    got = {}
    with lf.threads(1):
        for fold in (True, False):
            _backward.set_backward_input_fold(fold)
            try:
                _, _, cache = m.forward_train(x, hx)
                got[fold] = m.backward(cache, grads[0], grads[1:])
            finally:
                _backward.set_backward_input_fold(True)
    assert_array_equal(got[True].input, got[False].input)
    assert_array_equal(got[True].hx[0], got[False].hx[0])
    for name in got[False].params:
        assert_array_equal(got[True].params[name], got[False].params[name], err_msg=name)
    _, t_dx, _, _ = _torch_grads(m, x, hx, grads, None)
    assert_allclose(got[True].input, t_dx, rtol=1e-4, atol=1e-5 * np.abs(t_dx).max())


@pytest.mark.parametrize("shape", [(20, 16, 64, True, None), (19, 8, 128, True, 13),
                                   (17, 8, 96, False, None), (30, 24, 64, False, 23)])
def test_batch1_interleaved_forward_keeps_what_backward_needs(shape):
    # Training's forward at batch 1 with the interleaved projection (H=64 with I <= 32, or W_hh
    # of 96 KB and more; T >= 16) keeps the activated gates and c_t of each real time index, the
    # reverse direction's from the end of the row's own length: the same bits as with every
    # input projected up front, and torch's gradients.
    from lstm_fast import _forward
    if not _forward.packed_gemm_active():
        pytest.skip("the interleaved projection needs the packed kernel (AVX-512F)")
    T, I, H, bi, length = shape
    m, x, hx, grads, _ = _case(np.float32, (1, bi, 0, False, False), batch=1, seq_len=T,
                               input_size=I, hidden=H)
    lengths = None if length is None else np.array([length])
    got = {}
    with lf.threads(1):
        for interleave in (True, False):
            _forward.set_interleaved_projection(interleave)
            try:
                out, _, cache = m.forward_train(x, hx, lengths=lengths)
                got[interleave] = out, m.backward(cache, grads[0], grads[1:])
            finally:
                _forward.set_interleaved_projection(True)
    assert_array_equal(got[True][0], got[False][0])
    on, off = got[True][1], got[False][1]
    assert_array_equal(on.input, off.input)
    assert_array_equal(on.hx[0], off.hx[0])
    assert_array_equal(on.hx[1], off.hx[1])
    for name in off.params:
        assert_array_equal(on.params[name], off.params[name], err_msg=name)
    t_out, t_dx, _, t_params = _torch_grads(m, x, hx, grads, lengths)
    assert_allclose(got[True][0], t_out, rtol=2e-5, atol=2e-6)
    assert_allclose(on.input, t_dx, rtol=1e-4, atol=1e-5 * np.abs(t_dx).max())
    for name, value in t_params.items():
        assert_allclose(on.params[name], value, rtol=1e-4, atol=1e-5 * np.abs(value).max(),
                        err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_padded_rows_read_zero_after_a_full_length_backward(dtype):
    # backward keeps its work buffers between calls and zeroes them only for padded batches (the
    # recurrence writes every row of a full-length one): a padded call after a full-length call of
    # the same shape, whose rows fill the buffers, gives the same bits as before it
    config = (1, False, 0, False, True)
    m, x, hx, grads, _ = _case(dtype, config, batch=5, seq_len=12, hidden=16)
    lengths = np.array([12, 3, 7, 1, 9])

    def padded_grads():
        _, _, cache = m.forward_train(x, hx, lengths=lengths)
        return m.backward(cache, grads[0], grads[1:])

    before = padded_grads()
    _, _, cache = m.forward_train(x * 3 + 1, hx)
    m.backward(cache, grads[0] + 1, grads[1:])
    after = padded_grads()
    for name, value in before.params.items():
        assert_array_equal(after.params[name], value, err_msg=name)
    assert_array_equal(after.input, before.input)
    _, t_dx, _, t_params = _torch_grads(m, x, hx, grads, lengths)
    for name, value in t_params.items():
        assert_allclose(after.params[name], value, err_msg=name, **GRAD_TOL[dtype])


def test_unbatched_gradients_match_torch():
    torch = _torch()
    m = lf.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = np.random.default_rng(0).standard_normal((6, 3))
    g_out = np.random.default_rng(1).standard_normal((6, 10))
    _, _, cache = m.forward_train(x)
    g = m.backward(cache, g_out)
    t = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True).double()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    xt = torch.from_numpy(x).requires_grad_()
    (t(xt)[0] * torch.from_numpy(g_out)).sum().backward()
    assert g.input.shape == (6, 3) and g.hx[0].shape == (4, 5)
    assert_allclose(g.input, xt.grad.numpy(), **GRAD_TOL[np.float64])
    for name, p in t.named_parameters():
        assert_allclose(g.params[name], p.grad.numpy(), err_msg=name, **GRAD_TOL[np.float64])


def test_finite_differences():
    """Central differences of a scalar loss, float64, for x and a few weights of every kind."""
    m = lf.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 3))
    w_out = rng.standard_normal((5, 2, 4))
    lengths = np.array([5, 3])

    def loss():
        out, (h_n, c_n) = m(x, lengths=lengths)
        return float((out * w_out).sum() + h_n.sum() + 0.5 * (c_n ** 2).sum())

    _, (h_n, c_n), cache = m.forward_train(x, lengths=lengths)
    g = m.backward(cache, w_out, (np.ones_like(h_n), c_n))
    eps = 1e-6
    params = m.parameters()
    for name in ["weight_ih_l0", "weight_hh_l1_reverse", "bias_hh_l0_reverse", "weight_hr_l1", "bias_ih_l1"]:
        p = params[name]
        for idx in [(0,), (p.shape[0] - 1,), (p.shape[0] // 2,)]:
            idx = idx + (0,) * (p.ndim - 1)
            old = p[idx]
            p[idx] = old + eps
            up = loss()
            p[idx] = old - eps
            down = loss()
            p[idx] = old
            assert abs((up - down) / (2 * eps) - g.params[name][idx]) < 1e-6, (name, idx)
    for idx in [(0, 0, 0), (4, 1, 2), (2, 1, 1), (4, 0, 1)]:
        old = x[idx]
        x[idx] = old + eps
        up = loss()
        x[idx] = old - eps
        down = loss()
        x[idx] = old
        assert abs((up - down) / (2 * eps) - g.input[idx]) < 1e-6, idx
    assert not g.input[3:, 1].any(), "no gradient flows into padding"


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["auto", "chunked", "wide"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_are_the_same_bits_for_any_thread_count(dtype, mode):
    m, x, hx, grads, lengths = _case(dtype, CONFIGS[4], batch=7)
    m._recurrence_mode = mode
    results = []
    for n in (1, 2, 3):
        with lf.threads(n):
            _, _, cache = m.forward_train(x, hx, lengths=lengths)
            results.append(m.backward(cache, grads[0], grads[1:]))
    for other in results[1:]:
        assert_array_equal(other.input, results[0].input)
        for name in results[0].params:
            assert_array_equal(other.params[name], results[0].params[name])


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["auto", "chunked", "wide"])
@pytest.mark.parametrize("shape", [(12, 1, 16, 128, 1, False, 0), (9, 9, 5, 64, 2, True, 0),
                                   (9, 3, 5, 32, 2, False, 8)],
                         ids=["b1-h128", "b9-bi-2L", "b3-proj"])
def test_forward_train_writes_every_cache_row(monkeypatch, shape, mode, n_threads):
    # full-length batches get unfilled caches: filled with NaN, the gradients must not change
    import lstm_fast._train as train

    T, B, I, H, L, bi, P = shape
    m = lf.LSTM(I, H, num_layers=L, bidirectional=bi, proj_size=P, seed=3)
    m._recurrence_mode = mode
    x = np.random.default_rng(4).standard_normal((T, B, I)).astype(np.float32)
    g_out = np.random.default_rng(5).standard_normal((T, B, m.num_directions * m.hidden_out)).astype(np.float32)
    runs = []
    for fill in (np.zeros, lambda shape, dtype: np.full(shape, np.nan, dtype)):
        monkeypatch.setattr(train, "_uninitialised", fill)
        with lf.threads(n_threads):
            out, _, cache = m.forward_train(x)
            runs.append((out, m.backward(cache, g_out)))
    assert np.isfinite(runs[1][0]).all()
    assert_array_equal(runs[1][0], runs[0][0])
    assert_array_equal(runs[1][1].input, runs[0][1].input)
    for name in runs[0][1].params:
        assert np.isfinite(runs[1][1].params[name]).all(), name
        assert_array_equal(runs[1][1].params[name], runs[0][1].params[name])


@pytest.mark.parametrize("hidden", [20, 200], ids=["chunked", "wide"])
def test_large_batch_thread_invariance(hidden):
    m = lf.LSTM(6, hidden, bidirectional=True, seed=0)
    x = np.random.default_rng(0).standard_normal((11, 70, 6)).astype(np.float32)
    g_out = np.random.default_rng(1).standard_normal((11, 70, 2 * hidden)).astype(np.float32)
    lengths = np.random.default_rng(2).integers(1, 12, size=70)
    runs = []
    for n in (1, 2):
        with lf.threads(n):
            _, _, cache = m.forward_train(x, lengths=lengths)
            runs.append(m.backward(cache, g_out))
    assert_array_equal(runs[0].input, runs[1].input)
    for name in runs[0].params:
        assert_array_equal(runs[0].params[name], runs[1].params[name])


def test_dropout_between_layers():
    m = lf.LSTM(3, 6, num_layers=3, dropout=0.5, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    out_eval, _ = m(x)
    out_a, _, cache_a = m.forward_train(x, rng=np.random.default_rng(7))
    out_b, _, _ = m.forward_train(x, rng=np.random.default_rng(7))
    assert_array_equal(out_a, out_b)                    # same seed, same masks, same bits
    assert not np.allclose(out_a, out_eval)             # dropout acts in training only
    for mask in cache_a.masks[:-1]:
        assert set(np.unique(mask)) <= {0.0, 2.0}        # kept values are scaled by 1/(1-p)
    assert cache_a.masks[-1] is None                    # never after the last layer
    # gradients through the masks: finite differences with the same masks
    w = np.random.default_rng(3).standard_normal(out_a.shape)
    g = m.backward(cache_a, w)
    eps = 1e-6
    p = m.parameters()["weight_ih_l0"]
    old = p[1, 2]
    p[1, 2] = old + eps
    up = (m.forward_train(x, rng=np.random.default_rng(7))[0] * w).sum()
    p[1, 2] = old - eps
    down = (m.forward_train(x, rng=np.random.default_rng(7))[0] * w).sum()
    p[1, 2] = old
    assert abs((up - down) / (2 * eps) - g.params["weight_ih_l0"][1, 2]) < 1e-6


def test_backward_errors():
    m, x, hx, grads, _ = _case(np.float32, CONFIGS[0])
    other, *_ = _case(np.float32, CONFIGS[0])
    _, _, cache = m.forward_train(x, hx)
    with pytest.raises(ValueError, match="another model"):
        other.backward(cache, grads[0])
    with pytest.raises(TypeError, match="cache must be"):
        m.backward({"not": "a cache"}, grads[0])
    with pytest.raises(ValueError, match=r"grad_out has shape \(9, 7, 3\), expected \(9, 7, 8\)"):
        m.backward(cache, np.zeros((9, 7, 3), np.float32))
    with pytest.raises(TypeError, match="grad_out must be a floating-point"):
        m.backward(cache, np.zeros((9, 7, 8), np.int32))
    with pytest.raises(ValueError, match="grad_h_n has shape"):
        m.backward(cache, grads[0], (np.zeros((2, 7, 8), np.float32), grads[2]))
    with pytest.raises(TypeError, match="grad_state must be a tuple"):
        m.backward(cache, grads[0], grads[1])


# ---------------------------------------------------------------------------- head, losses, optimizers
def test_linear_and_losses_match_torch():
    torch = _torch()
    head = lf.Linear(6, 3, dtype=np.float64, seed=0)
    t = torch.nn.Linear(6, 3).double()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in head.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 5, 6))
    target = np.random.default_rng(1).standard_normal((4, 5, 3))
    xt = torch.from_numpy(x).requires_grad_()
    loss_t = torch.nn.functional.mse_loss(t(xt), torch.from_numpy(target))
    loss_t.backward()
    y = head(x)
    loss, g_y = lf.mse_loss(y, target)
    g = head.backward(x, g_y)
    assert_allclose(loss, loss_t.item(), rtol=1e-12)
    assert_allclose(g.input, xt.grad.numpy(), rtol=1e-12, atol=1e-14)
    assert_allclose(g.params["weight"], t.weight.grad.numpy(), rtol=1e-12, atol=1e-14)
    assert_allclose(g.params["bias"], t.bias.grad.numpy(), rtol=1e-12, atol=1e-14)
    logits = np.random.default_rng(2).standard_normal((6, 4)) * 30    # large: must stay stable
    labels = np.array([0, 3, 1, 2, 2, 0])
    lt = torch.from_numpy(logits).requires_grad_()
    ce = torch.nn.functional.cross_entropy(lt, torch.from_numpy(labels))
    ce.backward()
    loss, grad = lf.cross_entropy_loss(logits, labels)
    assert_allclose(loss, ce.item(), rtol=1e-12)
    assert_allclose(grad, lt.grad.numpy(), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="labels must lie"):
        lf.cross_entropy_loss(logits, np.array([0, 4, 1, 2, 2, 0]))


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
])
def test_optimizers_match_torch(name, kwargs):
    torch = _torch()
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    t_params = [torch.tensor(params[k].copy(), requires_grad=True) for k in ("a", "b")]
    opt = getattr(lf.optim, name)(params, **kwargs)
    t_opt = getattr(torch.optim, name)(t_params, **kwargs)
    for step in range(5):
        grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
        opt.step(grads)
        for p, k in zip(t_params, ("a", "b")):
            p.grad = torch.from_numpy(grads[k].copy())
        t_opt.step()
    for p, k in zip(t_params, ("a", "b")):
        assert_allclose(params[k], p.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_clip_grad_norm_matches_torch():
    torch = _torch()
    rng = np.random.default_rng(0)
    grads = [{"a": rng.standard_normal((3, 4))}, {"b": rng.standard_normal(5)}]
    tensors = [torch.zeros(3, 4, dtype=torch.float64, requires_grad=True),
               torch.zeros(5, dtype=torch.float64, requires_grad=True)]
    tensors[0].grad = torch.from_numpy(grads[0]["a"].copy())
    tensors[1].grad = torch.from_numpy(grads[1]["b"].copy())
    total_t = torch.nn.utils.clip_grad_norm_(tensors, 0.5)
    total = lf.optim.clip_grad_norm(grads, 0.5)
    assert_allclose(total, total_t.item(), rtol=1e-12)
    assert_allclose(grads[0]["a"], tensors[0].grad.numpy(), rtol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    m = lf.LSTM(2, 5, num_layers=2, seed=0)
    head = lf.Linear(5, 1, seed=1)
    opt = lf.optim.Adam([m.parameters(), head.parameters()], lr=1e-2)
    x = np.random.default_rng(0).standard_normal((20, 6, 2)).astype(np.float32)
    y = x.sum(axis=(1, 2))[:, None]
    lf.fit(m, head, x, y, epochs=2, batch_size=8, optimizer=opt, progress=False)
    path = tmp_path / "ckpt.npz"
    lf.save_checkpoint(path, m, head, opt)
    m2, head2 = lf.LSTM(2, 5, num_layers=2, seed=5), lf.Linear(5, 1, seed=6)
    opt2 = lf.optim.Adam([m2.parameters(), head2.parameters()], lr=1e-2)
    config = lf.load_checkpoint(path, m2, head2, opt2)
    assert config["num_layers"] == 2 and config["hidden_size"] == 5
    # continuing from the checkpoint gives the same bits as continuing the original
    lf.fit(m, head, x, y, epochs=1, batch_size=8, optimizer=opt, seed=3, progress=False)
    lf.fit(m2, head2, x, y, epochs=1, batch_size=8, optimizer=opt2, seed=3, progress=False)
    for k, v in m.state_dict().items():
        assert_array_equal(m2.state_dict()[k], v)


def test_fit_is_reproducible_and_stops_early():
    def run():
        m = lf.LSTM(1, 8, seed=0)
        head = lf.Linear(8, 1, seed=0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 10, 1)).astype(np.float32)
        y = x[:, -3:, 0].sum(axis=1, keepdims=True)
        hist = lf.fit(m, head, x[:48], y[:48], epochs=200, batch_size=16, seed=1,
                      validation=(x[48:], y[48:]), patience=3, progress=False)
        return m, hist
    (m1, h1), (m2, h2) = run(), run()
    assert len(h1.train_loss) < 200, "patience must stop the run"
    assert h1.train_loss == h2.train_loss
    for k, v in m1.state_dict().items():
        assert_array_equal(m2.state_dict()[k], v)


def _adding_problem(n, seq_len, rng):
    """x[..., 0] uniform values, x[..., 1] marks two of them; the target is their sum."""
    x = np.zeros((n, seq_len, 2), np.float32)
    x[:, :, 0] = rng.random((n, seq_len))
    first = rng.integers(0, seq_len // 2, n)
    second = rng.integers(seq_len // 2, seq_len, n)
    x[np.arange(n), first, 1] = 1
    x[np.arange(n), second, 1] = 1
    return x, (x[:, :, 0] * x[:, :, 1]).sum(axis=1, keepdims=True)


def test_learns_the_adding_problem():
    """Memory over 50 steps: the loss must fall far below the trivial baseline (variance 1/6)."""
    seq_len = 50
    rng = np.random.default_rng(0)
    m = lf.LSTM(2, 32, batch_first=True, seed=0)
    head = lf.Linear(32, 1, seed=0)
    opt = lf.optim.Adam([m.parameters(), head.parameters()], lr=1e-2)
    x_val, y_val = _adding_problem(400, seq_len, np.random.default_rng(1))
    baseline = float(np.mean((y_val - y_val.mean()) ** 2))
    for _ in range(900):
        xb, yb = _adding_problem(64, seq_len, rng)
        out, _, cache = m.forward_train(xb)
        pred = head(out[:, -1])
        _, g_pred = lf.mse_loss(pred, yb)
        g_head = head.backward(out[:, -1], g_pred)
        g_out = np.zeros_like(out)
        g_out[:, -1] = g_head.input
        grads = [m.backward(cache, g_out).params, g_head.params]
        lf.optim.clip_grad_norm(grads, 1.0)
        opt.step(grads)
    out, _ = m(x_val)
    val_loss = float(np.mean((head(out[:, -1]) - y_val) ** 2))
    assert baseline > 0.1
    assert val_loss < 0.1 * baseline


@pytest.mark.parametrize("shape", [(1, 24, 128, False, 0), (9, 40, 96, True, 24)])
def test_backward_packing_over_another_models_copy_reads_this_models_weights(shape):
    # with several threads backward packs W.T comparing the kept copy first (lf_pack_wt_for):
    # after a backward of a model whose weights differ in one value and a zero's sign, each
    # model's gradients must come from its own weights
    B, I, H, bi, P = shape
    models = [lf.LSTM(I, H, bidirectional=bi, proj_size=P, dtype=np.float32, seed=8) for _ in range(2)]
    models[0].parameters()["weight_ih_l0"][0, 0] = 0.0
    models[1].parameters()["weight_ih_l0"][0, 0] = -0.0
    models[1].parameters()["weight_hh_l0"][5, 3] += 1e-3
    x = np.random.default_rng(9).standard_normal((6, B, I)).astype(np.float32)
    g_out = np.random.default_rng(10).standard_normal((6, B, models[0].num_directions * models[0].hidden_out)).astype(np.float32)
    with lf.threads(1):
        caches = [m.forward_train(x)[2] for m in models]
        refs = [m.backward(c, g_out) for m, c in zip(models, caches)]
    assert np.isfinite(refs[0].input).all() and np.isfinite(refs[1].input).all()
    assert not np.array_equal(refs[0].input, refs[1].input)
    D = models[1].num_directions
    h0 = np.zeros((D, B, models[1].hidden_out), np.float32)
    c0 = np.zeros((D, B, H), np.float32)
    _, t_dx, _, t_params = _torch_grads(models[1], x, (h0, c0), (g_out, h0, c0), None)
    assert_allclose(refs[1].input, t_dx, **GRAD_TOL[np.float32])
    for name, value in t_params.items():
        assert_allclose(refs[1].params[name], value, err_msg=name, **GRAD_TOL[np.float32])
    with lf.threads(2):
        for _ in range(3):
            for m, c, ref in zip(models, caches, refs):
                got = m.backward(c, g_out)
                assert_array_equal(got.input, ref.input)
                for name in ref.params:
                    assert_array_equal(got.params[name], ref.params[name])


@pytest.mark.parametrize("I, H", [(70, 50), (200, 96)], ids=["x-in-place", "x-packed"])
def test_weight_gradients_over_several_k_blocks_match_torch(I, H):
    # T*B = 520 rows: more than one k-block of the weight-gradient products (kc <= 384), 4H rows
    # not a multiple of the register tile, more than 64 columns: A (dZ) packed a block at a time
    # (lf_pack_at_block), x read in place (I <= 128) or packed; against torch, and the same bits
    # on one and two threads
    m = lf.LSTM(I, H, seed=11)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((40, 13, I)).astype(np.float32)
    g_out = rng.standard_normal((40, 13, H)).astype(np.float32)
    runs = []
    for n in (1, 2):
        with lf.threads(n):
            _, _, cache = m.forward_train(x)
            runs.append(m.backward(cache, g_out))
    for name in runs[0].params:
        assert_array_equal(runs[0].params[name], runs[1].params[name], err_msg=name)
    zeros = np.zeros((1, 13, H), np.float32)
    _, t_dx, _, t_params = _torch_grads(m, x, (zeros, zeros), (g_out, zeros, zeros), None)
    assert_allclose(runs[0].input, t_dx, **GRAD_TOL[np.float32])
    for name, value in t_params.items():
        assert_allclose(runs[0].params[name], value, err_msg=name, **GRAD_TOL[np.float32])
