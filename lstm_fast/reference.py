"""A small, readable numpy LSTM: the definition the kernels are checked against.

Written step by step from the equations, with torch's parameter names and gate order (i, f, g, o);
slow on purpose. Used by the tests and by `python -m lstm_fast demo`.
"""
import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def cell_step(x_t, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """One LSTM step for a batch: x_t (B, I), h (B, H_out), c (B, H) -> (h', c')."""
    gates = x_t @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = np.split(gates, 4, axis=-1)
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_new = sigmoid(o) * np.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.T
    return h_new, c_new


def lstm(x, params, num_layers=1, bidirectional=False, h0=None, c0=None, lengths=None):
    """Time-major forward: x (T, B, I) -> out (T, B, D*H_out), (h_n, c_n) (L*D, B, ...).

    `params` holds torch's state_dict names. With `lengths`, each sequence b only sees its first
    lengths[b] steps (the reverse direction starts at its own last step) and outputs past it are 0.
    """
    seq_len, batch, _ = x.shape
    dirs = 2 if bidirectional else 1
    hidden = params["weight_hh_l0"].shape[0] // 4
    h_out = params["weight_hh_l0"].shape[1]
    if lengths is None:
        lengths = np.full(batch, seq_len)
    if h0 is None:
        h0 = np.zeros((num_layers * dirs, batch, h_out), x.dtype)
        c0 = np.zeros((num_layers * dirs, batch, hidden), x.dtype)
    h_n, c_n = np.zeros_like(h0), np.zeros_like(c0)
    layer_in = x
    for k in range(num_layers):
        out = np.zeros((seq_len, batch, dirs * h_out), x.dtype)
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            p = [params.get(name + sfx) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")]
            for b in range(batch):
                h, c = h0[k * dirs + d, b:b + 1], c0[k * dirs + d, b:b + 1]
                steps = range(lengths[b])
                for t in (reversed(steps) if d else steps):
                    h, c = cell_step(layer_in[t, b:b + 1], h, c, *p)
                    out[t, b, d * h_out:(d + 1) * h_out] = h[0]
                h_n[k * dirs + d, b], c_n[k * dirs + d, b] = h[0], c[0]
        layer_in = out
    return layer_in, (h_n, c_n)
