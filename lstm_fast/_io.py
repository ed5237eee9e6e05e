"""Model files (.npz, .safetensors) that never unpickle, converters from torch and Keras, and the
pickling of models as weights + configuration (for Dask and multiprocessing)."""
from __future__ import annotations

import json
from typing import Any
import os

import numpy as np

from . import _validate as v

CONFIG_KEYS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
               "bidirectional", "proj_size")
FORMAT = "lstm_fast.LSTM/1"


def model_config(model):
    config = {k: getattr(model, k) for k in CONFIG_KEYS}
    config["dtype"] = model.dtype.name
    config["format"] = FORMAT
    return config


def _from_config(config, where):
    from ._lstm import LSTM

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{where} is not an lstm_fast model file (no '{FORMAT}' configuration)")
    missing = [k for k in CONFIG_KEYS + ("dtype",) if k not in config]
    if missing:
        raise ValueError(f"{where}: the configuration lacks {missing}")
    return LSTM(**{k: config[k] for k in CONFIG_KEYS}, dtype=config["dtype"])


def _suffix(path):
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in (".npz", ".safetensors"):
        raise ValueError(f"model files end in .npz or .safetensors, got {str(path)!r}")
    return suffix


def save(model, path):
    """Weights and configuration in one file; the format follows the suffix."""
    state = model.state_dict()
    config = json.dumps(model_config(model))
    if _suffix(path) == ".npz":
        np.savez(path, __config__=np.array(config), **state)
    else:
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise ImportError("safetensors files need the safetensors package: pip install safetensors") from None
        save_file({k: np.ascontiguousarray(a) for k, a in state.items()}, str(path),
                  metadata={"lstm_fast": config})


def load(path: Any) -> Any:
    """An lf.LSTM from a file written by ``LSTM.save`` (.npz or .safetensors).

    Nothing is unpickled (``allow_pickle=False``): a model file cannot run code. Truncated,
    corrupt or mismatched files raise ValueError.
    """
    path = str(path)
    if _suffix(path) == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise
        except Exception as exc:   # BadZipFile, EOFError, pickled objects, ...
            raise ValueError(f"{path!r} is not a readable .npz model file: {exc}") from None
        if "__config__" not in arrays:
            raise ValueError(f"{path!r} is not an lstm_fast model file (no configuration)")
        try:
            config = json.loads(str(arrays.pop("__config__")))
        except ValueError:
            raise ValueError(f"{path!r}: the configuration is not valid JSON") from None
    else:
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError("safetensors files need the safetensors package: pip install safetensors") from None
        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path!r} is not a readable .safetensors model file: {exc}") from None
        try:
            config = json.loads(meta["lstm_fast"])
        except (KeyError, ValueError):
            raise ValueError(f"{path!r} is not an lstm_fast model file (no configuration)") from None
    model = _from_config(config, repr(path))
    model.load_state_dict(arrays)
    return model


def from_torch(module):
    """An lf.LSTM with the configuration and weights of a torch.nn.LSTM (float32 or float64)."""
    import torch

    from ._lstm import LSTM

    if not isinstance(module, torch.nn.LSTM):
        raise TypeError(f"from_torch takes a torch.nn.LSTM, got {type(module).__name__}")
    dtype = module.weight_ih_l0.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the torch LSTM's parameters are {dtype}; convert it with .float() or .double()")
    model = LSTM(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                 batch_first=module.batch_first, dropout=module.dropout,
                 bidirectional=module.bidirectional, proj_size=module.proj_size,
                 dtype=np.float64 if dtype == torch.float64 else np.float32)
    model.load_state_dict({k: t.detach().cpu().numpy() for k, t in module.state_dict().items()})
    return model


