"""lstm_fast: fast, exact LSTM inference and training on CPU, numpy in and numpy out.

>>> import numpy as np, lstm_fast as lf
>>> m = lf.LSTM(8, 16, num_layers=2, seed=0)
>>> out, (h_n, c_n) = m(np.zeros((5, 3, 8), np.float32))
>>> out.shape, h_n.shape
((5, 3, 16), (2, 3, 16))
"""
from ._version import __version__
from ._threads import get_num_threads, set_num_threads, threads
from ._lstm import LSTM, FrozenLSTM, LSTMCell, load
from ._config import show_config
from . import dask, nn, onnx, optim
from .nn import Linear, cross_entropy_loss, mse_loss
from ._fit import fit, load_checkpoint, save_checkpoint
from ._train import Gradients, TrainCache

__all__ = [
    "LSTM",
    "FrozenLSTM",
    "LSTMCell",
    "get_num_threads",
    "set_num_threads",
    "threads",
    "show_config",
    "nn",
    "optim",
    "Linear",
    "mse_loss",
    "cross_entropy_loss",
    "fit",
    "save_checkpoint",
    "load_checkpoint",
    "Gradients",
    "load",
    "TrainCache",
    "__version__",
]
