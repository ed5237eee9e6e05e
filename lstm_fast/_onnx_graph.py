"""The machinery under ``lstm_fast.onnx`` (see its docstring): the LSTM operator, the graph
evaluator and its operator table, export, and the LSTM nodes of (larger) graphs. It sits below the
model classes, which it never imports: `to_lstm` is given the class to build."""
import dataclasses
import threading

import numpy as np

from . import _threads
from . import _validate as v
from ._core import BLAS_SINGLE, run_layer

# ONNX block q of the torch order [i, f, g, o] is ONNX block TORCH_FROM_ONNX[q] of [i, o, f, c]
TORCH_FROM_ONNX = [0, 2, 3, 1]
ONNX_FROM_TORCH = [0, 3, 1, 2]

# name -> (kernel code, uses alpha, uses beta, default alpha, default beta): the activation
# functions the operator spec lists, with ONNX Runtime's defaults
ACTIVATIONS = {
    "sigmoid": (0, False, False, 0.0, 0.0),
    "tanh": (1, False, False, 0.0, 0.0),
    "relu": (2, False, False, 0.0, 0.0),
    "affine": (3, True, True, 1.0, 0.0),
    "leakyrelu": (4, True, False, 0.01, 0.0),
    "thresholdedrelu": (5, True, False, 1.0, 0.0),
    "scaledtanh": (6, True, True, 1.0, 1.0),
    "hardsigmoid": (7, True, True, 0.2, 0.5),
    "elu": (8, True, False, 1.0, 0.0),
    "softsign": (9, False, False, 0.0, 0.0),
    "softplus": (10, False, False, 0.0, 0.0),
}
DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def _reorder_gates(w, from_order, hidden):
    """Permute the four gate blocks along axis 1 of (D, 4H, ...)."""
    blocks = w.reshape(w.shape[0], 4, hidden, *w.shape[2:])
    return np.ascontiguousarray(blocks[:, from_order].reshape(w.shape))


def _specs(activations, alphas, betas, n_dirs, clip, input_forget):
    """Per direction: None for the standard cell, else the kernel's cell options."""
    names = ["Sigmoid", "Tanh", "Tanh"] * n_dirs if activations is None else list(activations)
    if len(names) != 3 * n_dirs:
        raise ValueError(f"activations has {len(names)} entries, expected {3 * n_dirs} "
                         f"(f, g, h per direction)")
    alphas = list(alphas or [])
    betas = list(betas or [])
    specs = []
    for d in range(n_dirs):
        codes, a, b = [], [], []
        for name in names[3 * d:3 * d + 3]:
            key = str(name).lower()
            if key not in ACTIVATIONS:
                raise ValueError(f"activation {name!r} is not one the ONNX LSTM operator lists "
                                 f"({', '.join(sorted(ACTIVATIONS))})")
            code, uses_a, uses_b, def_a, def_b = ACTIVATIONS[key]
            codes.append(code)
            a.append(float(alphas.pop(0)) if uses_a and alphas else def_a)
            b.append(float(betas.pop(0)) if uses_b and betas else def_b)
        standard = codes == [0, 1, 1] and not clip and not input_forget
        specs.append(None if standard else (codes, a, b, float(clip or 0.0), int(input_forget)))
    return specs


def _once(cache, arrays, make, *extra):
    """make(), or what an earlier call of the same `arrays` (by identity) and `extra` key parts
    kept in `cache` (a session's packs; None: nothing is kept). The entry holds the arrays, so
    their ids are not reused by other objects while it lives."""
    if cache is None:
        return make()
    key = tuple(id(a) for a in arrays) + extra
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = (arrays, make())
    return hit[1]


class _Prepared:
    """An LSTM node's weights in lstm_fast's gate order, checked; with `pack`, float32 ones also
    packed for the float32 kernel, as a frozen model's are. Made once per session for constant
    weights (lstm()'s _weights_cache, through _once)."""

    def __init__(self, W, R, B, P, dt, n_dirs, pack):
        self.W = W = v.float_array(W, "W", dt)
        R = v.float_array(R, "R", dt)
        self.hidden = hidden = R.shape[-1] if R.ndim == 3 else -1
        v.shape(R, (n_dirs, 4 * hidden, hidden), "R", "num_directions, 4*hidden_size, hidden_size")
        v.shape(W, (n_dirs, 4 * hidden, W.shape[-1] if W.ndim == 3 else -1), "W",
                "num_directions, 4*hidden_size, input_size")
        if B is None:
            bias = np.zeros((n_dirs, 4 * hidden), dt)
        else:
            B = v.float_array(B, "B", dt)
            v.shape(B, (n_dirs, 8 * hidden), "B", "num_directions, 8*hidden_size")
            bias = B[:, :4 * hidden] + B[:, 4 * hidden:]
        self.w_ih = _reorder_gates(W, TORCH_FROM_ONNX, hidden)
        self.w_hh = _reorder_gates(R, TORCH_FROM_ONNX, hidden)
        self.bias = _reorder_gates(bias, TORCH_FROM_ONNX, hidden)
        self.peephole = None
        if P is not None:
            P = v.float_array(P, "P", dt)
            v.shape(P, (n_dirs, 3 * hidden), "P", "num_directions, 3*hidden_size")
            p_i, p_o, p_f = P[:, :hidden], P[:, hidden:2 * hidden], P[:, 2 * hidden:]
            self.peephole = np.ascontiguousarray(np.concatenate([p_i, p_f, p_o], axis=1))
        self.packed = None     # None: the kernel packs per call (or runs BLAS)
        if pack and dt == np.float32:
            from . import _forward

            self.packed = _forward.pack_weights(self.w_ih, self.w_hh,
                                                np.zeros((n_dirs, 0, hidden), np.float32))


