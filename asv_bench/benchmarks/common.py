"""Shared setup of the benchmarks: the shape grid and model construction with a fixed seed."""
import os

import numpy as np

import lstm_fast as lf

# (T, B, I, H, layers, bidirectional): the comparison grid of `python -m lstm_fast bench`
SHAPES = [
    (100, 1, 32, 64, 1, False),
    (100, 1, 128, 128, 1, False),
    (1000, 1, 16, 32, 1, False),
    (100, 16, 128, 128, 1, False),
    (100, 16, 128, 128, 1, True),
    (100, 64, 256, 256, 2, False),
    (100, 256, 64, 64, 1, False),
    (50, 64, 512, 512, 1, False),
    (25, 128, 1024, 1024, 1, False),
]
ALL_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
THREADS = sorted({1, ALL_THREADS})


def flops(T, B, I, H, layers, bidirectional):
    D = 2 if bidirectional else 1
    return sum(2 * T * B * 4 * H * ((I if k == 0 else D * H) + H) * D for k in range(layers))


def make(shape, dtype, seed=0):
    T, B, I, H, layers, bi = shape
    model = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, dtype=dtype, seed=seed)
    x = np.random.default_rng(seed).standard_normal((T, B, I)).astype(dtype)
    return model, x
