"""Reduced-precision inference: a float32 model frozen to float32, bfloat16 or int8 products,
over the shape grid, one thread and all; and the batch-1/batch-16 step in each precision."""
import numpy as np

import lstm_fast as lf
from lstm_fast._bench import CHOOSER_WARMUP_CALLS

from .common import SHAPES, THREADS, make

PRECISIONS = ["float32", "bfloat16", "int8"]


class FrozenPrecision:
    """Which kernel runs is the CPU's (python -m lstm_fast info names the path per precision)."""

    params = (SHAPES, PRECISIONS, THREADS)
    param_names = ["shape", "precision", "threads"]
    timeout = 300

    def setup(self, shape, precision, threads):
        self.source, self.x = make(shape, np.float32)
        self.model = self.source.freeze(precision=precision)
        lf.set_num_threads(threads)
        # a shape's first calls on several threads explore one thread against the split
        # (lf_split.h); time the choice, not the exploring
        if threads > 1:
            for _ in range(CHOOSER_WARMUP_CALLS):
                self.model(self.x)

    def time_forward(self, shape, precision, threads):
        self.model(self.x)

    def time_freeze(self, shape, precision, threads):
        self.source.freeze(precision=precision)


class PrecisionStep:
    """One step of a frozen model (streaming): W_hh read from cache at half (bfloat16) or a
    quarter (int8) of float32's bytes."""

    params = ([1, 16], [128, 512], PRECISIONS)
    param_names = ["batch", "hidden", "precision"]

    def setup(self, batch, hidden, precision):
        self.model = lf.LSTM(hidden, hidden, seed=0).freeze(precision=precision)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((batch, hidden)).astype(np.float32)
        self.state = self.model.zero_state(batch)
        lf.set_num_threads(1)

    def time_step(self, batch, hidden, precision):
        self.model.step(self.x, self.state)
