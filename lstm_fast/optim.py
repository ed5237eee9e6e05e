"""Optimizers over parameter dicts (live views, updated in place), and gradient-norm clipping.

>>> opt = lf.optim.Adam([model.parameters(), head.parameters()], lr=1e-3)
>>> opt.step([grads.params, head_grads.params])      # same structure as the parameters
"""
from __future__ import annotations

from typing import Any, Union

import math
import numbers

import numpy as np

Params = Union[dict[str, Any], list[dict[str, Any]]]


def _as_groups(params):
    if isinstance(params, dict):
        return [params], True
    groups = list(params)
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise TypeError("params must be a dict of name -> array, or a list of such dicts")
    return groups, False


def _flatten(groups):
    return [(i, name, p) for i, group in enumerate(groups) for name, p in group.items()]


def clip_grad_norm(grads: Params, max_norm: float) -> float:
    """Scale the gradients in place so that their global L2 norm is at most max_norm.

    grads : dict or list of dicts of arrays. Returns the norm before clipping.
    """
    groups, _ = _as_groups(grads)
    for i, name, g in _flatten(groups):
        if not (isinstance(g, np.ndarray) and g.flags.writeable):
            raise ValueError(f"clip_grad_norm scales the gradients in place; grads[{i}][{name!r}] "
                             f"is not a writable ndarray (pass the arrays of backward's result)")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    total = float(np.sqrt(sum(float(np.vdot(g, g)) for _, _, g in _flatten(groups))))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for _, _, g in _flatten(groups):
            g *= scale
    return total


