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

    ``out = layer(x)`` with x (B, T, I) returns what the Keras layer returns: the last output or the
    whole sequence (``return_sequences``), followed by the final states (``return_state``);
    ``go_backwards`` reads the sequence from its end (and returns the outputs in that order, as
    Keras does). ``.model`` is the lf.LSTM underneath (batch_first=True).
    """

    def __init__(self, model, return_sequences, return_state, go_backwards, merge_mode=None):
        self.model = model
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.go_backwards = go_backwards
        self.merge_mode = merge_mode

    def __call__(self, x, initial_state=None):
        x = np.asarray(x)
        if self.go_backwards:
            x = x[:, ::-1]
        hx = None
        if initial_state is not None:
            h0, c0 = (np.asarray(s) for s in initial_state)
            hx = (h0[None], c0[None])
        out, (h_n, c_n) = self.model(x, hx)
        if self.merge_mode is not None:
            H = self.model.hidden_size
            fwd, bwd = out[..., :H], out[..., H:]
            if not self.return_sequences:
                fwd, bwd = fwd[:, -1], bwd[:, 0]
            merged = {"concat": lambda: np.concatenate([fwd, bwd], -1), "sum": lambda: fwd + bwd,
                      "ave": lambda: (fwd + bwd) / 2, "mul": lambda: fwd * bwd}[self.merge_mode]()
            if self.return_state:
                return [merged, h_n[0], c_n[0], h_n[1], c_n[1]]
            return merged
        seq = out if self.return_sequences else out[:, -1]
        if self.return_state:
            return [seq, h_n[0], c_n[0]]
        return seq


def _keras_weights(layer):
    cfg = layer.get_config()
    act, rec = cfg.get("activation"), cfg.get("recurrent_activation")
    if act != "tanh" or rec != "sigmoid":
        raise ValueError(f"only activation='tanh' with recurrent_activation='sigmoid' maps to "
                         f"torch's LSTM; the layer has {act!r} / {rec!r}")
    weights = [np.asarray(w) for w in layer.get_weights()]
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if cfg.get("use_bias", True) else None
    return cfg, kernel, recurrent, bias


def from_keras(layer, dtype=None):
    """A KerasLSTM (callable like the layer) from a Keras 3 ``LSTM`` layer or ``Bidirectional(LSTM)``.

    Keras' kernel (I, 4U), recurrent_kernel (U, 4U) and single bias (4U) share torch's gate order
    i, f, c, o: W_ih = kernel.T, W_hh = recurrent_kernel.T, b_ih = bias, b_hh = 0.
    """
    from ._lstm import LSTM

    wrapper = None
    if type(layer).__name__ == "Bidirectional":
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
    if wrapper is not None:
        return KerasLSTM(model, cfg0.get("return_sequences", False), cfg0.get("return_state", False),
                         False, merge_mode=wrapper.merge_mode or "concat")
    return KerasLSTM(model, cfg0.get("return_sequences", False), cfg0.get("return_state", False),
                     cfg0.get("go_backwards", False))


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
