"""Training of lf.LSTM: the forward pass that keeps what backward needs, and backpropagation.

`LSTM.forward_train` and `LSTM.backward` are thin doors to `forward_train` / `backward` here; the
heavy work is one Cython call per layer (src/_forward.pyx with a cache, src/_backward.pyx).
"""
from dataclasses import dataclass, field

import numpy as np

from . import _backward, _threads
from . import _validate as v
from ._core import BLAS_SINGLE, _REVERSE, _empty, run_layer


@dataclass
class TrainCache:
    """What `backward` needs from one `forward_train` call.

    Memory: per layer and direction, the activated gates (T, B, 4H) and cell states (T, B, H),
    plus the layer's input and output: about ``itemsize * T * B * (D * 5H + in + D*H_out)`` bytes
    per layer, e.g. 4 * 100 * 64 * (5*256 + 128 + 256) = 42.6 MB for T=100, B=64, H=256, I=128 in
    float32. (The backward pass adds a transient workspace of about the same size.)
    """

    model_id: int
    signature: tuple
    x: np.ndarray                 # (T, B, I) time-major input of layer 0
    layer_inputs: list            # per layer: (T, B, in_k), after dropout
    layer_outputs: list           # per layer: (T, B, D*H_out), before dropout
    gates: list                   # per layer: (D, T, B, 4H)
    cells: list                   # per layer: (D, T, B, H)
    h0: np.ndarray                # (L*D, B, H_out)
    c0: np.ndarray                # (L*D, B, H)
    masks: list                   # per layer but the last: dropout mask scaled by 1/(1-p), or None
    order: np.ndarray
    lengths: np.ndarray
    padded: bool
    batched: bool
    consumed: bool = field(default=False)
    version: int = -1             # the model's parameter version at forward_train (see backward)


@dataclass
class Gradients:
    """The result of `LSTM.backward`.

    input : ndarray, the gradient of the loss with respect to x, shape of x
    hx : tuple (dh0, dc0), with the shapes of (h0, c0)
    params : dict, name -> gradient, the keys and shapes of ``state_dict()``
    """

    input: np.ndarray
    hx: tuple
    params: dict


# the caches of full-length batches are left unfilled: zeroing them cost (100,256,64,64) 1.5 ms
# of a 22 ms forward (a test fills them with NaN instead, to show every row is written)
_uninitialised = np.empty


def _signature(model):
    return (model.input_size, model.hidden_size, model.num_layers, model.bias, model.batch_first,
            model.bidirectional, model.proj_size, model.dtype.str)


def _aliases(ours, given):
    """Whether `ours` may share memory with what the caller passed (an array, or any object
    numpy views without copying: memoryviews, buffers, tensors)."""
    if isinstance(given, (list, tuple)) or given is None:
        return False
    try:
        return np.may_share_memory(ours, given if isinstance(given, np.ndarray) else np.asarray(given))
    except Exception:   # something numpy cannot view: the conversion made a copy already
        return False


def forward_train(model, x, hx=None, lengths=None, rng=None):
    """See LSTM.forward_train."""
    given_x, given_lengths = x, lengths
    x, h0, c0, lens, order, padded, batched = model._prepare(x, hx, lengths)
    # the cache owns what backward reads: _prepare returns the caller's own array when it is
    # contiguous and of the model's dtype (and a view of it for unbatched x), which the caller
    # may change before backward
    if _aliases(x, given_x):
        x = x.copy()
    if lengths is not None and _aliases(lens, given_lengths):
        lens = lens.copy()
    seq_len, batch, _ = x.shape
    D, H, L = model.num_directions, model.hidden_size, model.num_layers
    h_n, c_n = h0.copy(), c0.copy()
    n_threads = _threads.get_num_threads()
    alloc = np.zeros if padded else _uninitialised   # full length: the kernel writes every row
    inputs, outputs, gates, cells, masks = [], [], [], [], []
    layer_input = x
    if model.dropout > 0 and L > 1 and rng is None:
        rng = model._dropout_rng
    with BLAS_SINGLE:
        for k in range(L):
            y = alloc((seq_len, batch, D * model.hidden_out), model.dtype)
            g = alloc((D, seq_len, batch, 4 * H), model.dtype)
            c = alloc((D, seq_len, batch, H), model.dtype)
            run_layer(layer_input, model._w_ih[k], model._w_hh[k], model._bias_sums(k),
                      model._w_hr[k] if model.proj_size else None, order, lens,
                      h_n[k * D:(k + 1) * D], c_n[k * D:(k + 1) * D], y, n_threads,
                      cache_gates=g, cache_c=c, mode=model._recurrence_mode)
            inputs.append(layer_input)
            outputs.append(y)
            gates.append(g)
            cells.append(c)
            if k < L - 1 and model.dropout > 0:
                keep = 1.0 - model.dropout
                mask = (rng.random(y.shape) < keep).astype(model.dtype) / model.dtype.type(keep) \
                    if keep > 0 else np.zeros(y.shape, model.dtype)
                masks.append(mask)
                layer_input = y * mask
            else:
                masks.append(None)
                layer_input = y
    cache = TrainCache(id(model), _signature(model), x, inputs, outputs, gates, cells, h0, c0,
                       masks, order, lens, padded, batched, version=model._version)
    # the last layer's output stays in the cache (backward reads it): the caller gets a copy, so
    # writing into `out` cannot change the gradients
    out, state = model._finish(layer_input.copy() if layer_input is outputs[-1] else layer_input,
                               h_n, c_n, batched)
    return out, state, cache


