"""What the model classes, training, file formats and the ONNX operator share: the single door
to the forward kernel (`run_layer`), its placeholders, the BLAS guard and the checked copy of a
state_dict into live parameter views. It imports only the kernels, so every module above may
import it (the layers: kernels, _core, _train/_io/_onnx_graph, _lstm, then onnx/_fit/nn on top).
"""
import numpy as np

from . import _forward, _threading
from . import _validate as v

_EMPTY = {}


def _empty(dtype, ndim):
    """Size-0 placeholder for an optional kernel argument (no projection, no cache, ...)."""
    key = (np.dtype(dtype), ndim)
    if key not in _EMPTY:
        _EMPTY[key] = np.empty((1,) + (0,) * (ndim - 1), dtype=dtype)
    return _EMPTY[key]


# per dtype: the kernel specialised for it (skips the fused-type dispatch, ~0.4 us a call) and
# its 2-, 3- and 4-D placeholders
_FORWARD_BY_DTYPE = {
    np.dtype(dt): (_forward.forward_layer[name], _empty(dt, 2), _empty(dt, 3), _empty(dt, 4))
    for dt, name in ((np.float32, "float"), (np.float64, "double"))
}


_REVERSE = {1: np.zeros(1, dtype=np.intc), 2: np.array([0, 1], dtype=np.intc)}
_FULL = {}


def _full_lengths(batch, seq_len):
    """Read-only (lengths, order) of a batch without padding, kept for the next call's shapes
    (a few microseconds of every small call)."""
    key = (batch, seq_len)
    got = _FULL.get(key)
    if got is None:
        if len(_FULL) >= 64:
            _FULL.clear()
        lens = np.full(batch, seq_len, dtype=np.intp)
        order = np.arange(batch, dtype=np.intp)
        lens.flags.writeable = False
        order.flags.writeable = False
        got = _FULL[key] = (lens, order)
    return got


def run_layer(x, w_ih, w_hh, bias, w_hr, order, lengths, h, c, y, n_threads,
              cache_gates=None, cache_c=None, reverse=None, peephole=None, spec=None, mode=0,
              prepacked=None):
    """One layer, all directions: y and (h, c) in place. The single door to the forward kernel.

    mode: 0 lets the kernel pick its recurrence strategy from the shapes; 1 (chunked) and 2 (wide)
    force one, for tests and benchmarks. prepacked: _forward.pack_weights of these weights (a
    frozen model's), or None.
    """
    kernel = _FORWARD_BY_DTYPE.get(x.dtype)
    if kernel is None:
        raise TypeError(f"the forward kernel takes float32 or float64 arrays, got {x.dtype}")
    forward_layer, empty2, empty3, empty4 = kernel
    forward_layer(
        x, w_ih, w_hh, bias,
        w_hr if w_hr is not None else empty3,
        peephole if peephole is not None else empty2,
        order, lengths,
        reverse if reverse is not None else _REVERSE[w_ih.shape[0]],
        h, c, y,
        cache_gates if cache_gates is not None else empty4,
        cache_c if cache_c is not None else empty4,
        spec, n_threads, mode, prepacked,
    )


class _Blas:
    """`with _BLAS:` runs scipy's BLAS single-threaded while our own threads call it."""

    __slots__ = ()

    def __enter__(self):
        _threading.blas_single_enter()

    def __exit__(self, *exc):
        _threading.blas_single_exit()
        return False


BLAS_SINGLE = _Blas()


def _load_named(params, state_dict, strict, owner):
    """Copy `state_dict` into the live parameter views, checking names, shapes and dtypes first."""
    _commit_named(params, _stage_named(params, state_dict, strict, owner))


def _commit_named(params, staged):
    for name, arr in staged.items():
        params[name][...] = arr


def _stage_named(params, state_dict, strict, owner):
    """The checked, converted arrays of `state_dict` (nothing written yet)."""
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
    missing = [k for k in params if k not in state_dict]
    unexpected = [k for k in state_dict if k not in params]
    if missing or (strict and unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if strict and unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ValueError(f"{owner}.load_state_dict: " + "; ".join(parts) + f" (expected {list(params)})")
    staged = {}
    for name, p in params.items():
        value = state_dict[name]
        if hasattr(value, "detach"):   # a torch tensor
            value = value.detach().cpu().numpy()
        arr = v.float_array(value, f"state_dict[{name!r}]", p.dtype)
        v.shape(arr, p.shape, f"state_dict[{name!r}]")
        staged[name] = arr
    return staged   # all checked first: a bad entry leaves the model unchanged
