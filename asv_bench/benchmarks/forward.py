"""Inference over the shape grid, float32/float64, one thread and all."""
import time

import numpy as np

import lstm_fast as lf

from .common import SHAPES, THREADS, flops, make


class Forward:
    params = (SHAPES, ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]
    timeout = 300

    def setup(self, shape, dtype, threads):
        self.model, self.x = make(shape, np.dtype(dtype))
        lf.set_num_threads(threads)

    def time_forward(self, shape, dtype, threads):
        self.model(self.x)

    def peakmem_forward(self, shape, dtype, threads):
        self.model(self.x)

    def track_gflops(self, shape, dtype, threads):
        self.model(self.x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.2 or n < 3:
            self.model(self.x)
            n += 1
        return flops(*shape) * n / (time.perf_counter() - start) / 1e9

    track_gflops.unit = "GFLOP/s"


class FrozenForward:
    """float32 inference of LSTM.freeze()'s model (weights packed once), next to Forward's."""

    params = (SHAPES, THREADS)
    param_names = ["shape", "threads"]
    timeout = 300

    def setup(self, shape, threads):
        model, self.x = make(shape, np.float32)
        self.model = model.freeze()
        self.source = model
        lf.set_num_threads(threads)

    def time_forward(self, shape, threads):
        self.model(self.x)

    def time_freeze(self, shape, threads):
        self.source.freeze()


class VariableLengths:
    """A padded batch with lengths against the same batch at full length."""

    params = ([(100, 64, 128, 128, 1, False), (100, 64, 128, 128, 1, True)], [True, False])
    param_names = ["shape", "with_lengths"]

    def setup(self, shape, with_lengths):
        self.model, self.x = make(shape, np.float32)
        rng = np.random.default_rng(0)
        self.lengths = rng.integers(1, shape[0] + 1, size=shape[1]) if with_lengths else None

    def time_forward(self, shape, with_lengths):
        self.model(self.x, lengths=self.lengths)


class Subnormal:
    """Speed must not depend on the values: states driven towards subnormal floats."""

    params = ([(100, 16, 128, 128, 1, False)], ["normal", "tiny"])
    param_names = ["shape", "values"]

    def setup(self, shape, values):
        self.model, self.x = make(shape, np.float32)
        if values == "tiny":
            for p in self.model.parameters().values():
                p *= 1e-20
            self.x *= 1e-19

    def time_forward(self, shape, values):
        self.model(self.x)