class KerasLSTM:
    """A Keras 3 LSTM layer (or Bidirectional wrapper) on lstm_fast: call it like the Keras layer.

    ``out = layer(x, initial_state=None, mask=None)`` with x (B, T, I) returns what the Keras layer
    returns: the last output or the whole sequence (``return_sequences``), then the final states
    (``return_state``), as a list when there is more than one array. ``go_backwards`` reads the
    sequence from its end (and returns the outputs in that order, as Keras does).

    Bidirectional: ``merge_mode`` "concat", "sum", "ave", "mul", or None (the two directions
    returned separately, ``[forward, backward]`` followed by the states ``h_f, c_f, h_b, c_b``);
    ``initial_state`` is the list ``[h_f, c_f, h_b, c_b]`` as in Keras.

    ``mask`` (B, T) of booleans: right-padded masks (each row True for its first steps, then False)
    are supported; they become per-sequence lengths. As in Keras, the state stops at a sequence's
    last valid step, and the outputs at masked steps repeat the last valid output, or are 0 with
    ``zero_output_for_mask`` (Bidirectional sets that flag to ``return_sequences``); a
    ``go_backwards`` layer outputs 0 at the masked steps it meets first. Masks with gaps (a False
    followed by a True) raise ValueError.

    ``stateful=True`` layers keep their final states between calls as Keras does: each call starts
    from the previous call's final states (from the Keras layer's current states at conversion),
    the batch size is fixed, and ``reset_states()`` sets them to zero. ``states`` returns a copy.

    ``.model`` is the lf.LSTM underneath (batch_first=True).
    """

    def __init__(self, model, return_sequences, return_state, go_backwards, merge_mode=None,
                 bidirectional=False, stateful=False, zero_output_for_mask=False, states=None):
        self.model = model
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.go_backwards = go_backwards
        self.merge_mode = merge_mode
        self.bidirectional = bidirectional
        self.stateful = stateful
        self.zero_output_for_mask = zero_output_for_mask
        self._states = states     # stateful: (h, c) of shape (D, B, H), or None before a call

    # ------------------------------------------------------------------ stateful layers
    @property
    def states(self):
        """A stateful layer's current states as Keras orders them ([h, c] or [h_f, c_f, h_b, c_b]),
        copies; None before the first call (zeros then) or for a stateless layer."""
        if self._states is None:
            return None
        h, c = self._states
        return [a for d in range(h.shape[0]) for a in (h[d].copy(), c[d].copy())]

    def reset_states(self):
        """Zero the carried states of a stateful layer (Keras' ``reset_states``); no-op otherwise."""
        if self._states is not None:
            self._states = tuple(np.zeros_like(a) for a in self._states)

    reset_state = reset_states

    # ------------------------------------------------------------------ a call
    def _initial(self, initial_state, batch):
        n_dirs = 2 if self.bidirectional else 1
        dt = self.model.dtype
        if initial_state is None:
            if self.stateful and self._states is not None:
                h, c = self._states
                if h.shape[1] != batch:
                    raise ValueError(f"this stateful layer carries states for a batch of {h.shape[1]} "
                                     f"sequences, got {batch} (Keras fixes a stateful layer's batch "
                                     f"size; call reset_states() does not change it)")
                return h, c
            return None
        if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 2 * n_dirs:
            got = len(initial_state) if isinstance(initial_state, (list, tuple)) else type(initial_state).__name__
            raise ValueError(f"initial_state must be a list of {2 * n_dirs} arrays "
                             f"({'[h_f, c_f, h_b, c_b]' if n_dirs == 2 else '[h, c]'}) of shape "
                             f"(batch, units), got {got}")
        arrays = [v.float_array(_to_numpy(a), "initial_state", dt) for a in initial_state]
        H = self.model.hidden_size
        for a in arrays:
            v.shape(a, (batch, H), "initial_state entry", "batch, units")
        return np.stack(arrays[0::2]), np.stack(arrays[1::2])

    def __call__(self, x, initial_state=None, mask=None):
        x = _to_numpy(x)
        if x.ndim != 3 or x.shape[2] != self.model.input_size:
            raise ValueError(f"x has shape {x.shape}, expected (batch, timesteps, {self.model.input_size})")
        B, T = x.shape[0], x.shape[1]
        hx = self._initial(initial_state, B)
        lengths = None if mask is None else _mask_lengths(mask, B, T)
        run_len = None if lengths is None else np.maximum(lengths, 1)
        xs = x
        if self.go_backwards:
            if lengths is None:
                xs = x[:, ::-1]
            else:   # each sequence's valid steps, last first (the masked steps hold the state)
                k = np.arange(T)[None, :]
                idx = np.where(k < run_len[:, None], run_len[:, None] - 1 - k, k)
                xs = np.take_along_axis(x, idx[:, :, None], axis=1)
        out, (h_n, c_n) = self.model(xs, hx, run_len)
        H = self.model.hidden_size
        if lengths is not None and (lengths == 0).any():   # fully masked rows: nothing runs
            empty = lengths == 0
            out[empty] = 0
            if hx is None:
                h_n[:, empty] = 0
                c_n[:, empty] = 0
            else:
                h_n[:, empty] = hx[0][:, empty]
                c_n[:, empty] = hx[1][:, empty]
        if self.stateful:
            self._states = (h_n.copy(), c_n.copy())
        dirs = [out[..., d * H:(d + 1) * H] for d in range(h_n.shape[0])]
        seqs, lasts = [], []
        for d, seq in enumerate(dirs):
            backwards = self.go_backwards or d == 1   # d == 1: Keras' go_backwards backward layer
            zero = self.zero_output_for_mask
            h_last = h_n[d].copy()    # the last valid output; 0 for a fully masked row
            if lengths is not None:
                h_last[lengths == 0] = 0
            if lengths is not None:
                past = np.arange(T)[None, :] >= lengths[:, None]
                if not backwards and not zero:   # masked steps repeat the last valid output
                    seq = np.where(past[:, :, None], h_last[:, None, :], seq)
                elif backwards and d == 0:       # go_backwards: masked steps come first, 0
                    k = np.arange(T)[None, :] - (T - lengths[:, None])
                    seq = np.take_along_axis(seq, np.clip(k, 0, T - 1)[:, :, None], axis=1)
                    seq = np.where((k < 0)[:, :, None], 0, seq)
            seqs.append(seq)
            if not backwards and lengths is not None and zero:   # the last step is masked: 0
                h_last[lengths < T] = 0
            lasts.append(h_last)
        outs = seqs if self.return_sequences else lasts
        states = [a for d in range(h_n.shape[0]) for a in (h_n[d], c_n[d])]
        if self.bidirectional:
            fwd, bwd = outs
            if self.merge_mode is None:
                merged = [np.ascontiguousarray(fwd), np.ascontiguousarray(bwd)]
            else:
                merged = [{"concat": lambda: np.concatenate([fwd, bwd], -1), "sum": lambda: fwd + bwd,
                           "ave": lambda: (fwd + bwd) / 2, "mul": lambda: fwd * bwd}[self.merge_mode]()]
            result = merged + states if self.return_state else merged
            return result if len(result) > 1 else result[0]
        seq = np.ascontiguousarray(outs[0])
        if self.return_state:
            return [seq] + states
        return seq