def lstm(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
         hidden_size=None, direction="forward", layout=0, clip=None, input_forget=0,
         activations=None, activation_alpha=None, activation_beta=None, _weights_cache=None):
    """The ONNX ``LSTM`` operator: returns ``(Y, Y_h, Y_c)`` with the operator's shapes.

    Parameters follow the operator spec (inputs positional, attributes keyword):
    X (T, B, I) ((B, T, I) with layout=1); W (D, 4H, I); R (D, 4H, H); B (D, 8H); sequence_lens (B,)
    integers in 0..T; initial_h, initial_c (D, B, H) ((B, D, H) with layout=1); P (D, 3H) peepholes
    [i, o, f]; direction "forward", "reverse" or "bidirectional"; clip > 0 clamps every gate's
    pre-activation; input_forget=1 couples the forget gate to the input gate (f = 1 - i);
    activations (3 per direction: f, g, h) with activation_alpha / activation_beta consumed in order
    by the functions that take them (defaults as ONNX Runtime).

    float32 and float64 (ONNX Runtime accepts only float32). Outputs past a sequence's length are
    0; Y_h and Y_c are the state at its last step, and 0 for a length of 0 (as ONNX Runtime).

    No argument is written to (read-only arrays are accepted); Y, Y_h and Y_c are new arrays.
    """
    X = np.asarray(X)
    if X.dtype not in v.FLOAT_DTYPES:
        raise TypeError(f"X must be float32 or float64, got {X.dtype}")
    dt = X.dtype
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'forward', 'reverse' or 'bidirectional', got {direction!r}")
    if layout not in (0, 1):
        raise ValueError(f"layout must be 0 or 1, got {layout!r}")
    n_dirs = DIRECTIONS[direction]
    if X.ndim != 3:
        raise ValueError(f"X must be 3-D, got shape {X.shape}")
    x = np.ascontiguousarray(X.transpose(1, 0, 2) if layout else X)
    seq_len, batch, input_size = x.shape
    prep = _once(_weights_cache, (W, R, B, P),
                 lambda: _Prepared(W, R, B, P, dt, n_dirs, pack=_weights_cache is not None),
                 dt.str, n_dirs)
    W, hidden, w_ih, w_hh, bias = prep.W, prep.hidden, prep.w_ih, prep.w_hh, prep.bias
    peephole = prep.peephole
    if hidden_size is not None and hidden_size != hidden:
        raise ValueError(f"hidden_size={hidden_size} but R has shape {np.shape(R)}")
    v.shape(W, (n_dirs, 4 * hidden, input_size), "W", "num_directions, 4*hidden_size, input_size")
    h, c = _initial_states(initial_h, initial_c, n_dirs, batch, hidden, layout, dt)
    lengths, order = _sequence_lengths(sequence_lens, batch, seq_len)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    specs = _specs(activations, activation_alpha, activation_beta, n_dirs, clip, input_forget)
    reverse = np.array([1] if direction == "reverse" else [0, 1][:n_dirs], np.intc)
    y = np.zeros((seq_len, batch, n_dirs * hidden), dt)
    n_threads = _threads.get_num_threads()
    with BLAS_SINGLE:
        if n_dirs == 1 or specs[0] == specs[1]:
            run_layer(x, w_ih, w_hh, bias, None, order, lengths, h, c, y, n_threads,
                      reverse=reverse, peephole=peephole, spec=specs[0], prepacked=prep.packed)
        else:   # each direction has its own activations: one kernel call per direction
            y_d = np.zeros((seq_len, batch, hidden), dt)
            for d in range(n_dirs):
                y_d[...] = 0
                run_layer(x, w_ih[d:d + 1], w_hh[d:d + 1], bias[d:d + 1], None, order, lengths,
                          h[d:d + 1], c[d:d + 1], y_d, n_threads, reverse=reverse[d:d + 1],
                          peephole=None if peephole is None else peephole[d:d + 1], spec=specs[d])
                y[:, :, d * hidden:(d + 1) * hidden] = y_d
    return _outputs(y, h, c, lengths, n_dirs, layout)


def _initial_states(initial_h, initial_c, n_dirs, batch, hidden, layout, dt):
    """The operator's initial states as new (D, B, H) arrays (zeros where not given)."""
    states = []
    for name, value in (("initial_h", initial_h), ("initial_c", initial_c)):
        if value is None:
            states.append(np.zeros((n_dirs, batch, hidden), dt))
        else:
            value = v.float_array(value, name, dt)
            expected = (batch, n_dirs, hidden) if layout else (n_dirs, batch, hidden)
            v.shape(value, expected, name)
            # a new array: the kernel writes the final state into it, never into the caller's
            states.append(np.array(value.transpose(1, 0, 2) if layout else value, order="C"))
    return states


def _sequence_lengths(sequence_lens, batch, seq_len):
    """sequence_lens checked, as intp (all seq_len when None), and the kernels' longest-first order."""
    if sequence_lens is None:
        lengths = np.full(batch, seq_len, np.intp)
    else:
        lengths = np.asarray(sequence_lens)
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"sequence_lens must be integers, got {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"sequence_lens has shape {lengths.shape}, expected ({batch},)")
        if lengths.size and (lengths.min() < 0 or lengths.max() > seq_len):
            raise ValueError(f"sequence_lens must lie in 0..{seq_len}")
        lengths = np.ascontiguousarray(lengths, np.intp)
    return lengths, np.argsort(-lengths, kind="stable").astype(np.intp)


def _outputs(y, h, c, lengths, n_dirs, layout):
    """Y, Y_h, Y_c in the operator's shapes from the kernels' y (T, B, D*H) and states (D, B, H);
    the state of a sequence of length 0 is 0 (as ONNX Runtime)."""
    seq_len, batch, _ = y.shape
    empty = lengths == 0
    if empty.any():
        h[:, empty] = 0
        c[:, empty] = 0
    Y = y.reshape(seq_len, batch, n_dirs, -1)
    if layout:
        return np.ascontiguousarray(Y.transpose(1, 0, 2, 3)), \
            np.ascontiguousarray(h.transpose(1, 0, 2)), np.ascontiguousarray(c.transpose(1, 0, 2))
    return np.ascontiguousarray(Y.transpose(0, 2, 1, 3)), h, c


# ---------------------------------------------------------------------------- model files
def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX model files need the onnx package: pip install onnx") from None
    return onnx


def _as_model(path_or_model):
    onnx = _onnx()
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    if isinstance(path_or_model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(path_or_model))
    try:
        return onnx.load(str(path_or_model))
    except Exception as exc:   # a truncated or foreign file
        raise ValueError(f"cannot read an ONNX model from {path_or_model!r}: {exc}") from None


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decode(x) for x in value]
    return value


# ---------------------------------------------------------------------------- graph operators
# (domain, op_type) -> function(args, attrs, ctx) returning the node's outputs. Everything but
# LSTM is numpy; an operator is added by decorating its function with @_op("Name").
OPS = {}


def _op(name, domain=""):
    def register(fn):
        OPS[(domain, name)] = fn
        return fn
    return register


class _Context:
    """What an operator may need beside its inputs: the model's opset of the default domain,
    and what a node prepares once per session."""

    def __init__(self, opset):
        self.opset = opset
        self.packs = {}   # per node, weights packed once for the session (_quantized_packs)
        self.const_ids = frozenset()   # the session's constants: only their packs are kept

    def cache_for(self, *arrays):
        """The session's pack cache when every one of `arrays` (None: absent) is one of its
        constants, else None: a fed weight is a new array object every run, and keeping its
        packs would grow the cache without end."""
        if all(a is None or id(a) in self.const_ids for a in arrays):
            return self.packs
        return None


def _ints(value):
    return [int(i) for i in np.asarray(value).reshape(-1)]


def _axes(args, attrs):
    """Squeeze/Unsqueeze/ReduceX axes: an input from opset 13 on, an attribute before."""
    if len(args) > 1 and args[1] is not None:
        return _ints(args[1])
    axes = attrs.get("axes")
    return None if axes is None else [int(i) for i in axes]


