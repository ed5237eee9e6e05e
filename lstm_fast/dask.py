"""Running an lf.LSTM over a chunked dask.array (Dask is an optional extra: pip install "dask[distributed]").

>>> out = lf.dask.predict(model, da.from_array(x, chunks=(1024, -1, -1)))   # batch-major model
"""
import numpy as np

from ._threads import threads


def _predict_block(block, model, n_threads):
    with threads(n_threads):
        return model(block)[0]


def predict(model, array, n_threads=1):
    """model(x)[0] over a dask.array chunked along the batch axis, lazily.

    Parameters
    ----------
    model : LSTM, shipped to the workers as weights + configuration (it pickles as such)
    array : dask.array of shape (B, T, I) when ``model.batch_first``, else (T, B, I); chunks along
        the other axes are merged
    n_threads : int, default 1
        OpenMP threads per task. Dask runs one task per worker thread, so 1 keeps a worker's
        threads x OpenMP threads within its cores; give more to workers with fewer threads.

    Returns
    -------
    dask.array of the outputs, (B, T, D*H_out) or (T, B, D*H_out), chunked like the batch axis
    """
    import dask.array as da

    if not isinstance(array, da.Array):
        raise TypeError(f"array must be a dask.array, got {type(array).__name__}")
    if array.ndim != 3 or array.shape[2] != model.input_size:
        raise ValueError(f"array has shape {array.shape}, expected 3-D with {model.input_size} features")
    batch_axis = 0 if model.batch_first else 1
    whole = {ax: -1 for ax in range(3) if ax != batch_axis}
    array = array.rechunk(whole)
    features = model.num_directions * model.hidden_out
    chunks = tuple(c if ax != 2 else (features,) for ax, c in enumerate(array.chunks))
    return array.map_blocks(_predict_block, model, n_threads, dtype=model.dtype, chunks=chunks,
                            meta=np.empty((0, 0, 0), model.dtype))