def _to_numpy(value):
    if hasattr(value, "detach"):      # a torch tensor (Keras' torch backend)
        value = value.detach().cpu().numpy()
    elif not isinstance(value, np.ndarray) and hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def _mask_lengths(mask, batch, seq_len):
    """Lengths (B,) of a right-padded Keras mask (B, T); masks with gaps are refused."""
    m = _to_numpy(mask)
    if m.shape != (batch, seq_len):
        raise ValueError(f"mask has shape {m.shape}, expected (batch, timesteps) = ({batch}, {seq_len})")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "biuf" or not np.isin(m, (0, 1)).all():
            raise TypeError(f"mask must hold booleans (or 0/1), got dtype {m.dtype}")
        m = m.astype(bool)
    lengths = m.sum(axis=1).astype(np.intp)
    right_padded = m == (np.arange(seq_len)[None, :] < lengths[:, None])
    if not right_padded.all():
        row = int(np.flatnonzero(~right_padded.all(axis=1))[0])
        raise ValueError(f"mask row {row} is not right-padded (True for the first steps, then "
                         f"False): {m[row].astype(int).tolist()}; masks with gaps or left padding "
                         f"have no lengths equivalent")
    return lengths


_KERAS_ACCEPTED = "a built keras.layers.LSTM, or keras.layers.Bidirectional around an LSTM"


