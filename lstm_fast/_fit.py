"""`fit`: a small training loop for sequence-to-one models (an LSTM and a Linear head on its last
step), and checkpoints of model + head + optimizer in .npz files that never unpickle."""
import json
import math
import numbers
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import _io, nn, optim
from ._core import _commit_named, _stage_named
from ._lstm import LSTM


@dataclass
class History:
    """Per-epoch mean training loss, validation loss (if any), and the epoch whose weights were kept."""

    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    best_epoch: int = -1
    sequences_per_second: float = 0.0


def _interactive():
    """Whether progress is watched live: stdout and stderr are terminals, or a Jupyter kernel
    (whose streams are not ttys but show tqdm's widget)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed streams
        return False


class _Progress:
    """Progress that fits where it goes.

    Watched live (a terminal, a notebook): a bar over all batches, tqdm's when installed, else
    one line on stderr rewritten in place. Elsewhere (a pipe, a log file) no carriage returns:
    one line per epoch on stdout when progress was asked for explicitly (``progress=True``),
    nothing for the default. Disabled: silent.
    """

    def __init__(self, total, enabled, explicit=False, epochs=None):
        self.bar = None
        self.total = total
        self.epochs = epochs
        self.done = 0
        live = enabled and _interactive()
        self.mode = "bar" if live else ("lines" if enabled and explicit else "off")
        if self.mode == "bar":
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="batch", leave=False)
            except ImportError:
                pass

    def update(self, text):
        self.done += 1
        if self.mode != "bar":
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif 100 * self.done // self.total != 100 * (self.done - 1) // self.total:
            # at most one redraw per percent
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text}")
            sys.stderr.flush()

    def epoch_end(self, epoch, train_loss, val_loss=None):
        if self.mode != "lines":
            return
        of = f"/{self.epochs}" if self.epochs else ""
        val = f", validation loss {val_loss:.4g}" if val_loss is not None else ""
        print(f"   epoch {epoch + 1}{of}: train loss {train_loss:.4g}{val}", flush=True)

    def close(self):
        if self.mode != "bar":
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def _count(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _data(x, y, model, head, loss, xname, yname):
    """x as (N, T, I) of the model's dtype and y as the loss needs it, both checked."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.dtype.kind == "b":
        raise TypeError(f"{xname} must be a real array, got dtype {x.dtype}")
    if x.ndim != 3 or x.shape[2] != model.input_size or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{xname} has shape {x.shape}, expected (N, T, {model.input_size}) with "
                         f"N, T >= 1 (batch-major whatever batch_first says)")
    x = np.asarray(x, dtype=model.dtype)
    if not np.isfinite(x).all():
        raise ValueError(f"{xname} holds NaN or inf")
    y = np.asarray(y)
    n, c = x.shape[0], head.out_features
    if loss == "mse":
        if y.dtype.kind not in "fiu":
            raise TypeError(f"{yname} must be a real array for loss='mse', got dtype {y.dtype}")
        if y.shape != (n, c):
            raise ValueError(f"{yname} has shape {y.shape}, expected ({n}, {c}): one row of "
                             f"head.out_features per sequence of {xname}")
        if not np.isfinite(y).all():
            raise ValueError(f"{yname} holds NaN or inf")
    else:
        if y.dtype.kind not in "iu":
            raise TypeError(f"{yname} must be integer labels for loss='cross_entropy', got dtype {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"{yname} has shape {y.shape}, expected ({n},): one label per sequence")
        if y.min() < 0 or y.max() >= c:
            raise ValueError(f"{yname} labels must lie in 0..{c - 1} (head.out_features={c})")
    return x, y


def predict_last(model, head, x):
    """head(out at the last step) for batch-major x (N, T, I); returns (N, out_features)."""
    out, _ = model(np.swapaxes(x, 0, 1) if not model.batch_first else x)
    last = out[-1] if not model.batch_first else out[:, -1]
    return head(last)


def _step(model, head, xb, yb, loss_fn):
    xt = xb if model.batch_first else np.ascontiguousarray(np.swapaxes(xb, 0, 1))
    out, _, cache = model.forward_train(xt)
    last = out[:, -1] if model.batch_first else out[-1]
    pred = head(last)
    loss, g_pred = loss_fn(pred, yb)
    g_head = head.backward(last, g_pred)
    g_out = np.zeros_like(out)
    if model.batch_first:
        g_out[:, -1] = g_head.input
    else:
        g_out[-1] = g_head.input
    g_model = model.backward(cache, g_out)
    return loss, g_model.params, g_head.params


def fit(model, head, x, y, *, epochs=20, batch_size=32, optimizer=None, loss="mse",
        validation=None, patience=None, seed=0, clip_norm=None, progress=None):
    """Train ``head(model(x)[last step])`` to predict y with mini-batches.

    Parameters
    ----------
    model : LSTM
    head : nn.Linear, from the model's output features to y's
    x : ndarray of shape (N, T, input_size), batch-major whatever ``model.batch_first`` says
    y : ndarray of shape (N, out_features) (mse) or integer labels (N,) (``loss="cross_entropy"``)
    epochs, batch_size : int, >= 1
    optimizer : an lf.optim optimizer over ``[model.parameters(), head.parameters()]``;
        Adam(lr=1e-3) when None
    validation : (x_val, y_val) or None, evaluated after every epoch
    patience : int >= 1 or None; stop after this many epochs without a better validation loss,
        and restore the best weights (needs validation)
    seed : int, seed of the shuffling (the same seed gives the same bits)
    clip_norm : float or None, global gradient-norm clipping
    progress : bool or None
        On a terminal or in a notebook, a progress bar over all batches (tqdm's if installed);
        None shows it on runs of more than 200 batches. Where standard output is not a terminal
        (a pipe, a log file), ``True`` prints one line per epoch instead and None prints nothing.

    Returns
    -------
    History

    Every argument is checked before training starts (TypeError / ValueError naming it): sizes
    are positive ints, x and y are finite with matching rows, labels lie in the head's classes.
    """
    loss_fn = {"mse": nn.mse_loss, "cross_entropy": nn.cross_entropy_loss}.get(loss) \
        if isinstance(loss, str) else None
    if loss_fn is None:
        raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be an lf.LSTM, got {type(model).__name__}")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an lf.nn.Linear, got {type(head).__name__}")
    features = model.num_directions * model.hidden_out
    if head.in_features != features:
        raise ValueError(f"head has in_features={head.in_features}, expected {features} (the "
                         f"model's output features)")
    epochs = _count(epochs, "epochs")
    batch_size = _count(batch_size, "batch_size")
    if optimizer is not None and not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer must be an lf.optim optimizer or None, got {type(optimizer).__name__}")
    if patience is not None:
        patience = _count(patience, "patience")
        if validation is None:
            raise ValueError("patience needs validation=(x_val, y_val): it counts epochs without "
                             "a better validation loss")
    if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if clip_norm is not None:
        clip_norm = optim._real(clip_norm, "clip_norm", low=0.0, low_open=True)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    x, y = _data(x, y, model, head, loss, "x", "y")
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("validation must be a pair (x_val, y_val) or None")
        validation = _data(validation[0], validation[1], model, head, loss, "x_val", "y_val")
    if optimizer is None:
        optimizer = optim.Adam([model.parameters(), head.parameters()], lr=1e-3)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    n_batches = (n + batch_size - 1) // batch_size
    history = History()
    best, best_loss, waited = None, np.inf, 0
    bar = _Progress(epochs * n_batches, progress if progress is not None else epochs * n_batches > 200,
                    explicit=progress is not None and bool(progress), epochs=epochs)
    start, seen = time.perf_counter(), 0
    try:
        for epoch in range(epochs):
            perm = rng.permutation(n)
            total = 0.0
            for k in range(n_batches):
                idx = perm[k * batch_size:(k + 1) * batch_size]
                batch_loss, g_model, g_head = _step(model, head, x[idx], y[idx], loss_fn)
                if clip_norm:
                    optim.clip_grad_norm([g_model, g_head], clip_norm)
                optimizer.step([g_model, g_head])
                total += batch_loss * len(idx)
                seen += len(idx)
                bar.update(f"epoch {epoch + 1} loss {batch_loss:.4g}")
            history.train_loss.append(total / n)
            if validation is not None:
                xv, yv = validation
                val, _ = loss_fn(predict_last(model, head, np.asarray(xv, model.dtype)), yv)
                history.val_loss.append(val)
                bar.epoch_end(epoch, history.train_loss[-1], val)
                if val < best_loss:
                    best_loss, waited, history.best_epoch = val, 0, epoch
                    best = (model.state_dict(), head.state_dict())
                else:
                    waited += 1
                    if patience is not None and waited >= patience:
                        break
            else:
                bar.epoch_end(epoch, history.train_loss[-1])
    finally:
        bar.close()
    history.sequences_per_second = seen / (time.perf_counter() - start)
    if best is not None and patience is not None:
        model.load_state_dict(best[0])
        head.load_state_dict(best[1])
    return history