def _real(value, name, low=None, high=None, low_open=False, high_open=False):
    """A finite real number within the bounds (bools, strings, NaN and inf are refused)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


class Optimizer:
    """Base: keeps the parameter views and a per-parameter state, saved and restored as arrays.

    After every ``step`` the optimizer tells the models whose ``parameters()`` dicts it was given
    that their parameters changed (``Parameters.mark_modified``), so that ``LSTM.backward``
    refuses a training cache made before the step.
    """

    SLOTS: tuple = ()    # the names of the per-parameter state arrays

    def __init__(self, params: Params, lr: float) -> None:
        self.lr = _real(lr, "lr", low=0.0, low_open=True)
        self._groups, self._single = _as_groups(params)
        self._entries = _flatten(self._groups)
        for i, name, p in self._entries:
            if not isinstance(p, np.ndarray) or not p.flags.writeable:
                what = "read-only" if isinstance(p, np.ndarray) else f"a {type(p).__name__}, not an ndarray"
                raise ValueError(f"parameter {name!r} (group {i}) is {what}: an optimizer updates "
                                 f"the live, writable arrays of model.parameters() in place "
                                 f"(a FrozenLSTM's cannot be trained)")
        self.state = {}          # (group, name, slot) -> array
        self.steps = 0

    def _grads(self, grads):
        groups, _ = _as_groups(grads)
        if len(groups) != len(self._groups):
            raise ValueError(f"grads has {len(groups)} groups, expected {len(self._groups)}")
        out = []
        for i, name, p in self._entries:
            if name not in groups[i]:
                raise ValueError(f"grads of group {i} lacks {name!r}")
            g = np.asarray(groups[i][name])
            if g.shape != p.shape:
                raise ValueError(f"grad {name!r} has shape {g.shape}, expected {p.shape}")
            out.append(g)
        return out

    def _slot(self, i, name, slot, like):
        key = (i, name, slot)
        if key not in self.state:
            self.state[key] = np.zeros_like(like)
        return self.state[key]

    def step(self, grads: Params) -> None:
        """Update every parameter in place from grads (the structure of the parameters); the
        gradients are only read."""
        checked = self._grads(grads)
        self.steps += 1
        try:
            for (i, name, p), g in zip(self._entries, checked):
                self._update(i, name, p, g.astype(p.dtype, copy=False))
        finally:
            for group in self._groups:
                mark = getattr(group, "mark_modified", None)
                if mark is not None:
                    mark()

    def state_dict(self):
        """Flat dict of arrays (npz-friendly): hyper-parameters, step count and slots."""
        out = {"__steps": np.array(self.steps), "__lr": np.array(self.lr)}
        for (i, name, slot), arr in self.state.items():
            out[f"{i}/{name}/{slot}"] = arr.copy()
        return out

    def state_shapes(self):
        """The keys ``state_dict`` may hold, with their shapes: ``__steps`` and ``__lr`` (always),
        and ``group/name/slot`` for every parameter and slot (present once a step made them)."""
        shapes = {"__steps": (), "__lr": ()}
        for i, name, p in self._entries:
            for slot in self.SLOTS:
                shapes[f"{i}/{name}/{slot}"] = p.shape
        return shapes

    def check_state_dict(self, state, where="optimizer state"):
        """Validate a ``state_dict`` as the constructor validates its arguments; returns
        (steps, lr, slots) without changing the optimizer. Raises ValueError/TypeError."""
        if not hasattr(state, "keys"):
            raise TypeError(f"{where} must be a mapping of names to arrays, got {type(state).__name__}")
        missing = [k for k in ("__steps", "__lr") if k not in state]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        steps = np.asarray(state["__steps"])
        if steps.shape != () or steps.dtype.kind not in "iu":
            raise ValueError(f"{where}: __steps must be an integer scalar, got {steps.dtype} "
                             f"of shape {steps.shape}")
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"{where}: __steps must be >= 0, got {steps}")
        lr = np.asarray(state["__lr"])
        if lr.shape != () or lr.dtype.kind not in "fiu":
            raise ValueError(f"{where}: __lr must be a real scalar, got {lr.dtype} of shape {lr.shape}")
        try:
            lr = _real(lr[()], f"{where}: __lr", low=0.0, low_open=True)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        params = {(str(i), name): p for i, name, p in self._entries}
        slots = {}
        for key, arr in state.items():
            if key in ("__steps", "__lr"):
                continue
            parts = key.split("/") if isinstance(key, str) else []
            if len(parts) < 3 or (parts[0], "/".join(parts[1:-1])) not in params:
                raise ValueError(f"{where} has {key!r}, which names no parameter (keys are "
                                 f"'group/name/slot', e.g. {next(iter(self.state_shapes()), '')!r})")
            p = params[(parts[0], "/".join(parts[1:-1]))]
            if parts[-1] not in self.SLOTS:
                raise ValueError(f"{where} has {key!r}: {type(self).__name__} keeps the slots "
                                 f"{list(self.SLOTS)}, not {parts[-1]!r}")
            a = np.asarray(arr)
            if a.dtype.kind != "f":
                raise ValueError(f"{where}[{key!r}] must be a floating array, got {a.dtype}")
            if a.shape != p.shape:
                raise ValueError(f"{where}[{key!r}] has shape {a.shape}, expected {p.shape} "
                                 f"(the parameter's)")
            if not np.isfinite(a).all():
                raise ValueError(f"{where}[{key!r}] holds NaN or inf")
            slots[(int(parts[0]), "/".join(parts[1:-1]), parts[-1])] = np.array(a, dtype=p.dtype)
        return steps, lr, slots

    def load_state_dict(self, state):
        """Restore a ``state_dict``: validated whole first (ValueError, the optimizer unchanged)."""
        self._set_state(self.check_state_dict(state))

    def _set_state(self, checked):
        self.steps, self.lr, self.state = checked


class SGD(Optimizer):
    """p -= lr * (g + weight_decay * p), with heavy-ball momentum as torch.optim.SGD."""

    SLOTS = ("momentum",)

    def __init__(self, params: Params, lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, lr)
        self.momentum = _real(momentum, "momentum", low=0.0)
        self.weight_decay = _real(weight_decay, "weight_decay", low=0.0)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        self.nesterov = bool(nesterov)

    def _update(self, i, name, p, g):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = self._slot(i, name, "momentum", p)
            if self.steps == 1 and not buf.any():
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) as torch.optim.Adam; weight_decay is L2 added to the gradient."""

    decoupled = False
    SLOTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.beta1 = _real(betas[0], "betas[0]", low=0.0, high=1.0, high_open=True)
        self.beta2 = _real(betas[1], "betas[1]", low=0.0, high=1.0, high_open=True)
        self.eps = _real(eps, "eps", low=0.0)
        self.weight_decay = _real(weight_decay, "weight_decay", low=0.0)

    def _update(self, i, name, p, g):
        if self.weight_decay:
            if self.decoupled:
                p -= self.lr * self.weight_decay * p
            else:
                g = g + self.weight_decay * p
        m = self._slot(i, name, "exp_avg", p)
        s = self._slot(i, name, "exp_avg_sq", p)
        m *= self.beta1
        m += (1 - self.beta1) * g
        s *= self.beta2
        s += (1 - self.beta2) * g * g
        bc1 = 1 - self.beta1 ** self.steps
        bc2 = 1 - self.beta2 ** self.steps
        p -= (self.lr / bc1) * m / (np.sqrt(s / bc2) + self.eps)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): decoupled weight decay, default 1e-2 as torch.optim.AdamW."""

    decoupled = True

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)
