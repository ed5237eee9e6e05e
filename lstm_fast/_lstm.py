"""LSTM and LSTMCell: torch.nn.LSTM's shapes, names and semantics over the Cython kernels.

Parameters live in one packed array per layer and kind, with a leading direction axis, e.g.
``_w_ih[k]`` of shape (D, 4H, in_k); the names of `parameters()` (``weight_ih_l0``,
``weight_ih_l0_reverse``, ...) are views into them, so an optimizer updating a parameter in place
updates what the kernel reads. The gate order everywhere is torch's: i, f, g, o.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
State = tuple[Array, Array]

from . import _aligned, _cpu, _forward, _io, _lowp, _onnx_graph, _step, _threading, _threads, _train
from . import _validate as v
from ._core import BLAS_SINGLE, _empty, _full_lengths, _load_named, run_layer

# a frozen float32 model's steps of fewer rows run the StepPlan's packed products (its team
# splitting whole panels where measured faster, else one thread); from here on, on several
# threads, the sequence kernel itself (docs/design.md). Either way the bits of m(x).
_STEP_THREADED_ROWS = 8
# ... except below this many rows where the StepPlan's team may split the panels (weights of
# 1 MB and more, H a multiple of 32): each thread then reads its share of W for all rows, where
# the sequence kernel's threads each read all of W for theirs (AMD EPYC Zen 4, two threads,
# us a step, sequence kernel -> plan: (8,256) 86 -> 58, (16,256) 144 -> 102, (24,256) 212 ->
# 151, (16,512) 365 -> 345; at 32 rows about even)
_STEP_PANEL_ROWS = 32

# parameter versions: every in-place change of a model's parameters through the API takes the next
# number, so a training cache made before the change is recognised as stale by backward (one global
# counter: a model restored by pickling cannot reuse a number an old cache holds)
_VERSIONS = itertools.count(1)


class Parameters(dict):
    """What ``LSTM.parameters()`` returns: a dict of name -> live view, which also tells its model
    when an optimizer has updated the views (``lf.optim`` optimizers call ``mark_modified`` after
    every step), so that ``backward`` refuses a training cache made with the old weights.

    Writing into the views by hand is not seen: call ``mark_modified()`` after doing so (or run
    ``forward_train`` again before ``backward``).
    """

    def __init__(self, params, owner):
        super().__init__(params)
        self._owner = weakref.ref(owner)

    def mark_modified(self) -> None:
        """Record that the parameters changed in place (a new parameter version of the model)."""
        owner = self._owner()
        if owner is not None:
            owner._bump_version()

    def __reduce__(self):   # pickles as the plain dict it is (the weak reference does not pickle)
        return (dict, (dict(self),))


# the reduced-precision layer kernel (a FrozenLSTM's with precision bfloat16 or int8)
_LOWP_LAYER = _lowp.layer_forward


class LSTM:
    """A multi-layer LSTM with torch.nn.LSTM's arguments, shapes and state_dict names.

    For each step t and layer, with gates in the order i, f, g, o::

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)     f = sigmoid(W_if x + b_if + W_hf h + b_hf)
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)        o = sigmoid(W_io x + b_io + W_ho h + b_ho)
        c' = f * c + i * g                             h' = o * tanh(c')   (then h' = W_hr h' if proj_size)

    Parameters
    ----------
    input_size : int
        Features of each input step, I.
    hidden_size : int
        Features of the hidden and cell state, H.
    num_layers : int, default 1
        Stacked layers L; layer k > 0 reads the outputs of layer k - 1.
    bias : bool, default True
        Whether the layers have the biases b_ih and b_hh.
    batch_first : bool, default False
        Inputs and outputs are (B, T, features) instead of (T, B, features). The states are not
        affected (as in torch).
    dropout : float, default 0.0
        Dropout on the outputs of every layer but the last, in training only; inference ignores it
        (torch's eval mode).
    bidirectional : bool, default False
        Adds a reverse direction per layer, D = 2; outputs concatenate [forward, reverse].
    proj_size : int, default 0
        With ``0 < proj_size < hidden_size``, h is projected to proj_size features (LSTMP); the
        hidden output size H_out is then proj_size, else H.
    dtype : float32 or float64, default float32
        The precision of parameters, computations and outputs.
    seed : int or None
        Seed of the initialisation, uniform in +-1/sqrt(hidden_size) as torch.

    Notes
    -----
    Differences from torch: inputs are numpy arrays; floating inputs of another precision are
    converted to ``dtype`` (torch raises); variable lengths are given as ``lengths=`` instead of a
    PackedSequence; outputs are new C-contiguous arrays.

    For serving, ``freeze()`` returns an inference-only copy with fixed, prepacked weights.
    """

    # per layer, the weights packed for the float32 kernel once and for all (FrozenLSTM); None:
    # every call packs them (the parameters are live arrays that may change between calls)
    _packed: list | None = None
    # per layer, the reduced-precision weights of a FrozenLSTM (_lowp.Packed per direction) and
    # the kernel path they run on; None: the float32/float64 kernels
    _lowp: list | None = None
    _lowp_path = None
    _lowp_step = None   # its _lowp.StepPlan, made at the first step
    _version = 0    # see _VERSIONS; set by reset_parameters in __init__

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, dtype: npt.DTypeLike = np.float32, seed: int | None = None) -> None:
        self.input_size = v.size(input_size, "input_size")
        self.hidden_size = v.size(hidden_size, "hidden_size")
        self.num_layers = v.size(num_layers, "num_layers")
        self.proj_size = v.size(proj_size, "proj_size", minimum=0)
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size ({self.hidden_size}), got {self.proj_size}"
            )
        dropout = float(dropout)
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout}")
        self.dropout = dropout
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.dtype = v.model_dtype(dtype)
        self._recurrence_mode = 0   # 0: the kernel picks from the shapes; tests/benchmarks force 1 or 2
        self._step_plan = None      # built by the first step(): pointers to the parameter arrays
        self._allocate()
        self.reset_parameters(seed)
        self._dropout_rng = np.random.default_rng(None if seed is None else [seed, 1])

    # ----------------------------------------------------------------- parameters
    @property
    def num_directions(self):
        """D: 2 for a bidirectional model, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def hidden_out(self):
        """Features of h and of each direction's output: proj_size if set, else hidden_size."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _layer_input_size(self, layer):
        return self.input_size if layer == 0 else self.num_directions * self.hidden_out

    def _allocate(self):
        D, H, P = self.num_directions, self.hidden_size, self.proj_size
        dt = self.dtype
        self._w_ih = [_aligned.zeros((D, 4 * H, self._layer_input_size(k)), dt)
                      for k in range(self.num_layers)]
        self._w_hh = [_aligned.zeros((D, 4 * H, self.hidden_out), dt) for _ in range(self.num_layers)]
        self._b_ih = [_aligned.zeros((D, 4 * H), dt) for _ in range(self.num_layers)] if self.bias else None
        self._b_hh = [_aligned.zeros((D, 4 * H), dt) for _ in range(self.num_layers)] if self.bias else None
        self._w_hr = [_aligned.zeros((D, P, H), dt) for _ in range(self.num_layers)] if P else None
        self._params = {}
        for k in range(self.num_layers):
            for d in range(D):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                self._params["weight_ih" + sfx] = self._w_ih[k][d]
                self._params["weight_hh" + sfx] = self._w_hh[k][d]
                if self.bias:
                    self._params["bias_ih" + sfx] = self._b_ih[k][d]
                    self._params["bias_hh" + sfx] = self._b_hh[k][d]
                if P:
                    self._params["weight_hr" + sfx] = self._w_hr[k][d]

    def reset_parameters(self, seed=None):
        """Draw every parameter uniformly from [-1/sqrt(H), 1/sqrt(H)], in state_dict order."""
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self._params.values():
            p[...] = rng.uniform(-bound, bound, size=p.shape)
        self._bump_version()

    def _bump_version(self):
        self._version = next(_VERSIONS)

    def parameters(self) -> dict[str, Array]:
        """The parameters by torch name, as live views: writing into them changes the model.

        The dict is a `Parameters` (a dict subclass): lf.optim optimizers given it record each
        step as a new parameter version, and ``backward`` then refuses caches from before the
        step. Writing into the views by hand is the caller's business: call
        ``params.mark_modified()`` afterwards, or run ``forward_train`` again.
        ``state_dict()`` returns copies; a FrozenLSTM's views are read-only.
        """
        return Parameters(self._params, self)

    def state_dict(self) -> dict[str, Array]:
        """A copy of the parameters by torch name and shape (gate order i, f, g, o)."""
        return {name: p.copy() for name, p in self._params.items()}

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> None:
        """Load parameters by torch name, e.g. ``{k: v.numpy() for k, v in torch_lstm.state_dict().items()}``.

        Every key must be present with its exact shape; with ``strict`` (the default) unexpected
        keys are an error too. Floating values are converted to the model's dtype.
        """
        _load_named(self._params, state_dict, strict, type(self).__name__)
        self._bump_version()

    def num_parameters(self):
        """The number of parameter values (weights and biases of every layer and direction)."""
        return sum(p.size for p in self._params.values())

    def _bias_sums(self, layer):
        if not self.bias:
            return np.zeros((self.num_directions, 4 * self.hidden_size), self.dtype)
        return self._b_ih[layer] + self._b_hh[layer]

    def __repr__(self):
        extra = ""
        if self.num_layers != 1:
            extra += f", num_layers={self.num_layers}"
        if not self.bias:
            extra += ", bias=False"
        if self.batch_first:
            extra += ", batch_first=True"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.bidirectional:
            extra += ", bidirectional=True"
        if self.proj_size:
            extra += f", proj_size={self.proj_size}"
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra}, dtype={self.dtype.name})"

    # ----------------------------------------------------------------- inputs
    def _prepare(self, x, hx, lengths):
        """Validate and convert the call's arguments; returns time-major contiguous arrays."""
        x = v.float_array(x, "x", self.dtype)
        if x.ndim not in (2, 3):
            raise ValueError(
                f"x must be 3-D {'(B, T, input_size)' if self.batch_first else '(T, B, input_size)'}"
                f" or 2-D (T, input_size) unbatched, got {x.ndim}-D with shape {x.shape}"
            )
        batched = x.ndim == 3
        if not batched:
            x = x[:, None, :]
        elif self.batch_first:
            x = np.ascontiguousarray(x.transpose(1, 0, 2))
        seq_len, batch, features = x.shape
        if features != self.input_size:
            raise ValueError(f"x has {features} features, expected input_size={self.input_size}")
        if seq_len == 0:
            raise ValueError("x has 0 time steps; sequences need at least one step")
        if batch == 0:
            raise ValueError("x has a batch of 0 sequences")
        n_states = self.num_layers * self.num_directions
        if hx is None:
            h0 = np.zeros((n_states, batch, self.hidden_out), self.dtype)
            c0 = np.zeros((n_states, batch, self.hidden_size), self.dtype)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("hx must be a tuple (h0, c0)")
            h0 = v.float_array(hx[0], "h0", self.dtype)
            c0 = v.float_array(hx[1], "c0", self.dtype)
            if batched:
                v.shape(h0, (n_states, batch, self.hidden_out), "h0", "num_layers*num_directions, batch, H_out")
                v.shape(c0, (n_states, batch, self.hidden_size), "c0", "num_layers*num_directions, batch, hidden_size")
            else:
                v.shape(h0, (n_states, self.hidden_out), "h0", "num_layers*num_directions, H_out (unbatched)")
                v.shape(c0, (n_states, self.hidden_size), "c0", "num_layers*num_directions, hidden_size (unbatched)")
                h0, c0 = h0[:, None, :], c0[:, None, :]
            h0, c0 = h0.copy(), c0.copy()   # the kernels update the states in place
        if lengths is None:
            lens, order = _full_lengths(batch, seq_len)
            padded = False
        else:
            if not batched:
                raise ValueError("lengths needs batched input (T, B, I); unbatched x is one full sequence")
            lens = v.lengths(lengths, batch, seq_len)
            order = np.argsort(-lens, kind="stable").astype(np.intp, copy=False)
            padded = bool(lens.min() < seq_len)
        v.check_size_product(self.num_directions, seq_len, batch, 4 * self.hidden_size,
                             name="the input projection buffer")
        return x, h0, c0, lens, order, padded, batched

    # ----------------------------------------------------------------- forward
    def __call__(self, x: npt.ArrayLike, hx: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
                 lengths: npt.ArrayLike | None = None) -> tuple[Array, State]:
        """Run the LSTM over a batch of sequences.

        Parameters
        ----------
        x : ndarray of shape (T, B, input_size), (B, T, input_size) with batch_first, or (T, input_size)
            The input sequences; floating arrays of any precision and layout are accepted.
        hx : tuple (h0, c0), optional
            h0 of shape (L*D, B, H_out) and c0 of shape (L*D, B, H) (without the B axis for
            unbatched x); zeros when omitted.
        lengths : array-like of int, shape (B,), optional
            Valid steps of each right-padded sequence, in 1..T. Outputs past a length are 0 and
            h_n, c_n hold each sequence's state at its last valid step; the reverse direction starts
            at each sequence's own last step (torch's packed-sequence semantics).

        Returns
        -------
        out : ndarray of shape (T, B, D*H_out) ((B, T, D*H_out) with batch_first, (T, D*H_out) unbatched)
        (h_n, c_n) : ndarrays of shapes (L*D, B, H_out) and (L*D, B, H)
        """
        if self._lowp is not None and hx is None and lengths is None and not self.batch_first \
                and type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 3 \
                and x.flags.c_contiguous and x.shape[2] == self.input_size and x.size:
            # reduced precision, the plain call: no validation pass and no copies (~10 us)
            seq_len, batch, _ = x.shape
            n_states = self.num_layers * self.num_directions
            v.check_size_product(self.num_directions, seq_len, batch, 4 * self.hidden_size,
                                 name="the input projection buffer")
            h_n = np.zeros((n_states, batch, self.hidden_out), np.float32)
            c_n = np.zeros((n_states, batch, self.hidden_size), np.float32)
            lens, order = _full_lengths(batch, seq_len)
            out = self._forward_lowp(x, h_n, c_n, lens, order, np.empty, _threads.get_num_threads())
            return out, (h_n, c_n)
        if hx is None and lengths is None and not self.batch_first and self._lowp is None:
            with BLAS_SINGLE:
                plain = _forward.forward_plain(x, self._w_ih, self._w_hh, self._b_ih, self._b_hh,
                                               self._w_hr, _threads.get_num_threads(),
                                               self._recurrence_mode, self._packed)
            if plain is not None:    # a C-contiguous (T, B, I) array of the model's dtype
                return plain[0], (plain[1], plain[2])
        x, h_n, c_n, lens, order, padded, batched = self._prepare(x, hx, lengths)
        out = self._forward(x, h_n, c_n, lens, order, padded, _threads.get_num_threads())
        return self._finish(out, h_n, c_n, batched)

    def _forward(self, x, h_n, c_n, lens, order, padded, n_threads, caches=None):
        seq_len, batch, _ = x.shape
        D = self.num_directions
        layer_input = x
        alloc = np.zeros if padded else np.empty   # padding positions of the outputs must read 0
        if self._lowp is not None:
            return self._forward_lowp(x, h_n, c_n, lens, order, alloc, n_threads)
        with BLAS_SINGLE:
            for k in range(self.num_layers):
                y = alloc((seq_len, batch, D * self.hidden_out), self.dtype)
                cache_g = cache_c = None
                if caches is not None:
                    cache_g, cache_c = caches[k]
                run_layer(layer_input, self._w_ih[k], self._w_hh[k], self._bias_sums(k),
                          self._w_hr[k] if self.proj_size else None, order, lens,
                          h_n[k * D:(k + 1) * D], c_n[k * D:(k + 1) * D], y, n_threads,
                          cache_gates=cache_g, cache_c=cache_c, mode=self._recurrence_mode,
                          prepacked=self._packed[k] if self._packed is not None else None)
                layer_input = y
        return layer_input

    def _forward_lowp(self, x, h_n, c_n, lens, order, alloc, n_threads):
        seq_len, batch, _ = x.shape
        D = self.num_directions
        run, precision, path = _LOWP_LAYER, self.precision, self._lowp_kernel
        layer_input = x
        for k, (ih, hh, hr, bias) in enumerate(self._lowp):
            y = alloc((seq_len, batch, D * self.hidden_out), np.float32)
            run(precision, path, layer_input, ih, hh, hr, bias, order, lens,
                h_n[k * D:(k + 1) * D], c_n[k * D:(k + 1) * D], y, n_threads)
            layer_input = y
        return layer_input

    def _finish(self, out, h_n, c_n, batched):
        if not batched:
            return out[:, 0, :], (h_n[:, 0, :], c_n[:, 0, :])
        if self.batch_first:
            out = np.ascontiguousarray(out.transpose(1, 0, 2))
        return out, (h_n, c_n)

    forward = __call__

    def freeze(self, precision: str = "float32") -> FrozenLSTM:
        """An inference-only copy of this model with fixed weights, for serving.

        precision: "float32" (the default), or "bfloat16" / "int8" for reduced-precision
        inference (float32 models only): the weights are converted once, here, and every call
        computes its products in that precision, with float32 inputs, states and outputs. See
        docs/precision.md for the numerics, the accuracy and which CPU path runs.

        The weights are copied now (later changes to this model do not reach the copy), made
        read-only, and packed once for the float32 kernels: every call of an LSTM packs W_ih and
        W_hh anew, because its parameters are live arrays that may have changed since the last
        call; a frozen model skips that (ONNX Runtime likewise packs weights once, when a session
        is made). That is most of a short batch-1 call's fixed cost: about 14 us of a
        (100, 1, 128, 128) call on one thread here. Calls, ``save`` and ``to_onnx`` work as for
        this model and give the same outputs bit for bit; training and writing parameters raise.
        ``step`` works as for this model; in float32 on the packed kernels it multiplies the
        packed weights as the sequence kernel does, so its steps give the bits of ``m(x)``
        (this model's ``step``, reading its live weights unpacked, agrees to rounding), and
        steps of several rows are faster (0.5x-0.67x the time at batch 4-32 on one thread).
        """
        return FrozenLSTM._copy_of(self, precision)

    # ----------------------------------------------------------------- training
    def forward_train(self, x: npt.ArrayLike, hx: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
                      lengths: npt.ArrayLike | None = None,
                      rng: np.random.Generator | None = None) -> tuple[Array, State, Any]:
        """The forward pass of training: like ``m(x, hx, lengths)``, also returning a cache.

        Inter-layer dropout (``dropout > 0``) acts here, with masks drawn from ``rng`` (a numpy
        Generator; by default the model's own, seeded by ``seed``).

        Returns
        -------
        out, (h_n, c_n) : as ``__call__``
        cache : TrainCache
            What ``backward`` needs; see TrainCache for its size in bytes.
        """

        return _train.forward_train(self, x, hx, lengths, rng)

    def backward(self, cache: Any, grad_out: npt.ArrayLike,
                 grad_state: tuple[npt.ArrayLike, npt.ArrayLike] | None = None) -> Any:
        """Backpropagation through time from the gradient of the loss with respect to ``out``.

        Parameters
        ----------
        cache : TrainCache from ``forward_train`` of this model
        grad_out : ndarray, the shape of ``out``
        grad_state : tuple (grad_h_n, grad_c_n) with the shapes of (h_n, c_n), or None (zeros)

        Returns
        -------
        Gradients
            ``.input`` (the shape of x), ``.hx`` = (dh0, dc0), ``.params`` = dict with the keys and
            shapes of ``state_dict()``. Bitwise the same for any thread count.
        """

        return _train.backward(self, cache, grad_out, grad_state)


    # ----------------------------------------------------------------- streaming
    def zero_state(self, batch_size: int | None = None) -> State:
        """Zero (h, c) for `step`: shapes (L, B, H_out) and (L, B, H); (L, H_out), (L, H) when None."""
        self._refuse_bidirectional_step()
        lead = (self.num_layers,) if batch_size is None else (self.num_layers, v.size(batch_size, "batch_size"))
        return (np.zeros(lead + (self.hidden_out,), self.dtype), np.zeros(lead + (self.hidden_size,), self.dtype))

    def _refuse_bidirectional_step(self):
        if self.bidirectional:
            raise ValueError("step runs one time step forward; a bidirectional model needs the whole "
                             "sequence (its reverse direction starts at the end): call the model instead")

    def step(self, x_t: npt.ArrayLike, state: tuple[npt.ArrayLike, npt.ArrayLike]) -> tuple[Array, State]:
        """One time step through all layers, for data that arrives step by step.

        Parameters
        ----------
        x_t : ndarray of shape (B, input_size) (whatever ``batch_first`` says), or (input_size,)
        state : (h, c) from ``zero_state`` or the previous ``step``: (L, B, H_out) and (L, B, H)

        Returns
        -------
        y_t : ndarray of shape (B, H_out) (or (H_out,)), the last layer's output (a view of the
            new state's h[-1], as torch's LSTMCell returns h itself)
        state : the new (h, c); the given arrays are not modified

        Running ``step`` over a sequence gives the same numbers as running the whole sequence:
        the same bits for a frozen float32 model (see ``freeze``), else equal to rounding.
        """
        self._refuse_bidirectional_step()
        x = x_t if (type(x_t) is np.ndarray and x_t.dtype == self.dtype and x_t.flags.c_contiguous) \
            else v.float_array(x_t, "x_t", self.dtype)
        batched = x.ndim == 2
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"x_t has shape {x.shape}, expected (B, {self.input_size}) or ({self.input_size},)")
        batch = x.shape[0] if batched else 1
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError("state must be the tuple (h, c) from zero_state() or step()")
        lead = (self.num_layers, batch) if batched else (self.num_layers,)
        h, c = state
        h_shape, c_shape = lead + (self.hidden_out,), lead + (self.hidden_size,)
        if not (type(h) is np.ndarray and h.dtype == self.dtype and h.shape == h_shape):
            h = v.float_array(h, "state h", self.dtype)
            v.shape(h, h_shape, "state h")
        if not (type(c) is np.ndarray and c.dtype == self.dtype and c.shape == c_shape):
            c = v.float_array(c, "state c", self.dtype)
            v.shape(c, c_shape, "state c")
        h = np.array(h, order="C")   # new arrays: the given state is not modified
        c = np.array(c, order="C")
        h3 = h if batched else h[:, None, :]
        c3 = c if batched else c[:, None, :]
        if self._lowp is not None:   # the sequence kernel's layers with T = 1, set up once
            lowp_plan = self._lowp_step
            if lowp_plan is None:
                lowp_plan = self._lowp_step = _lowp.StepPlan(
                    self.precision, self._lowp_kernel, self._lowp, self.input_size,
                    self.hidden_size, self.hidden_out)
            lowp_plan.run(x if batched else x[None, :], h3, c3, _threads.get_num_threads())
            return h[-1], (h, c)
        kernel = self.dtype == np.float32 and _forward.packed_gemm_active()
        packed = kernel and self._packed is not None
        n_threads = _threads.get_num_threads()
        plan = self._step_plan
        if plan is None:
            plan = self._step_plan = _step.StepPlan(
                [w[0] for w in self._w_ih], [w[0] for w in self._w_hh],
                [b[0] for b in self._b_ih] if self.bias else [None] * self.num_layers,
                [b[0] for b in self._b_hh] if self.bias else [None] * self.num_layers,
                [w[0] for w in self._w_hr] if self.proj_size else [None] * self.num_layers,
                self._packed)
        if ((packed and batch >= _STEP_THREADED_ROWS and n_threads > 1
                 and not (batch < _STEP_PANEL_ROWS and plan.panel_team_ok(n_threads)))
                or (kernel and not packed and batch > _step.GEMV_MAX_ROWS)):
            # the sequence kernel itself, T = 1: a frozen model's larger steps on its threads, and
            # a live model's of more rows than lf_gemv_rows takes, packing the weights as a call
            # does (faster than sgemm, which packs too). The bits of m(x).
            with BLAS_SINGLE:
                done = _forward.forward_plain(x[None], self._w_ih, self._w_hh, self._b_ih,
                                              self._b_hh, self._w_hr, n_threads,
                                              self._recurrence_mode, self._packed, h3, c3)
            if done is not None:
                return h[-1], (h, c)
        _run_step_plan(plan, x if batched else x[None, :], h3, c3, packed)
        return h[-1], (h, c)   # y_t is the last layer's h: a view of the new state, as in torch

    # ----------------------------------------------------------------- files and peers
    def save(self, path: Any) -> None:
        """Write weights and configuration to `path` (.npz, or .safetensors with the safetensors
        package); ``lstm_fast.load(path)`` reads it back without unpickling anything."""
        _io.save(self, path)

    @classmethod
    def from_torch(cls, module):
        """An LSTM with the configuration and weights of a ``torch.nn.LSTM``, or of a TorchScript
        module scripted from one (``torch.jit.script``)."""
        return _io.from_torch(module, LSTM)

    @classmethod
    def from_keras(cls, layer, dtype=None):
        """A callable mirroring a Keras 3 LSTM layer (or Bidirectional wrapper); see KerasLSTM."""
        return _io.from_keras(layer, dtype, LSTM)

    @classmethod
    def from_onnx(cls, path_or_model, node=None):
        """An LSTM from an ONNX model: the whole graph when it is one (stacked LSTM nodes and the
        layout glue that ``to_onnx`` and ``torch.onnx.export`` write), or the single LSTM node
        ``node`` (a name or an index of ``lstm_fast.onnx.lstm_nodes``) out of a larger graph,
        subgraphs included. Raises ValueError naming what the LSTM would not represent (a head,
        peepholes, clip, other activations, ...). See ``lstm_fast.onnx.to_lstm``."""
        return _onnx_graph.to_lstm(path_or_model, node, LSTM)

    def to_onnx(self, path=None, opset=14):
        """Export as an ONNX model (LSTM nodes); ONNX Runtime gives the same outputs. Models with
        proj_size have no ONNX LSTM equivalent and raise ValueError."""
        return _onnx_graph.export(self, path, opset)

    def __getstate__(self):
        return _io.getstate(self)

    def __setstate__(self, state):
        _io.setstate(self, state, LSTM)


class FrozenLSTM(LSTM):
    """What ``LSTM.freeze()`` returns: an LSTM for inference whose weights are fixed (a read-only
    copy, packed once for the float32 kernels). It is an LSTM for everything that reads the
    model (calls, ``step``, ``parameters``, ``state_dict``, ``save``, ``to_onnx``, pickling);
    ``forward_train``, ``backward``, ``load_state_dict`` and ``reset_parameters`` raise
    TypeError, and writing into its parameters raises ValueError (read-only arrays). To change
    the weights, change the LSTM it came from and freeze it again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a FrozenLSTM is made by LSTM.freeze(): build or load an LSTM, then freeze it")

    #: "float32", "bfloat16" or "int8": the precision of the products (see LSTM.freeze)
    precision = "float32"

    @classmethod
    def _copy_of(cls, model, precision="float32"):
        from . import _precision

        precision = _precision.check_precision(precision)
        if precision != "float32":
            _check_reduced(model, precision)
        frozen = cls.__new__(cls)
        frozen.__dict__.update(model.__dict__)
        frozen._step_plan = None          # pointers into the model's arrays, not these
        frozen._lowp = None
        frozen._lowp_step = None
        frozen.precision = precision
        frozen._allocate()
        for name, p in frozen._params.items():
            p[...] = model._params[name]
        frozen._seal()
        return frozen

    def _seal(self):
        for group in (self._w_ih, self._w_hh, self._b_ih, self._b_hh, self._w_hr):
            for a in group or ():
                a.flags.writeable = False
        for p in self._params.values():   # views made before the flag change keep their own
            p.flags.writeable = False
        if self.precision != "float32":
            self._seal_lowp()
            return
        packed = None
        if self.dtype == np.float32:
            placeholder = _empty(np.float32, 3)
            packed = [_forward.pack_weights(self._w_ih[k], self._w_hh[k],
                                            self._w_hr[k] if self.proj_size else placeholder)
                      for k in range(self.num_layers)]
        # None where the packed kernel is off or missing: the calls then take BLAS as usual
        self._packed = packed if packed is not None and packed[0] is not None else None

    def _seal_lowp(self):
        """Convert and pack the weights once for the reduced-precision kernels (_lowp)."""
        from . import _lowp, _precision

        self._packed = None
        self._lowp_step = None            # StepPlan, made at the first step
        self._lowp_path = _precision.path_for(self.precision)
        self._lowp_kernel = _precision._kernel_path(self._lowp_path)
        # AMX's one-row bfloat16 kernel (batch-1 steps) reads a layout of its own: half the
        # instructions of the standard one, as much memory again (lf_lp_pack_row_order)
        pack = functools.partial(_lowp.Packed, self.precision,
                                 row_order=self.precision == "bfloat16" and self._lowp_path == "amx")
        layers = []
        for k in range(self.num_layers):
            D = self.num_directions
            ih = [pack(self._w_ih[k][d]) for d in range(D)]
            hh = [pack(self._w_hh[k][d]) for d in range(D)]
            hr = [pack(self._w_hr[k][d]) for d in range(D)] if self.proj_size else None
            bias = np.ascontiguousarray(self._bias_sums(k), dtype=np.float32)
            bias.flags.writeable = False
            layers.append((ih, hh, hr, bias))
        self._lowp = layers

    @property
    def kernel_path(self) -> str:
        """The CPU path this model's products run on: amx, avx512_bf16, avx512_fma, avx2_fma,
        avx512_vnni, avx2 or generic for reduced precision (chosen at freeze); avx512, avx2 (the
        packed kernels) or blas for float32."""
        if self._lowp is not None:
            return self._lowp_path
        return _cpu.isa() if self._packed is not None else "blas"

    def freeze(self, precision: str | None = None) -> FrozenLSTM:
        """This model itself when `precision` is None or its own; else a copy in `precision`,
        converted from the same float32 weights."""
        if precision is None or precision == self.precision:
            return self
        return FrozenLSTM._copy_of(self, precision)

    def _refuse(self, what):
        raise TypeError(f"{what}: a FrozenLSTM's weights are fixed (inference only); change the "
                        f"LSTM it was frozen from and call its freeze() again")

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> None:
        """Refused: raises TypeError (a frozen model's weights are fixed)."""
        self._refuse("load_state_dict")

    def reset_parameters(self, seed=None):
        """Refused: raises TypeError (a frozen model's weights are fixed)."""
        self._refuse("reset_parameters")

    def forward_train(self, x: Any, hx: Any = None, lengths: Any = None, rng: Any = None) -> Any:
        """Refused: raises TypeError (a frozen model is for inference only)."""
        self._refuse("forward_train")

    def backward(self, cache: Any, grad_out: Any, grad_state: Any = None) -> Any:
        """Refused: raises TypeError (a frozen model is for inference only)."""
        self._refuse("backward")

    def __setstate__(self, state):
        super().__setstate__(state)
        self._step_plan = None
        self._lowp = None
        self.precision = state["config"].get("precision", "float32")
        self._seal()


def _run_step_plan(plan, x, h, c, packed=False):
    """plan.run on lstm_fast's threads where they may help, with the BLAS on one thread where the
    plan calls it (each skipped call saves 0.1-0.4 us of a 5 us step). packed: a frozen model's
    plan, its packed weights in use (no BLAS)."""
    n_threads = _threads.get_num_threads() if plan.may_split else 1
    if packed or x.shape[0] <= plan.gemv_rows:
        plan.run(x, h, c, n_threads, packed)
        return
    _threading.blas_single_enter()
    try:
        plan.run(x, h, c, n_threads, False)
    finally:
        _threading.blas_single_exit()


def _check_reduced(model, precision):
    """ValueError unless `model` can be converted to `precision` (float32, finite weights, int8
    sums within int32)."""
    if model.dtype != np.float32:
        raise ValueError(f"precision={precision!r} needs a float32 model; this one is "
                         f"{model.dtype.name} (build it with dtype=np.float32)")
    for name, p in model._params.items():
        if not np.isfinite(p).all():
            raise ValueError(f"precision={precision!r}: parameter {name!r} holds NaN or inf; "
                             f"reduced-precision weights must be finite")
        if precision == "bfloat16" and np.abs(p).max(initial=0.0) >= 3.3895e38:
            raise ValueError(f"precision='bfloat16': parameter {name!r} has values beyond "
                             f"bfloat16's largest finite number (3.39e38)")
    if precision == "int8":
        from ._lowp import MAX_INT8_INPUTS

        widest = max([model.input_size, model.num_directions * model.hidden_out, model.hidden_size])
        if widest > MAX_INT8_INPUTS:
            raise ValueError(f"precision='int8' sums at most {MAX_INT8_INPUTS} inputs exactly in "
                             f"int32; this model has a product over {widest}")


class LSTMCell:
    """One LSTM step, torch.nn.LSTMCell's arguments, shapes and parameter names.

    Call ``cell(x, (h, c))`` with x of shape (B, input_size) or (input_size,), h and c of shape
    (B, hidden_size) (or (hidden_size,)); returns the new (h, c). hx defaults to zeros.

    Parameters
    ----------
    input_size, hidden_size : int
        Features of the input, and of the hidden and cell state.
    bias : bool, default True
        Whether the cell has the biases b_ih and b_hh.
    dtype : float32 or float64, default float32
        The precision of parameters, computations and outputs.
    seed : int or None
        Seed of the uniform +-1/sqrt(hidden_size) initialisation.
    """

    def __init__(self, input_size, hidden_size, bias=True, dtype=np.float32, seed=None):
        self.input_size = v.size(input_size, "input_size")
        self.hidden_size = v.size(hidden_size, "hidden_size")
        self.bias = bool(bias)
        self.dtype = v.model_dtype(dtype)
        H = self.hidden_size
        self._w_ih = _aligned.zeros((1, 4 * H, self.input_size), self.dtype)
        self._w_hh = _aligned.zeros((1, 4 * H, H), self.dtype)
        self._params = {"weight_ih": self._w_ih[0], "weight_hh": self._w_hh[0]}
        if self.bias:
            self._b = _aligned.zeros((2, 4 * H), self.dtype)
            self._params["bias_ih"] = self._b[0]
            self._params["bias_hh"] = self._b[1]
        self.reset_parameters(seed)

    @classmethod
    def from_torch(cls, module):
        """An LSTMCell with the weights of a ``torch.nn.LSTMCell``, or of a TorchScript module
        scripted (or traced) from one."""
        return _io.cell_from_torch(module, cls)

    def reset_parameters(self, seed=None):
        """Draw every parameter uniformly from [-1/sqrt(H), 1/sqrt(H)], as torch does."""
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self._params.values():
            p[...] = rng.uniform(-bound, bound, size=p.shape)

    def parameters(self):
        """The parameters by torch name, as live views: writing into them changes the cell (the
        one documented exception to "no result aliases the model"; ``state_dict()`` copies)."""
        return dict(self._params)

    def state_dict(self):
        """A copy of the parameters by torch name."""
        return {name: p.copy() for name, p in self._params.items()}

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters by torch name (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``):
        every name must be present, with ``strict`` no other; all is checked before anything is
        written."""
        _load_named(self._params, state_dict, strict, "LSTMCell")

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_step_plan", None)   # pointers into this object's arrays: built again on use
        return state

    def __repr__(self):
        return f"LSTMCell({self.input_size}, {self.hidden_size}{'' if self.bias else ', bias=False'}, dtype={self.dtype.name})"

    def __call__(self, x, hx=None):
        """One step: returns (h', c'), each of shape (B, hidden_size) (or (hidden_size,))."""
        x = v.float_array(x, "x", self.dtype)
        if x.ndim not in (1, 2):
            raise ValueError(f"x must be 2-D (B, input_size) or 1-D (input_size,), got shape {x.shape}")
        batched = x.ndim == 2
        x2 = x if batched else x[None, :]
        batch, features = x2.shape
        if features != self.input_size:
            raise ValueError(f"x has {features} features, expected input_size={self.input_size}")
        if batch == 0:
            raise ValueError("x has a batch of 0 rows")
        H = self.hidden_size
        if hx is None:
            h = np.zeros((1, batch, H), self.dtype)
            c = np.zeros((1, batch, H), self.dtype)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("hx must be a tuple (h, c)")
            h = v.float_array(hx[0], "h", self.dtype)
            c = v.float_array(hx[1], "c", self.dtype)
            expected = (batch, H) if batched else (H,)
            v.shape(h, expected, "h")
            v.shape(c, expected, "c")
            h = h.reshape(1, batch, H).copy()
            c = c.reshape(1, batch, H).copy()
        if batch <= _step.GEMV_MAX_ROWS:
            # LSTM.step's kernel (one layer): the weights read in place, not packed every call
            plan = self.__dict__.get("_step_plan")
            if plan is None:
                biases = [[self._b[0]], [self._b[1]]] if self.bias else [[None], [None]]
                plan = self._step_plan = _step.StepPlan([self._w_ih[0]], [self._w_hh[0]], *biases, [None])
            _run_step_plan(plan, np.ascontiguousarray(x2), h, c)
        else:   # the sequence kernel, one step: its packing pays off on many rows
            bias = (self._b[0] + self._b[1])[None, :] if self.bias else np.zeros((1, 4 * H), self.dtype)
            y = np.empty((1, batch, H), self.dtype)
            lens = np.ones(batch, dtype=np.intp)
            order = np.arange(batch, dtype=np.intp)
            with BLAS_SINGLE:
                run_layer(x2[None], self._w_ih, self._w_hh, bias, None, order, lens, h, c, y,
                          _threads.get_num_threads())
        if batched:
            return h[0], c[0]
        return h[0, 0], c[0, 0]

    forward = __call__


def load(path: Any, *, max_params: int = _io.DEFAULT_MAX_PARAMS, allow_nonfinite: bool = False) -> LSTM:
    """An lf.LSTM from a file written by ``LSTM.save`` (.npz or .safetensors).

    The file is checked before anything is built: its configuration (strict types), the names,
    dtypes and shapes of its tensors (from the headers, without reading the data), a cap on the
    parameter count, then the data: its digest (files without one, written elsewhere, load
    without this check) and that every weight is finite. Nothing is unpickled: a model file
    cannot run code. See docs/files.md.

    Parameters
    ----------
    path : str or os.PathLike, ending in .npz or .safetensors
    max_params : int, default 2**28
        Refuse files whose configuration declares more parameters.
    allow_nonfinite : bool, default False
        Load weights holding NaN or inf (refused otherwise).

    Raises
    ------
    ValueError
        For every truncated, corrupt, hostile or mismatched file, naming the file and the fault.
    """
    return _io.load(path, LSTM, max_params=max_params, allow_nonfinite=allow_nonfinite)
