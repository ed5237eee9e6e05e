"""Argument checks, in one place, with messages that name the argument, what was expected and what came."""
import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Every BLAS dimension and leading dimension is a C int.
MAX_DIM = 2**31 - 1


def size(value, name, minimum=1):
    """An integer size >= minimum (bools, floats, NaN and strings are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > MAX_DIM // 4:
        raise ValueError(f"{name}={value} is too large (at most {MAX_DIM // 4})")
    return value


def model_dtype(dtype):
    """float32 or float64, given as a numpy dtype, type or name."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def float_array(value, name, dtype):
    """`value` as a C-contiguous array of the model's dtype.

    Real floating input (float16/32/64) is converted to the model's dtype (a documented cast);
    anything else (ints, bools, complex, objects, strings) is a TypeError.
    """
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            # e.g. a torch bfloat16 tensor: numpy has no such dtype and torch's own message
            # ("Got unsupported ScalarType BFloat16") names neither the argument nor a fix.
            dt = getattr(value, "dtype", None)
            if dt is None:
                raise
            raise TypeError(
                f"{name} has dtype {dt}, which numpy cannot hold ({type(value).__name__}); "
                f"lstm_fast accepts float16, float32 or float64 (convert first, e.g. "
                f"{name}.float() for a torch tensor)"
            ) from exc
    if arr.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a floating-point array (float32 or float64), got dtype {arr.dtype}"
        )
    return np.ascontiguousarray(arr, dtype=dtype)


def shape(arr, expected, name, meaning=None):
    """Raise ValueError unless arr.shape == expected."""
    expected = tuple(int(e) for e in expected)
    if arr.shape != expected:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} has shape {arr.shape}, expected {expected}{what}")


def lengths(value, batch, seq_len):
    """Per-sequence valid lengths: integers in 1..seq_len, one per batch row, as intp."""
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != batch:
        raise ValueError(f"lengths has shape {arr.shape}, expected ({batch},): one length per sequence")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 1 or arr.max() > seq_len):
        bad = arr[(arr < 1) | (arr > seq_len)][0]
        raise ValueError(
            f"lengths must lie in 1..{seq_len} (the sequence length), got {int(bad)}"
        )
    return np.ascontiguousarray(arr, dtype=np.intp)


_INTP_MAX = int(np.iinfo(np.intp).max)


def check_size_product(*dims, name="the workspace"):
    """Refuse sizes whose element count overflows the index type before anything is allocated."""
    total = math.prod(map(int, dims))
    if total > _INTP_MAX // 8:
        raise MemoryError(f"{name} would need {total} values, more than can be addressed")
    return total