@_op("LSTM")
def _op_lstm(args, a, ctx):
    X, W, R, B, seq, h0, c0, P = list(args) + [None] * (8 - len(args))
    # the states are often views of one buffer (exporters slice them from one ConstantOfShape)
    # or feeds: the operator gets copies of its own
    h0, c0 = (None if s is None else np.array(s, copy=True) for s in (h0, c0))
    return lstm(X, W, R, B, seq, h0, c0, P, hidden_size=a.get("hidden_size"),
                direction=_decode(a.get("direction", b"forward")), layout=a.get("layout", 0),
                clip=a.get("clip"), input_forget=a.get("input_forget", 0),
                activations=_decode(a.get("activations")), activation_alpha=a.get("activation_alpha"),
                activation_beta=a.get("activation_beta"), _weights_cache=ctx.cache_for(W, R, B, P))


def _int8_weights(q, zero_point, scale, name, n_dirs, rows, cols, hidden):
    """(D, cols, rows) int8 of the node, its zero point and scale (per tensor [D] or per
    channel [D, rows]) -> the torch-order (D, rows, cols) integers and per-row scales."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"DynamicQuantizeLSTM: {name} must be int8 (quantize_dynamic with "
                        f"weight_type=QInt8), got {q.dtype}")
    v.shape(q, (n_dirs, cols, rows), name, "num_directions, in, 4*hidden_size")
    if scale is None:
        raise ValueError(f"DynamicQuantizeLSTM: {name} has no scale")
    zp = np.asarray(0 if zero_point is None else zero_point)
    if zp.dtype.kind not in "iu":
        raise TypeError(f"DynamicQuantizeLSTM: the zero point of {name} must be integers")
    per_row = []
    for what, arr in (("scale", np.asarray(scale, np.float64)), ("zero point", zp.astype(np.int16))):
        if arr.size == 1:              # one value for every direction
            arr = arr.reshape(())
        elif arr.shape == (n_dirs,):   # per tensor
            arr = arr[:, None]
        elif arr.shape != (n_dirs, rows):
            raise ValueError(f"DynamicQuantizeLSTM: the {what} of {name} has shape {arr.shape}, "
                             f"expected ({n_dirs},) per tensor or ({n_dirs}, {rows}) per channel")
        per_row.append(np.broadcast_to(arr, (n_dirs, rows)))
    sc, zp = per_row
    if not (np.isfinite(sc).all() and (sc > 0).all()):
        raise ValueError(f"DynamicQuantizeLSTM: the scales of {name} must be finite and > 0")
    sc = sc.astype(np.float32)
    ints = q.astype(np.int16).transpose(0, 2, 1) - zp[:, :, None]
    if ints.min(initial=0) < -128 or ints.max(initial=0) > 127:
        raise ValueError(f"DynamicQuantizeLSTM: {name} minus its zero point leaves -128..127")
    ints = _reorder_gates(ints, TORCH_FROM_ONNX, hidden)
    sc = _reorder_gates(sc[:, :, None], TORCH_FROM_ONNX, hidden)[:, :, 0]
    return ints.astype(np.int8), np.ascontiguousarray(sc)


def _quantized_packs(W, R, B, W_scale, W_zp, R_scale, R_zp, hidden, n_dirs, input_size, ctx):
    """The int8 kernels' packed weights (per direction) and summed bias of a node. A session
    passes the same initializer arrays every run: packed once per session (ctx.packs, by the
    arrays' identity, through _once); fed weights are packed every run and not kept."""
    from . import _lowp

    arrays = (W, R, B, W_scale, W_zp, R_scale, R_zp)

    def make():
        qi, si = _int8_weights(W, W_zp, W_scale, "W", n_dirs, 4 * hidden, input_size, hidden)
        qh, sh = _int8_weights(R, R_zp, R_scale, "R", n_dirs, 4 * hidden, hidden, hidden)
        if B is None:
            bias = np.zeros((n_dirs, 4 * hidden), np.float32)
        else:
            b = v.float_array(B, "B", np.float32)
            v.shape(b, (n_dirs, 8 * hidden), "B", "num_directions, 8*hidden_size")
            bias = _reorder_gates(b[:, :4 * hidden] + b[:, 4 * hidden:], TORCH_FROM_ONNX, hidden)
        return ([_lowp.Packed("int8", None, q=qi[d], q_scale=si[d]) for d in range(n_dirs)],
                [_lowp.Packed("int8", None, q=qh[d], q_scale=sh[d]) for d in range(n_dirs)],
                np.ascontiguousarray(bias, np.float32))

    return _once(ctx.cache_for(*arrays) if ctx is not None else None, arrays, make)


@_op("DynamicQuantizeLSTM", "com.microsoft")
def _op_dynamic_quantize_lstm(args, a, ctx):
    """ONNX Runtime's int8 LSTM (quantize_dynamic): the node's own int8 weights and scales on
    the int8 kernels; activations quantized per row at run time (lstm_fast's scheme), so the
    results agree with ONNX Runtime's to quantization error, not bit for bit."""
    from . import _lowp, _precision

    (X, W, R, B, seq, h0, c0, P, W_scale, W_zp, R_scale, R_zp) = list(args) + [None] * (12 - len(args))
    direction = _decode(a.get("direction", b"forward"))
    if direction not in ("forward", "bidirectional"):
        raise ValueError(f"DynamicQuantizeLSTM: direction={direction!r} is not supported on the "
                         f"int8 kernels (forward or bidirectional)")
    for name in ("clip", "activations", "activation_alpha", "activation_beta"):
        if a.get(name) is not None:
            raise ValueError(f"DynamicQuantizeLSTM: attribute {name} is not supported on the "
                             f"int8 kernels (standard cells only)")
    if a.get("input_forget", 0):
        raise ValueError("DynamicQuantizeLSTM: input_forget=1 is not supported on the int8 kernels")
    if P is not None:
        raise ValueError("DynamicQuantizeLSTM: peepholes (P) are not supported on the int8 kernels")
    x = np.ascontiguousarray(v.float_array(X, "X", np.float32))
    if x.ndim != 3:
        raise ValueError(f"DynamicQuantizeLSTM: X must be (seq_length, batch_size, input_size), "
                         f"got shape {x.shape}")
    T, batch, input_size = x.shape
    n_dirs = DIRECTIONS[direction]
    if np.ndim(W) != 3 or np.ndim(R) != 3:
        raise ValueError("DynamicQuantizeLSTM: W and R must be 3-D (num_directions, in, 4*hidden)")
    hidden = int(a.get("hidden_size") or np.shape(R)[1])
    if np.shape(R)[1] != hidden:
        raise ValueError(f"hidden_size={hidden} but R has shape {np.shape(R)}")
    ih, hh, bias = _quantized_packs(W, R, B, W_scale, W_zp, R_scale, R_zp, hidden, n_dirs,
                                    input_size, ctx)
    h, c = _initial_states(h0, c0, n_dirs, batch, hidden, 0, np.float32)
    lengths, order = _sequence_lengths(seq, batch, T)
    y = np.zeros((T, batch, n_dirs * hidden), np.float32)
    path = _precision._kernel_path(_precision.path_for("int8"))
    _lowp.layer_forward("int8", path, x, ih, hh, None, bias, order, lengths, h, c, y,
                        _threads.get_num_threads())
    return _outputs(y, h, c, lengths, n_dirs, 0)


@_op("Constant")
def _op_constant(args, a, ctx):
    from onnx import numpy_helper

    if "value" in a:
        return [numpy_helper.to_array(a["value"])]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return [np.array(a[key], dtype)]
    raise ValueError(f"Constant with attributes {sorted(a)}: lstm_fast reads value, value_float(s) "
                     f"and value_int(s)")


@_op("Identity")
def _op_identity(args, a, ctx):
    return [args[0]]


@_op("Shape")
def _op_shape(args, a, ctx):
    shape = np.array(np.shape(args[0]), np.int64)
    start, end = a.get("start", 0), a.get("end")
    return [shape[start:end]]


@_op("Size")
def _op_size(args, a, ctx):
    return [np.array(np.size(args[0]), np.int64)]


@_op("Gather")
def _op_gather(args, a, ctx):
    return [np.take(args[0], np.asarray(args[1]).astype(np.intp), axis=a.get("axis", 0))]


@_op("ConstantOfShape")
def _op_constant_of_shape(args, a, ctx):
    from onnx import numpy_helper

    value = numpy_helper.to_array(a["value"]).reshape(-1) if "value" in a else np.zeros(1, np.float32)
    return [np.full(_ints(args[0]), value[0], value.dtype)]


@_op("Expand")
def _op_expand(args, a, ctx):   # two-way broadcasting, as the operator's spec
    x = np.asarray(args[0])
    return [x * np.ones(_ints(args[1]), x.dtype)]


@_op("Slice")
def _op_slice(args, a, ctx):
    x = args[0]
    if len(args) > 1:   # opset 10 on: starts, ends, axes, steps are inputs
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
        steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, stop, step)   # python slicing clamps as the spec does
    return [x[tuple(index)]]


