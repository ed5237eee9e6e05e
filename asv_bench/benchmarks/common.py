"""Shared setup of the benchmarks: the shape grid and model construction with a fixed seed."""
import os

import numpy as np

import lstm_fast as lf

# the comparison grid and flop count of `python -m lstm_fast bench`, one source for both
from lstm_fast._bench import GRID as SHAPES, flops  # noqa: E402,F401

ALL_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
THREADS = sorted({1, ALL_THREADS})


def make(shape, dtype, seed=0):
    T, B, I, H, layers, bi = shape
    model = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, dtype=dtype, seed=seed)
    x = np.random.default_rng(seed).standard_normal((T, B, I)).astype(dtype)
    return model, x
