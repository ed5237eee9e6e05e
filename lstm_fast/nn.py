"""A dense head and losses for training, each with its gradient (numpy; one GEMM per call)."""
from __future__ import annotations

import math
from typing import Any
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import _validate as v


@dataclass
class LinearGradients:
    """input: dL/dx (the shape of x); params: {"weight": (out, in), "bias": (out,)}."""

    input: np.ndarray
    params: dict


class Linear:
    """y = x @ weight.T + bias over the last axis, as torch.nn.Linear (names, shapes, init).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    dtype : float32 or float64
    seed : int or None, seed of the uniform +-1/sqrt(in_features) initialisation
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: npt.DTypeLike = np.float32, seed: int | None = None) -> None:
        self.in_features = v.size(in_features, "in_features")
        self.out_features = v.size(out_features, "out_features")
        self.dtype = v.model_dtype(dtype)
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.in_features)
        self._params = {"weight": rng.uniform(-bound, bound, (self.out_features, self.in_features)).astype(self.dtype)}
        if bias:
            self._params["bias"] = rng.uniform(-bound, bound, self.out_features).astype(self.dtype)

    def parameters(self) -> dict[str, npt.NDArray[Any]]:
        """Live views by name ("weight", "bias")."""
        return dict(self._params)

    def state_dict(self):
        """A copy of the parameters by torch name (``weight``, ``bias``)."""
        return {k: p.copy() for k, p in self._params.items()}

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters by torch name (``weight``, ``bias``): every name must be present,
        with ``strict`` no other; all is checked before anything is written."""
        from ._core import _load_named

        _load_named(self._params, state_dict, strict, "Linear")

    def _input(self, x):
        x = v.float_array(x, "x", self.dtype)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {x.shape}, expected (..., {self.in_features})")
        return x

    def __call__(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """x : ndarray of shape (..., in_features) -> (..., out_features)."""
        x = self._input(x)
        y = x @ self._params["weight"].T
        if "bias" in self._params:
            y += self._params["bias"]
        return y

    forward = __call__

    def backward(self, x: npt.ArrayLike, grad_y: npt.ArrayLike) -> LinearGradients:
        """Gradients for the input x given to the forward call and dL/dy."""
        x = self._input(x)
        g = v.float_array(grad_y, "grad_y", self.dtype)
        v.shape(g, x.shape[:-1] + (self.out_features,), "grad_y", "the shape of the output")
        x2 = x.reshape(-1, self.in_features)
        g2 = g.reshape(-1, self.out_features)
        params = {"weight": g2.T @ x2}
        if "bias" in self._params:
            params["bias"] = g2.sum(axis=0)
        return LinearGradients((g2 @ self._params["weight"]).reshape(x.shape), params)

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, dtype={self.dtype.name})"


def mse_loss(pred: npt.ArrayLike, target: npt.ArrayLike) -> tuple[float, npt.NDArray[Any]]:
    """Mean squared error over all elements; returns (loss, dL/dpred)."""
    pred = np.asarray(pred)
    target = np.asarray(target, dtype=pred.dtype)
    if pred.shape != target.shape:
        raise ValueError(f"target has shape {target.shape}, expected the shape of pred {pred.shape}")
    diff = pred - target
    return float(np.mean(diff * diff)), (2.0 / diff.size) * diff


def cross_entropy_loss(logits: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[float, npt.NDArray[Any]]:
    """Softmax cross-entropy, mean over rows; logits (N, C), integer labels (N,) in 0..C-1.

    Returns (loss, dL/dlogits); stable for large logits (the row maximum is subtracted).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {logits.shape}")
    if labels.dtype.kind not in "iu" or labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be integers of shape ({logits.shape[0]},), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    n = logits.shape[0]
    loss = -float(log_p[np.arange(n), labels].mean())
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1
    return loss, grad / n