_PARTS = ("model/", "head/", "optim/")


def save_checkpoint(path, model, head=None, optimizer=None):
    """Model (+ head, + optimizer state) into one .npz; config as JSON text, nothing pickled.

    A digest of each part (model with its configuration, head, optimizer) is stored with it and
    checked by `load_checkpoint` (see docs/files.md).
    """
    model_state = model.state_dict()
    arrays = {f"model/{k}": v for k, v in model_state.items()}
    config = {k: getattr(model, k) for k in _io.CONFIG_KEYS}
    config["dtype"] = model.dtype.name
    digests = {"model": _io.digest(config, model_state)}
    if head is not None:
        head_state = head.state_dict()
        arrays.update({f"head/{k}": v for k, v in head_state.items()})
        digests["head"] = _io.digest({"part": "head"}, head_state)
    if optimizer is not None:
        optim_state = optimizer.state_dict()
        arrays.update({f"optim/{k}": v for k, v in optim_state.items()})
        digests["optim"] = _io.digest({"part": "optim"}, optim_state)
    arrays["config"] = np.array(json.dumps(config))
    arrays["__digest__"] = np.array(json.dumps(digests))
    np.savez(path, **arrays)


_FLOATS = ("<f4", "<f8")


def load_checkpoint(path, model, head=None, optimizer=None, *, allow_nonfinite=False):
    """Restore what save_checkpoint wrote into existing objects, all or nothing.

    Everything is checked before anything is assigned: the file's members (no stray or
    duplicate ones), the configuration (strict types, the model's sizes), each tensor's dtype
    and shape from its header before its data is read, the stored digests (files without them
    load without this check), finite weights (unless ``allow_nonfinite``), the head's shapes and
    the optimizer state as ``Optimizer.load_state_dict`` checks it. A faulty file raises
    ValueError naming it and leaves model, head and optimizer unchanged.

    Returns the checkpoint's model configuration (a dict).
    """
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be an lf.LSTM, got {type(model).__name__}")
    if head is not None and not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an lf.nn.Linear or None, got {type(head).__name__}")
    if optimizer is not None and not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer must be an lf.optim optimizer or None, got {type(optimizer).__name__}")
    with _io.NpzReader(path) as f:
        where = f.where
        names = f.names
        stray = [n for n in names if n not in ("config", "__digest__") and not n.startswith(_PARTS)]
        if stray:
            raise ValueError(f"{where}: members {stray[:8]} belong to no part of a checkpoint "
                             f"(model/, head/, optim/, config)")
        if "config" not in f.infos:
            raise ValueError(f"{where} is not an lstm_fast checkpoint (no 'config' member)")
        config = _io.check_config(_io._json(f.read_text("config"), where), where, need_format=False)
        mine = {k: getattr(model, k) for k in ("input_size", "hidden_size", "num_layers", "bias",
                                                "bidirectional", "proj_size")}
        differ = {k: config[k] for k in mine if config[k] != mine[k]}
        if differ:
            raise ValueError(f"{where}: the checkpoint's model has {differ}, the given model "
                             f"{ {k: mine[k] for k in differ} }")
        digests = {}
        if "__digest__" in f.infos:
            digests = _io._json(f.read_text("__digest__"), where, "the digest record")
            if not isinstance(digests, dict) or not all(isinstance(d, str) for d in digests.values()):
                raise ValueError(f"{where}: the digest record is not an object of strings")

        def part(prefix, specs, required=None):
            have = [n[len(prefix):] for n in names if n.startswith(prefix)]
            if required is None:
                _io._names_diff(where, have, specs, f"{prefix[:-1]} tensors")
            else:
                _io._names_diff(where, have, {k: s for k, s in specs.items() if k in required or k in have},
                                f"{prefix[:-1]} entries")
                specs = {k: s for k, s in specs.items() if k in have}
            return f.read_tensors(specs, prefix)

        model_arrays = part("model/", {k: (p.shape, _FLOATS) for k, p in model._params.items()})
        head_arrays = optim_arrays = None
        if head is not None:
            if not any(n.startswith("head/") for n in names):
                raise ValueError(f"{where} holds no head (it was saved without one)")
            head_arrays = part("head/", {k: (p.shape, _FLOATS) for k, p in head._params.items()})
        if optimizer is not None:
            if not any(n.startswith("optim/") for n in names):
                raise ValueError(f"{where} holds no optimizer state (it was saved without one)")
            specs = {k: (s, _FLOATS) for k, s in optimizer.state_shapes().items()}
            specs["__steps"] = ((), ("<i8", "<i4", "<u8", "<u4"))
            specs["__lr"] = ((), _FLOATS)
            optim_arrays = part("optim/", specs, required=("__steps", "__lr"))
    _io._verify_digest(digests.get("model"), config, model_arrays, f"{where} (model)")
    _io._check_finite(model_arrays, where, allow_nonfinite)
    staged_model = _stage_named(model._params, model_arrays, True, "checkpoint model")
    staged_head = checked_optim = None
    if head is not None:
        _io._verify_digest(digests.get("head"), {"part": "head"}, head_arrays, f"{where} (head)")
        _io._check_finite(head_arrays, where, allow_nonfinite)
        staged_head = _stage_named(head._params, head_arrays, True, "checkpoint head")
    if optimizer is not None:
        _io._verify_digest(digests.get("optim"), {"part": "optim"}, optim_arrays, f"{where} (optimizer)")
        try:
            checked_optim = optimizer.check_state_dict(optim_arrays, f"{where}: the optimizer state")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    # everything is checked: assign
    _commit_named(model._params, staged_model)
    model._bump_version()
    if head is not None:
        _commit_named(head._params, staged_head)
    if optimizer is not None:
        optimizer._set_state(checked_optim)
    return config