def _keras_kind(layer):
    names = [c.__name__ for c in type(layer).__mro__]
    what = f"{type(layer).__module__}.{type(layer).__qualname__}"
    if "LSTM" in names:
        return "LSTM"
    if "Bidirectional" in names:
        inner = getattr(layer, "forward_layer", None)
        if inner is None or "LSTM" not in [c.__name__ for c in type(inner).__mro__]:
            raise TypeError(f"from_keras takes {_KERAS_ACCEPTED}; got a Bidirectional wrapper around "
                            f"{type(inner).__name__}, which is not an LSTM")
        return "Bidirectional"
    hint = ""
    if "Sequential" in names or "Functional" in names or "Model" in names:
        hint = ("; for a model, convert its LSTM layers one by one (model.layers) and a Dense head "
                "with lf.Linear: see docs/keras.md")
    elif names[0] in ("GRU", "SimpleRNN", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"):
        hint = f"; lstm_fast runs LSTM cells only, a {names[0]} has other gate equations"
    elif "Dense" in names:
        hint = ("; a Dense layer maps to lf.Linear: Linear(kernel.shape[0], kernel.shape[1]) "
                "with weight = kernel.T, bias = bias (see docs/keras.md)")
    raise TypeError(f"from_keras takes {_KERAS_ACCEPTED}; got {what}{hint}")


def _keras_weights(layer):
    if not getattr(layer, "built", True) or not layer.get_weights():
        raise ValueError(f"the Keras layer {layer.name!r} is not built (it has no weights yet): call "
                         f"it on an input or layer.build((None, timesteps, features)) first")
    cfg = layer.get_config()
    act, rec = cfg.get("activation"), cfg.get("recurrent_activation")
    if act != "tanh" or rec != "sigmoid":
        raise ValueError(f"only activation='tanh' with recurrent_activation='sigmoid' maps to "
                         f"torch's LSTM; the layer has {act!r} / {rec!r}")
    weights = [np.asarray(w) for w in layer.get_weights()]
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if cfg.get("use_bias", True) else None
    return cfg, kernel, recurrent, bias


def _keras_states(layers, dt):
    """A stateful layer's current states as (h, c) of shape (D, B, H), or None before a build."""
    per = []
    for lay in layers:
        st = getattr(lay, "states", None)
        if st is None or any(s is None for s in st):
            return None
        per.append([np.array(_to_numpy(getattr(s, "value", s)), dt) for s in st])
    return np.stack([p[0] for p in per]), np.stack([p[1] for p in per])


def from_keras(layer, dtype=None):
    """A KerasLSTM (callable like the layer) from a Keras 3 ``LSTM`` layer or ``Bidirectional(LSTM)``.

    Keras' kernel (I, 4U), recurrent_kernel (U, 4U) and single bias (4U) share torch's gate order
    i, f, c, o: W_ih = kernel.T, W_hh = recurrent_kernel.T, b_ih = bias, b_hh = 0. The layer must
    be built; anything but an LSTM or a Bidirectional LSTM raises TypeError saying what it got.
    """
    from ._lstm import LSTM

    wrapper = None
    if _keras_kind(layer) == "Bidirectional":
        wrapper = layer
        fwd, bwd = layer.forward_layer, layer.backward_layer
        layers = [fwd, bwd]
    else:
        layers = [layer]
    parts = [_keras_weights(lay) for lay in layers]
    cfg0, kernel0, _, bias0 = parts[0]
    units, input_size = cfg0["units"], kernel0.shape[0]
    dt = np.dtype(dtype) if dtype is not None else (np.float64 if kernel0.dtype == np.float64 else np.float32)
    if wrapper is not None and any(p[0].get("go_backwards") for p in parts[:1]):
        raise ValueError("a Bidirectional wrapper around a go_backwards layer does not map")
    model = LSTM(input_size, units, bias=bias0 is not None, batch_first=True,
                 bidirectional=wrapper is not None, dtype=dt)
    state = {}
    for d, (cfg, kernel, recurrent, bias) in enumerate(parts):
        sfx = "_l0" + ("_reverse" if d else "")
        state["weight_ih" + sfx] = kernel.T
        state["weight_hh" + sfx] = recurrent.T
        if bias is not None:
            state["bias_ih" + sfx] = bias
            state["bias_hh" + sfx] = np.zeros_like(bias)
    model.load_state_dict(state)
    stateful = bool(cfg0.get("stateful", False))
    states = _keras_states(layers, dt) if stateful else None
    zero = bool(getattr(layers[0], "zero_output_for_mask", cfg0.get("zero_output_for_mask", False)))
    if wrapper is not None:
        return KerasLSTM(model, cfg0.get("return_sequences", False), cfg0.get("return_state", False),
                         False, merge_mode=wrapper.merge_mode, bidirectional=True, stateful=stateful,
                         zero_output_for_mask=zero, states=states)
    return KerasLSTM(model, cfg0.get("return_sequences", False), cfg0.get("return_state", False),
                     cfg0.get("go_backwards", False), stateful=stateful, zero_output_for_mask=zero,
                     states=states)


def getstate(model):
    """Pickle state of an LSTM: configuration + weights, nothing else (no kernel objects)."""
    return {"config": model_config(model), "state": model.state_dict()}


def setstate(model, state):
    from ._lstm import LSTM

    fresh = _from_config(state["config"], "the pickled model")
    fresh.load_state_dict(state["state"])
    model.__dict__.update(fresh.__dict__)
    if not isinstance(model, LSTM):
        raise TypeError("setstate needs an LSTM")