@_op("Unsqueeze")
def _op_unsqueeze(args, a, ctx):
    axes = _axes(args, a)
    out = np.asarray(args[0])
    for ax in sorted(i % (out.ndim + len(axes)) for i in axes):
        out = np.expand_dims(out, ax)
    return [out]


@_op("Squeeze")
def _op_squeeze(args, a, ctx):
    axes = _axes(args, a)
    return [np.squeeze(args[0], axis=None if axes is None else tuple(axes))]


@_op("Concat")
def _op_concat(args, a, ctx):
    return [np.concatenate([x for x in args if x is not None], axis=a["axis"])]


@_op("Transpose")
def _op_transpose(args, a, ctx):
    return [np.transpose(args[0], a.get("perm"))]


@_op("Reshape")
def _op_reshape(args, a, ctx):
    x, shape = args[0], _ints(args[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [np.reshape(x, shape)]


@_op("Flatten")
def _op_flatten(args, a, ctx):
    x = args[0]
    axis = a.get("axis", 1) % (x.ndim or 1) if x.ndim else 0
    return [np.reshape(x, (int(np.prod(x.shape[:axis])), -1))]


@_op("Range")
def _op_range(args, a, ctx):
    start, limit, delta = (np.asarray(x) for x in args)
    return [np.arange(start, limit, delta, dtype=start.dtype)]


@_op("Cast")
def _op_cast(args, a, ctx):
    from onnx import helper

    return [np.asarray(args[0]).astype(helper.tensor_dtype_to_np_dtype(a["to"]))]


@_op("MatMul")
def _op_matmul(args, a, ctx):
    return [np.matmul(args[0], args[1])]


@_op("Gemm")
def _op_gemm(args, a, ctx):
    A = args[0].T if a.get("transA", 0) else args[0]
    Bm = args[1].T if a.get("transB", 0) else args[1]
    out = A @ Bm
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        out = out * out.dtype.type(alpha)
    if len(args) > 2 and args[2] is not None:
        out = out + (args[2] if beta == 1.0 else args[2] * out.dtype.type(beta))
    return [out]


def _divide(x, y):   # integer division truncates, as the spec (shape arithmetic uses it)
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return (np.trunc(x / y)).astype(np.result_type(x, y))
    return np.divide(x, y)


def _sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))   # no overflow for large negative x


