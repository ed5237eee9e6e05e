"""`fit`: a small training loop for sequence-to-one models (an LSTM and a Linear head on its last
step), and checkpoints of model + head + optimizer in .npz files that never unpickle."""
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import nn, optim


@dataclass
class History:
    """Per-epoch mean training loss, validation loss (if any), and the epoch whose weights were kept."""

    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    best_epoch: int = -1
    sequences_per_second: float = 0.0


class _Progress:
    """tqdm when installed, else one line rewritten in place; silent when disabled."""

    def __init__(self, total, enabled):
        self.bar = None
        self.enabled = enabled
        self.total = total
        self.done = 0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="batch", leave=False)
            except ImportError:
                pass

    def update(self, text):
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif 100 * self.done // self.total != 100 * (self.done - 1) // self.total:
            # at most one redraw per percent, so a log file does not fill up
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text}")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


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
    epochs, batch_size : int
    optimizer : an lf.optim optimizer over ``[model.parameters(), head.parameters()]``;
        Adam(lr=1e-3) when None
    validation : (x_val, y_val) or None, evaluated after every epoch
    patience : int or None; stop after this many epochs without a better validation loss,
        and restore the best weights
    seed : int, seed of the shuffling (the same seed gives the same bits)
    clip_norm : float or None, global gradient-norm clipping
    progress : bool or None; a progress bar (tqdm if installed) over all batches; None shows it
        on runs of more than 200 batches

    Returns
    -------
    History
    """
    loss_fn = {"mse": nn.mse_loss, "cross_entropy": nn.cross_entropy_loss}.get(loss)
    if loss_fn is None:
        raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")
    x = np.asarray(x, dtype=model.dtype)
    if x.ndim != 3 or x.shape[2] != model.input_size:
        raise ValueError(f"x has shape {x.shape}, expected (N, T, {model.input_size})")
    y = np.asarray(y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows, expected {x.shape[0]} (one per sequence)")
    if optimizer is None:
        optimizer = optim.Adam([model.parameters(), head.parameters()], lr=1e-3)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    n_batches = (n + batch_size - 1) // batch_size
    history = History()
    best, best_loss, waited = None, np.inf, 0
    bar = _Progress(epochs * n_batches, progress if progress is not None else epochs * n_batches > 200)
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
                if val < best_loss:
                    best_loss, waited, history.best_epoch = val, 0, epoch
                    best = (model.state_dict(), head.state_dict())
                else:
                    waited += 1
                    if patience is not None and waited >= patience:
                        break
    finally:
        bar.close()
    history.sequences_per_second = seen / (time.perf_counter() - start)
    if best is not None and patience is not None:
        model.load_state_dict(best[0])
        head.load_state_dict(best[1])
    return history


def save_checkpoint(path, model, head=None, optimizer=None):
    """Model (+ head, + optimizer state) into one .npz; config as JSON text, nothing pickled."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    config = {"input_size": model.input_size, "hidden_size": model.hidden_size,
              "num_layers": model.num_layers, "bias": model.bias, "batch_first": model.batch_first,
              "dropout": model.dropout, "bidirectional": model.bidirectional,
              "proj_size": model.proj_size, "dtype": model.dtype.name}
    if head is not None:
        arrays.update({f"head/{k}": v for k, v in head.state_dict().items()})
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    arrays["config"] = np.array(json.dumps(config))
    np.savez(path, **arrays)


def load_checkpoint(path, model, head=None, optimizer=None):
    """Restore what save_checkpoint wrote into existing objects (allow_pickle=False)."""
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    model.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("model/")})
    if head is not None:
        head.load_state_dict({k[5:]: v for k, v in data.items() if k.startswith("head/")})
    if optimizer is not None:
        optimizer.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("optim/")})
    return json.loads(str(data["config"]))
