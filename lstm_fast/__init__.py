"""lstm_fast: fast, exact LSTM inference and training on CPU, numpy in and numpy out.

>>> import numpy as np, lstm_fast as lf
>>> m = lf.LSTM(8, 16, num_layers=2, seed=0)
>>> out, (h_n, c_n) = m(np.zeros((5, 3, 8), np.float32))
>>> out.shape, h_n.shape
((5, 3, 16), (2, 3, 16))
"""
from ._version import __version__


# before any extension module loads libgomp (lstm_fast/_ompwait.py says why)
from . import _ompwait  # noqa: E402,F401


def _check_built():
    """Import the compiled extension first, so that a source checkout without a build says so
    (instead of failing later on a half-initialised package)."""
    import importlib
    import importlib.machinery
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("_threading", "_forward", "_backward", "_step"):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:
            built = any(os.path.exists(os.path.join(here, name + suffix))
                        for suffix in importlib.machinery.EXTENSION_SUFFIXES)
            if built:
                raise ImportError(
                    f"lstm_fast's compiled extension lstm_fast.{name} is in {here} but does not "
                    f"import ({exc}); it may be built for another Python or numpy: rebuild it with "
                    f"`make build` or `pip install -e .` in the checkout, or reinstall lstm_fast"
                ) from exc
            raise ImportError(
                f"lstm_fast's compiled extension is not built: {here} has no lstm_fast.{name} "
                f"module. If this is a source checkout, build it there with `make build` (sets up "
                f".venv) or `pip install -e .` (or `python setup.py build_ext --inplace`); "
                f"otherwise install lstm_fast with `pip install lstm-fast`, and run Python from "
                f"outside the source directory so that the installed package is imported"
            ) from None


_check_built()
del _check_built
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