def backward(model, cache, grad_out, grad_state=None):
    """See LSTM.backward."""
    if not isinstance(cache, TrainCache):
        raise TypeError(f"cache must be the third result of forward_train, got {type(cache).__name__}")
    if cache.model_id != id(model) or cache.signature != _signature(model):
        raise ValueError("cache comes from another model: pass the cache of this model's forward_train")
    if cache.version != model._version:
        raise ValueError(
            "backward: the model's parameters were modified in place (an optimizer step, "
            "load_state_dict, reset_parameters or load_checkpoint) after the forward_train that "
            "made this cache, so its activations belong to the old weights; run forward_train "
            "again with the current weights (torch: 'modified by an inplace operation')")
    seq_len, batch, _ = cache.x.shape
    D, H, L, H_out = model.num_directions, model.hidden_size, model.num_layers, model.hidden_out
    dt = model.dtype
    n_states = L * D
    out_shape = (seq_len, batch, D * H_out)
    g_out = v.float_array(grad_out, "grad_out", dt)
    if not cache.batched:
        v.shape(g_out, (seq_len, D * H_out), "grad_out", "the shape of out")
        g_out = g_out[:, None, :]
    elif model.batch_first:
        v.shape(g_out, (batch, seq_len, D * H_out), "grad_out", "the shape of out")
        g_out = np.ascontiguousarray(g_out.transpose(1, 0, 2))
    else:
        v.shape(g_out, out_shape, "grad_out", "the shape of out")
    if cache.padded:
        # outputs past a sequence's length are constants (0): no gradient flows from them
        valid = np.arange(seq_len)[:, None] < cache.lengths[None, :]
        g_out = g_out * valid[:, :, None]
    if grad_state is None:
        g_hn = np.zeros((n_states, batch, H_out), dt)
        g_cn = np.zeros((n_states, batch, H), dt)
    else:
        if not isinstance(grad_state, (tuple, list)) or len(grad_state) != 2:
            raise TypeError("grad_state must be a tuple (grad_h_n, grad_c_n) or None")
        g_hn = v.float_array(grad_state[0], "grad_h_n", dt)
        g_cn = v.float_array(grad_state[1], "grad_c_n", dt)
        hs, cs = ((n_states, batch, H_out), (n_states, batch, H)) if cache.batched else \
            ((n_states, H_out), (n_states, H))
        v.shape(g_hn, hs, "grad_h_n", "the shape of h_n")
        v.shape(g_cn, cs, "grad_c_n", "the shape of c_n")
        g_hn = g_hn.reshape(n_states, batch, H_out)
        g_cn = g_cn.reshape(n_states, batch, H)
    grad_h0 = np.empty((n_states, batch, H_out), dt)
    grad_c0 = np.empty((n_states, batch, H), dt)
    params = {}
    n_threads = _threads.get_num_threads()
    grad_y = g_out
    with BLAS_SINGLE:
        for k in reversed(range(L)):
            layer_in = cache.layer_inputs[k]
            grad_x = np.empty(layer_in.shape, dt)
            g_w_ih = np.empty_like(model._w_ih[k])
            g_w_hh = np.empty_like(model._w_hh[k])
            g_b = np.empty((D, 4 * H), dt)
            g_w_hr = np.empty_like(model._w_hr[k]) if model.proj_size else _empty(dt, 3)
            sl = slice(k * D, (k + 1) * D)
            _backward.backward_layer(
                layer_in, model._w_ih[k], model._w_hh[k],
                model._w_hr[k] if model.proj_size else _empty(dt, 3),
                cache.gates[k], cache.cells[k], cache.layer_outputs[k],
                np.ascontiguousarray(cache.h0[sl]), np.ascontiguousarray(cache.c0[sl]),
                np.ascontiguousarray(grad_y), np.ascontiguousarray(g_hn[sl]),
                np.ascontiguousarray(g_cn[sl]), cache.order, cache.lengths, _REVERSE[D],
                grad_x, grad_h0[sl], grad_c0[sl], g_w_ih, g_w_hh, g_b, g_w_hr, n_threads,
                model._recurrence_mode)
            for d in range(D):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                params["weight_ih" + sfx] = g_w_ih[d]
                params["weight_hh" + sfx] = g_w_hh[d]
                if model.bias:
                    params["bias_ih" + sfx] = g_b[d]
                    params["bias_hh" + sfx] = g_b[d].copy()
                if model.proj_size:
                    params["weight_hr" + sfx] = g_w_hr[d]
            if k > 0:
                mask = cache.masks[k - 1]
                grad_y = grad_x * mask if mask is not None else grad_x
    ordered = {name: params[name] for name in model._params}
    grad_input = grad_x
    if not cache.batched:
        return Gradients(grad_input[:, 0], (grad_h0[:, 0], grad_c0[:, 0]), ordered)
    if model.batch_first:
        grad_input = np.ascontiguousarray(grad_input.transpose(1, 0, 2))
    return Gradients(grad_input, (grad_h0, grad_c0), ordered)