for _name, _fn in (("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply), ("Div", _divide)):
    _op(_name)(lambda args, a, ctx, fn=_fn: [fn(args[0], args[1])])

for _name, _fn in (("Sigmoid", _sigmoid), ("Tanh", np.tanh), ("Relu", lambda x: np.maximum(x, 0)),
                   ("Neg", np.negative), ("Exp", np.exp), ("Sqrt", np.sqrt), ("Abs", np.abs)):
    _op(_name)(lambda args, a, ctx, fn=_fn: [fn(np.asarray(args[0]))])


def _softmax(x, axis, log):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    norm = np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    return shifted - norm if log else np.exp(shifted - norm)


def _softmax_op(log):
    def run(args, a, ctx):
        x = np.asarray(args[0])
        if ctx.opset >= 13:
            return [_softmax(x, a.get("axis", -1), log)]
        axis = a.get("axis", 1) % x.ndim   # before opset 13: over the flattened trailing axes
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return [_softmax(flat, 1, log).reshape(x.shape)]
    return run


_op("Softmax")(_softmax_op(False))
_op("LogSoftmax")(_softmax_op(True))

# operators never evaluated at load even when their inputs are constants
_RUN_TIME_ONLY = {("", "LSTM")}
# nor reused between runs as functions of the input shapes (Session._static_plan)
_SHAPE_STATIC_NEVER = {("", "LSTM"), ("com.microsoft", "DynamicQuantizeLSTM")}
STATIC_CACHE_SHAPES = 16    # input shapes whose shape-derived values a session keeps


def _domain(node):
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _op_names():
    return ", ".join(sorted(name if not d else f"{d}.{name}" for d, name in OPS))


def _unsupported(node, where=""):
    what = node.op_type if not _domain(node) else f"{node.domain}.{node.op_type}"
    return ValueError(
        f"unsupported ONNX operator {what!r} (node {node.name!r}{where}); lstm_fast.onnx.load runs "
        f"{_op_names()}. To take an LSTM out of a larger graph, list its LSTM nodes with "
        f"lstm_fast.onnx.lstm_nodes(model) and convert one with lf.LSTM.from_onnx(model, node=...)")


def _opset(model):
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


class Session:
    """Runs an ONNX graph of LSTM nodes and the numpy operators of ``OPS`` (shape arithmetic,
    layout changes, Linear heads, activations) with ONNX Runtime's calling convention:
    ``sess.run(output_names, feeds)``.

    Made by ``lstm_fast.onnx.load``. Weights may be initializers or graph inputs. Nodes whose
    inputs are all constant are evaluated once here; nodes computed from the inputs' shapes
    alone (such as the zero initial states of torch's export) once per tuple of input shapes;
    the others (the LSTM nodes and whatever depends on the inputs' values) at every ``run``.
    """

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        for node in graph.node:
            if (_domain(node), node.op_type) not in OPS:
                raise _unsupported(node)
        self._ctx = _Context(_opset(model))
        consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._inputs = [i for i in graph.input if i.name not in consts]
        self._input_names = [i.name for i in self._inputs]
        self._input_set = frozenset(self._input_names)
        self._outputs = [o.name for o in graph.output]
        self._plan = []
        for node in graph.node:
            key = (_domain(node), node.op_type)
            if key not in _RUN_TIME_ONLY and all(not n or n in consts for n in node.input):
                outs = self._run_node(node, [consts[n] if n else None for n in node.input])
                consts.update((n, o) for n, o in zip(node.output, outs) if n)
            else:
                self._plan.append((node, OPS[key], _attrs(node)))
        self._consts = consts
        self._ctx.const_ids = frozenset(id(a) for a in consts.values())
        # Nodes computed from the inputs' shapes alone (Shape of an input, then shape arithmetic
        # and ConstantOfShape on constants: what torch's exporter writes for zero initial
        # states): evaluated once per tuple of input shapes and dtypes, then reused. Those
        # seven nodes cost more than ONNX Runtime's whole batch-1 call of a quantized LSTM.
        input_names = {i.name for i in self._inputs}
        static = set()
        self._static_plan, self._dynamic_plan = [], []
        for step in self._plan:
            node = step[0]
            args = [n for n in node.input if n]
            if node.op_type == "Shape" and _domain(node) == "" and args and args[0] in input_names:
                is_static = True
            else:
                is_static = ((_domain(node), node.op_type) not in _SHAPE_STATIC_NEVER
                             and all(n in consts or n in static for n in args))
            if is_static:
                static.update(n for n in node.output if n)
                self._static_plan.append(step)
            else:
                self._dynamic_plan.append(step)
        self._static_names = static
        self._const_roots = {_memory_root(a) for a in consts.values() if isinstance(a, np.ndarray)}
        self._static_cache = {}
        self._static_lock = threading.Lock()

    def get_inputs(self):
        """The graph inputs to feed (name, shape as declared)."""
        return [_IO(i.name, [d.dim_value or d.dim_param or None for d in i.type.tensor_type.shape.dim])
                for i in self._inputs]

    def get_outputs(self):
        """The graph's outputs (objects with ``.name``), as ONNX Runtime's session lists them."""
        return [_IO(name, None) for name in self._outputs]

    def _run_node(self, node, args, fn=None, attrs=None):
        fn = fn or OPS[(_domain(node), node.op_type)]
        try:
            outs = fn(args, _attrs(node) if attrs is None else attrs, self._ctx)
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise ValueError(f"ONNX node {node.name!r} ({node.op_type}) failed: {exc}") from None
        return [np.asarray(o) for o in outs]

    def _evaluate(self, input_feed):
        names = self._input_names
        if not hasattr(input_feed, "items"):
            raise TypeError(f"the feeds must be a dict of input name -> array, got {type(input_feed).__name__}")
        for name in names:
            if name not in input_feed:
                raise ValueError(f"missing input {name!r}; the graph takes {names}")
        unknown = set(input_feed) - self._input_set
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}; the graph takes {names}")
        values = dict(self._consts)
        for k, val in input_feed.items():
            arr = np.asarray(val)
            if isinstance(val, np.ndarray):   # a read-only view: no node may write into the feed
                arr = arr.view()
                arr.flags.writeable = False
            values[k] = arr
        if self._static_plan:
            key = tuple((k, values[k].shape, values[k].dtype.str) for k in sorted(input_feed))
            with self._static_lock:
                cached = self._static_cache.get(key)
            if cached is None:
                for node, fn, attrs in self._static_plan:
                    outs = self._run_node(node, [values[n] if n else None for n in node.input], fn,
                                          attrs)
                    values.update((n, o) for n, o in zip(node.output, outs) if n)
                cached = {n: values[n] for n in self._static_names}
                for arr in cached.values():
                    arr.flags.writeable = False    # shared by later runs: no node may write it
                with self._static_lock:
                    if len(self._static_cache) >= STATIC_CACHE_SHAPES:
                        self._static_cache.pop(next(iter(self._static_cache)))
                    self._static_cache[key] = cached
            values.update(cached)
        for node, fn, attrs in self._dynamic_plan:
            outs = self._run_node(node, [values[n] if n else None for n in node.input], fn, attrs)
            values.update((n, o) for n, o in zip(node.output, outs) if n)
        return values

    def run(self, output_names, input_feed):
        """Evaluate the graph: output_names (None for all) and a dict of input name -> array.
        The outputs are new arrays (never the feeds or the session's constants)."""
        names = self._outputs if output_names is None else list(output_names)
        missing = [n for n in names if n not in self._outputs]
        if missing:
            raise ValueError(f"unknown outputs {missing}; the graph has {self._outputs}")
        values = self._evaluate(input_feed)
        # the memory of a feed or constant is never handed out: an output whose array (or the
        # array it views) is one of theirs is copied (np.may_share_memory against every
        # constant cost 0.6 us a pair, ~30 us a run of a quantized LSTM graph)
        shared = self._const_roots | {_memory_root(x) for x in input_feed.values()
                                      if isinstance(x, np.ndarray)}
        out = []
        for n in names:
            value = values[n]
            if n in self._static_names or _memory_root(value) in shared:
                value = value.copy()
            out.append(np.ascontiguousarray(value))
        return out


def _memory_root(a):
    """The object that owns an array's memory (the end of its chain of bases): arrays made from
    one another by numpy share memory only if their roots are the same object."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return id(a)


class _IO:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


def load(path_or_model):
    """A Session for an ONNX model (file path, bytes or ModelProto) made of LSTM nodes."""
    return Session(_as_model(path_or_model))


def export(model, path=None, opset=14):
    """The ONNX model of an lf.LSTM: input "input" (T, B, I), outputs "output" (T, B, D*H),
    "h_n" and "c_n" (L*D, B, H), as lf.LSTM returns them (time-major; no initial states).
    Writes it to `path` when given; returns the ModelProto.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    if model.proj_size:
        raise ValueError("proj_size > 0 (LSTMP) has no ONNX LSTM equivalent: the projection feeds "
                         "back into the recurrence, which the operator's R cannot express")
    if model.batch_first:
        raise ValueError("export a model with batch_first=False (ONNX Runtime rejects layout=1)")
    sd, H, D = model.state_dict(), model.hidden_size, model.num_directions
    elem = TensorProto.DOUBLE if model.dtype == np.float64 else TensorProto.FLOAT
    nodes, inits, current, h_outs, c_outs = [], [], "input", [], []
    for k in range(model.num_layers):
        names = [f"_l{k}", f"_l{k}_reverse"][:D]
        W = _reorder_gates(np.stack([sd["weight_ih" + n] for n in names]), ONNX_FROM_TORCH, H)
        R = _reorder_gates(np.stack([sd["weight_hh" + n] for n in names]), ONNX_FROM_TORCH, H)
        inputs = [current, f"W{k}", f"R{k}"]
        inits += [numpy_helper.from_array(W, f"W{k}"), numpy_helper.from_array(R, f"R{k}")]
        if model.bias:
            B = np.concatenate([
                _reorder_gates(np.stack([sd["bias_ih" + n] for n in names]), ONNX_FROM_TORCH, H),
                _reorder_gates(np.stack([sd["bias_hh" + n] for n in names]), ONNX_FROM_TORCH, H)], axis=1)
            inits.append(numpy_helper.from_array(B, f"B{k}"))
            inputs.append(f"B{k}")
        nodes.append(helper.make_node("LSTM", inputs, [f"Y{k}", f"Y_h{k}", f"Y_c{k}"], hidden_size=H,
                                      direction="bidirectional" if D == 2 else "forward",
                                      name=f"lstm_l{k}"))
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]))
        inits.append(numpy_helper.from_array(np.array([0, 0, D * H], np.int64), f"shape{k}"))
        out = "output" if k == model.num_layers - 1 else f"layer{k}"
        nodes.append(helper.make_node("Reshape", [f"Yt{k}", f"shape{k}"], [out]))
        h_outs.append(f"Y_h{k}")
        c_outs.append(f"Y_c{k}")
        current = out
    nodes.append(helper.make_node("Concat", h_outs, ["h_n"], axis=0))
    nodes.append(helper.make_node("Concat", c_outs, ["c_n"], axis=0))
    graph = helper.make_graph(
        nodes, "lstm_fast",
        [helper.make_tensor_value_info("input", elem, ["T", "B", model.input_size])],
        [helper.make_tensor_value_info("output", elem, ["T", "B", D * H]),
         helper.make_tensor_value_info("h_n", elem, [model.num_layers * D, "B", H]),
         helper.make_tensor_value_info("c_n", elem, [model.num_layers * D, "B", H])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lstm_fast")
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, str(path))
    return proto


# ---------------------------------------------------------------------------- LSTM out of a graph
@dataclasses.dataclass(frozen=True)
class LSTMNode:
    """An LSTM node of an ONNX graph, as ``lstm_nodes`` lists it.

    ``graph`` is "main" or the path of the subgraph holding the node (``"main/If_0.then_branch"``);
    ``initial_states`` is "zeros" (absent or constant zeros), "input" (fed or computed at run
    time: the caller's to give) or "constant" (constant non-zero); ``refusal`` says why
    ``LSTM.from_onnx(model, node=...)`` cannot take the node (None when it can)."""

    name: str
    graph: str
    index: int
    input_size: int | None
    hidden_size: int | None
    direction: str
    layout: int
    bias: bool
    initial_states: str
    refusal: str | None

    @property
    def num_directions(self):
        """2 for a bidirectional node, else 1."""
        return DIRECTIONS.get(self.direction, 1)


_FOLD_ERRORS = (ValueError, TypeError, IndexError, KeyError)


# the order in which a node's subgraph attributes are searched: an If's then_branch before its
# else_branch (onnx.helper.make_node stores attributes sorted by name), any other in stored order
_BRANCH_ORDER = {"then_branch": 0, "else_branch": 1}


def _subgraphs(node):
    """[(attribute name, [GraphProto])] of a node's GRAPH / GRAPHS attributes, then before else."""
    from onnx import AttributeProto

    found = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            found.append((attr.name, [attr.g]))
        elif attr.type == AttributeProto.GRAPHS:
            found.append((attr.name, list(attr.graphs)))
    return sorted(found, key=lambda item: _BRANCH_ORDER.get(item[0], len(_BRANCH_ORDER)))


def _scopes(graph, path, outer, ctx, outer_failed=None):
    """Yields (graph, path, constants, failed) for `graph` and then every subgraph inside it
    (If, Loop, Scan bodies, at any depth, in node order). The constants are the initializers and
    the constant subexpressions visible in that graph, its enclosing graphs' included; `failed`
    maps the outputs of nodes whose inputs are all constant but which fail to the reason."""
    from onnx import numpy_helper

    consts, failed = dict(outer), dict(outer_failed or {})
    own = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for i in graph.input:   # a subgraph's inputs hide the enclosing names
        if i.name not in own:
            consts.pop(i.name, None)
            failed.pop(i.name, None)
    consts.update(own)
    for node in graph.node:
        key = (_domain(node), node.op_type)
        bad = [n for n in node.input if n in failed]
        if bad:   # computed from a failed constant: fails with it
            failed.update((n, failed[bad[0]]) for n in node.output if n)
            continue
        if key in OPS and key not in _RUN_TIME_ONLY and all(not n or n in consts for n in node.input):
            try:
                outs = OPS[key]([consts[n] if n else None for n in node.input], _attrs(node), ctx)
            except _FOLD_ERRORS as exc:   # evaluated at run time instead, where it fails again
                why = f"node {node.name!r} ({node.op_type}) fails on its constant inputs: {exc}"
                failed.update((n, why) for n in node.output if n)
                continue
            consts.update((n, np.asarray(o)) for n, o in zip(node.output, outs) if n)
    yield graph, path, consts, failed
    for node in graph.node:
        for name, subs in _subgraphs(node):
            for k, sub in enumerate(subs):
                label = f"{path}/{node.name or node.op_type}.{name}" + (f"[{k}]" if len(subs) > 1 else "")
                yield from _scopes(sub, label, consts, ctx, failed)


def _describe(node, path, index, consts, failed):
    """The LSTMNode of `node`, with every reason lf.LSTM cannot represent it."""
    a = _attrs(node)
    names = list(node.input) + [""] * (8 - len(node.input))
    direction = _decode(a.get("direction", b"forward"))
    D = DIRECTIONS.get(direction, 1)
    reasons = []
    if direction not in DIRECTIONS:
        reasons.append(f"direction {direction!r}")
    elif direction == "reverse":
        reasons.append("it runs in reverse only, which torch's layout cannot express")
    W, R = consts.get(names[1]), consts.get(names[2])
    B = consts.get(names[3]) if names[3] else None
    H = input_size = None
    if W is None or R is None:
        why = [failed[n] for n in names[1:3] if n in failed]
        reasons.append("its weights W and R are not constants of the graph"
                       + (f" ({why[0]})" if why else ""))
        if isinstance(a.get("hidden_size"), int) and a["hidden_size"] > 0:
            H = a["hidden_size"]   # what the states are checked against
    else:
        H = R.shape[-1] if R.ndim == 3 else None
        if R.ndim != 3 or R.shape[:2] != (D, 4 * H):
            reasons.append(f"R has shape {R.shape}, expected ({D}, 4*hidden_size, hidden_size)")
        elif W.ndim != 3 or W.shape[:2] != (D, 4 * H):
            reasons.append(f"W has shape {W.shape}, expected ({D}, {4 * H}, input_size)")
        else:
            input_size = W.shape[2]
        if a.get("hidden_size") is not None and a["hidden_size"] != H:
            reasons.append(f"its hidden_size attribute is {a['hidden_size']} but R has shape "
                           f"{R.shape} (hidden size {H})")
        if names[3] and B is None:
            reasons.append("its bias B is not a constant of the graph")
        elif B is not None and H is not None and B.shape != (D, 8 * H):
            reasons.append(f"B has shape {B.shape}, expected ({D}, {8 * H})")
    acts = _decode(a.get("activations"))
    if acts and [str(x).lower() for x in acts] != ["sigmoid", "tanh", "tanh"] * D:
        reasons.append(f"activations {acts} (torch's cell is Sigmoid, Tanh, Tanh)")
    if a.get("clip"):
        reasons.append(f"clip={a['clip']}")
    if a.get("input_forget", 0):
        reasons.append("input_forget=1 (coupled gates)")
    if names[7]:
        reasons.append("peepholes (input P)")
    if a.get("layout", 0):
        reasons.append("layout=1 (batch-major states and outputs); run it with lstm_fast.onnx.load")
    if names[4] and names[4] in consts:
        reasons.append("a constant sequence_lens (an lf.LSTM takes lengths= at each call)")
    states = "zeros"
    for k, what in ((5, "initial_h"), (6, "initial_c")):
        if not names[k]:
            continue
        if names[k] not in consts:
            states = "input"
            continue
        value = consts[names[k]]
        if H is not None and (value.ndim != 3 or value.shape[0] != D or value.shape[2] != H):
            reasons.append(f"the constant {what} has shape {value.shape}, which does not fit "
                           f"({D}, batch, {H})")
        elif np.any(value != 0):
            reasons.append(f"a constant non-zero {what} (an lf.LSTM takes the states at each call)")
            states = "constant"
    return LSTMNode(node.name, path, index, input_size, H, direction, int(a.get("layout", 0)),
                    bool(names[3]), states, "; ".join(reasons) or None)


def _find_lstms(model):
    """[(LSTMNode, NodeProto, constants)] of every LSTM node, subgraphs included, in graph order."""
    ctx = _Context(_opset(model))
    found = []
    for graph, path, consts, failed in _scopes(model.graph, "main", {}, ctx):
        for node in graph.node:
            if node.op_type == "LSTM" and not _domain(node):
                found.append((_describe(node, path, len(found), consts, failed), node, consts))
    return found


def lstm_nodes(path_or_model):
    """The LSTM nodes of an ONNX model (file path, bytes or ModelProto), those inside If / Loop /
    Scan subgraphs included: a list of ``LSTMNode`` (name, graph, index, input_size,
    hidden_size, direction, layout, bias, initial_states, refusal). Take one out with
    ``lf.LSTM.from_onnx(model, node=name_or_index)``."""
    return [info for info, _, _ in _find_lstms(_as_model(path_or_model))]


def _layer_state(k, W, R, B, H, state):
    w_ih = _reorder_gates(W, TORCH_FROM_ONNX, H)
    w_hh = _reorder_gates(R, TORCH_FROM_ONNX, H)
    for d in range(W.shape[0]):
        sfx = f"_l{k}" + ("_reverse" if d else "")
        state["weight_ih" + sfx] = w_ih[d]
        state["weight_hh" + sfx] = w_hh[d]
        if B is not None:
            state["bias_ih" + sfx] = _reorder_gates(B[:, :4 * H], TORCH_FROM_ONNX, H)[d]
            state["bias_hh" + sfx] = _reorder_gates(B[:, 4 * H:], TORCH_FROM_ONNX, H)[d]


def _build(layers, cls, batch_first=False):
    """A `cls` (lf.LSTM) of the stacked LSTM nodes `layers` [(LSTMNode, NodeProto, constants)]."""
    first = layers[0][0]
    for k, (info, _, _) in enumerate(layers[1:], 1):
        prev = layers[k - 1][0]
        expected = prev.num_directions * prev.hidden_size
        if (info.hidden_size, info.num_directions, info.bias) != (first.hidden_size, first.num_directions, first.bias):
            raise ValueError(f"LSTM node {info.name!r} has hidden size {info.hidden_size}, "
                             f"{info.num_directions} direction(s), bias {info.bias}, unlike node "
                             f"{first.name!r}: an lf.LSTM's layers agree on these")
        if info.input_size != expected:
            raise ValueError(f"LSTM node {info.name!r} reads {info.input_size} features, not the "
                             f"{expected} of node {prev.name!r} before it: they are not stacked layers")
    state, dtype = {}, np.float32
    for k, (info, node, consts) in enumerate(layers):
        names = list(node.input) + [""] * 8
        W, R = consts[names[1]], consts[names[2]]
        dtype = np.float64 if W.dtype == np.float64 else np.float32
        _layer_state(k, W, R, consts[names[3]] if names[3] else None, info.hidden_size, state)
    model = cls(first.input_size, first.hidden_size, num_layers=len(layers),
                 bidirectional=first.num_directions == 2, bias=first.bias, batch_first=batch_first,
                 dtype=dtype)
    model.load_state_dict(state)
    return model


# what an lf.LSTM's outputs may pass through in a graph it represents whole (and a Cast that
# keeps the dtype; one that changes it is named as dropped)
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Identity"}


def _batch_first(graph, node):
    """Whether the first LSTM node reads a graph input through Transpose(perm=[1, 0, 2])."""
    producers = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    name = node.input[0]
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    p = producers.get(name)
    return bool(p is not None and p.op_type == "Transpose" and list(_attrs(p).get("perm", [])) == [1, 0, 2]
                and p.input[0] in inputs)


def _changes_dtype(cast, values, dtype):
    """Whether a Cast node changes the dtype: from the evaluated `values` when they hold its
    input and output, else from its target against `dtype` (the LSTM's)."""
    from onnx import helper

    before, after = values.get(cast.input[0]), values.get(cast.output[0])
    if before is not None and after is not None:
        return before.dtype != after.dtype
    try:
        return helper.tensor_dtype_to_np_dtype(_attrs(cast).get("to", 0)) != dtype
    except (KeyError, ValueError, TypeError):   # an undefined target type: not the LSTM's
        return True


def _after_lstm(graph, values, dtype):
    """The "op_type ('name')" of nodes that compute on the LSTM nodes' outputs beyond layout
    changes, in graph order (a Cast counts when it changes the dtype, see _changes_dtype)."""
    downstream = {o for n in graph.node if n.op_type == "LSTM" for o in n.output if o}
    found = []
    for n in graph.node:
        if n.op_type in ("LSTM", "Shape", "Size") or not any(i in downstream for i in n.input):
            continue
        downstream.update(o for o in n.output if o)
        if n.op_type in _LAYOUT_OPS or (n.op_type == "Cast" and not _changes_dtype(n, values, dtype)):
            continue
        found.append(f"{n.op_type} ({n.name!r})")
    return found


def _before_lstm(graph, first, dtype):
    """The "op_type ('name')" of nodes on the data path from the graph inputs to the first LSTM
    node's input X beyond layout changes (what the features are computed with), in graph order.
    Shape arithmetic (what only depends on the inputs' shapes) is not on the data path."""
    inits = {t.name for t in graph.initializer}
    data = {i.name for i in graph.input if i.name not in inits}
    producer = {}
    for n in graph.node:
        if n.op_type not in ("Shape", "Size") and any(i in data for i in n.input):
            data.update(o for o in n.output if o)
            producer.update((o, n) for o in n.output if o)
    on_path, todo = set(), [first.input[0]]
    while todo:
        n = producer.get(todo.pop())
        if n is None or id(n) in on_path:
            continue
        on_path.add(id(n))
        todo.extend(i for i in n.input if i in data)
    return [f"{n.op_type} ({n.name!r})" for n in graph.node if id(n) in on_path
            and n.op_type not in _LAYOUT_OPS and not (n.op_type == "Cast" and not _changes_dtype(n, {}, dtype))]


def _verify(model, lf_model, first):
    """Run the graph and the lf.LSTM on the same random input; ValueError unless every graph
    output is one of the LSTM's (output, h_n, c_n)."""
    from onnx import helper

    sess = Session(model)
    graph = model.graph
    names = [i.name for i in sess._inputs]
    if len(names) not in (1, 3):
        raise ValueError(f"the graph takes the inputs {names}; an lf.LSTM takes x and optionally "
                         f"the states (h0, c0)")
    x_name = first.input[0]
    producers = {o: n for n in graph.node for o in n.output}
    while x_name not in names and x_name in producers and producers[x_name].input:
        x_name = producers[x_name].input[0]
    if x_name not in names:
        x_name = names[0]
    spec = next(i for i in sess._inputs if i.name == x_name)
    dims = [d.dim_value or None for d in spec.type.tensor_type.shape.dim]
    T, B = 3, 2
    if len(dims) == 3:
        t_dim, b_dim = (dims[1], dims[0]) if lf_model.batch_first else (dims[0], dims[1])
        T, B = t_dim or T, b_dim or B
    rng = np.random.default_rng(0)
    x_shape = (B, T, lf_model.input_size) if lf_model.batch_first else (T, B, lf_model.input_size)
    elem = spec.type.tensor_type.elem_type
    x_dtype = helper.tensor_dtype_to_np_dtype(elem) if elem else lf_model.dtype
    feeds = {x_name: rng.standard_normal(x_shape).astype(x_dtype)}
    hx = None
    if len(names) == 3:
        state_shape = (lf_model.num_layers * lf_model.num_directions, B, lf_model.hidden_size)
        hx = tuple(rng.standard_normal(state_shape).astype(lf_model.dtype) for _ in range(2))
        feeds.update(zip([n for n in names if n != x_name], hx))
    try:
        values = sess._evaluate(feeds)
    except ValueError as exc:
        raise ValueError(f"the graph does not run as the LSTM its nodes describe: {exc}") from None
    y, (h, c) = lf_model(feeds[x_name], hx)
    tol = dict(rtol=1e-4, atol=1e-5) if lf_model.dtype == np.float32 else dict(rtol=1e-9, atol=1e-11)
    unmatched = [f"{n!r} {values[n].shape} {values[n].dtype}" for n in sess._outputs
                 if not any(values[n].shape == o.shape and values[n].dtype == o.dtype
                            and np.allclose(values[n], o, **tol) for o in (y, h, c))]
    if unmatched:
        dropped = _after_lstm(graph, values, lf_model.dtype)
        what = (f"LSTM.from_onnx would drop what the graph computes after its LSTM nodes: "
                f"{', '.join(dropped)}" if dropped else
                "the graph's outputs are not those of the LSTM its nodes describe")
        raise ValueError(
            f"{what} (graph outputs {', '.join(unmatched)}; the lf.LSTM gives output {y.shape}, "
            f"h_n {h.shape}, c_n {c.shape}, {y.dtype}). Run the whole graph with lstm_fast.onnx.load, or take "
            f"the LSTM alone with LSTM.from_onnx(model, node=...) and apply the rest yourself")


def to_lstm(path_or_model, node, cls):
    """What ``lstm_fast.onnx.to_lstm`` does (see there), building a `cls` (lf.LSTM)."""
    model = _as_model(path_or_model)
    found = _find_lstms(model)
    if node is not None:
        if isinstance(node, bool) or not isinstance(node, (str, int, np.integer)):
            raise TypeError(f"node must be a node name or an index of lstm_nodes(model), got {node!r}")
        if isinstance(node, str):
            matches = [f for f in found if f[0].name == node] or [f for f in found if node in f[1].output]
        else:
            matches = [f for f in found if f[0].index == node]
        if not matches:
            listed = ", ".join(f"{i.index}: {i.name!r} in {i.graph}" for i, _, _ in found) or "none"
            raise ValueError(f"no LSTM node {node!r} in the ONNX model; its LSTM nodes: {listed}")
        if len(matches) > 1:
            raise ValueError(f"{len(matches)} LSTM nodes are named {node!r} "
                             f"({', '.join(m[0].graph for m in matches)}): give its index in lstm_nodes(model)")
        info = matches[0][0]
        if info.refusal:
            raise ValueError(f"LSTM node {info.name!r} ({info.graph}) has no lf.LSTM equivalent: {info.refusal}")
        return _build(matches[0:1], cls)
    top = [f for f in found if f[0].graph == "main"]
    if not top:
        if found:
            raise ValueError(
                f"the ONNX model's main graph has no LSTM node; {len(found)} sit inside subgraphs "
                f"({', '.join(f'{i.name!r} in {i.graph}' for i, _, _ in found)}): take one out with "
                f"LSTM.from_onnx(model, node=name) (lstm_fast.onnx.lstm_nodes lists them)")
        raise ValueError("the ONNX model has no LSTM node")
    foreign = [f"{n.op_type} ({n.name!r})" for n in model.graph.node
               if (_domain(n), n.op_type) not in OPS or any(a.type in (5, 10) for a in n.attribute)]
    if foreign:   # 5, 10: GRAPH, GRAPHS attributes (If, Loop, Scan)
        raise ValueError(f"the graph has operators an lf.LSTM does not represent: {', '.join(foreign)}; "
                         f"take an LSTM out with LSTM.from_onnx(model, node=...) "
                         f"(lstm_fast.onnx.lstm_nodes lists them)")
    for info, _, _ in top:
        if info.refusal:
            raise ValueError(f"LSTM node {info.name!r} has no lf.LSTM equivalent: {info.refusal}")
    lf_model = _build(top, cls, _batch_first(model.graph, top[0][1]))
    before = _before_lstm(model.graph, top[0][1], lf_model.dtype)
    if before:   # the graph does not feed its input to the LSTM: running it on x would mislead
        after = _after_lstm(model.graph, {}, lf_model.dtype)
        raise ValueError(
            f"LSTM.from_onnx would drop what the graph computes before its first LSTM node: "
            f"{', '.join(before)}" + (f", and after its LSTM nodes: {', '.join(after)}" if after else "")
            + ". Run the whole graph with lstm_fast.onnx.load, or take the LSTM alone with "
            "LSTM.from_onnx(model, node=...) and apply the rest yourself")
    _verify(model, lf_model, top[0][1])
    return lf_model
