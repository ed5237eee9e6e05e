"""Optimizers over parameter dicts (live views, updated in place), and gradient-norm clipping.

>>> opt = lf.optim.Adam([model.parameters(), head.parameters()], lr=1e-3)
>>> opt.step([grads.params, head_grads.params])      # same structure as the parameters
"""
from __future__ import annotations

from typing import Any, Union

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


class Optimizer:
    """Base: keeps the parameter views and a per-parameter state, saved and restored as arrays."""

    def __init__(self, params: Params, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)
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
        self.steps += 1
        for (i, name, p), g in zip(self._entries, self._grads(grads)):
            self._update(i, name, p, g.astype(p.dtype, copy=False))

    def state_dict(self):
        """Flat dict of arrays (npz-friendly): hyper-parameters, step count and slots."""
        out = {"__steps": np.array(self.steps), "__lr": np.array(self.lr)}
        for (i, name, slot), arr in self.state.items():
            out[f"{i}/{name}/{slot}"] = arr.copy()
        return out

    def load_state_dict(self, state):
        self.steps = int(state["__steps"])
        self.lr = float(state["__lr"])
        known = {f"{i}/{name}" for i, name, _ in self._entries}
        self.state = {}
        for key, arr in state.items():
            if key.startswith("__"):
                continue
            i, name, slot = key.split("/", 2)
            if f"{i}/{name}" not in known:
                raise ValueError(f"optimizer state has {key!r}, which matches no parameter")
            self.state[(int(i), name, slot)] = np.array(arr)


class SGD(Optimizer):
    """p -= lr * (g + weight_decay * p), with heavy-ball momentum as torch.optim.SGD."""

    def __init__(self, params: Params, lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, lr)
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)

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

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2 = map(float, betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)

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
