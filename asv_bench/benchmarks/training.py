"""A training step: forward_train + backward, over a few grid shapes."""
import numpy as np

import lstm_fast as lf

from .common import THREADS, make

TRAIN_SHAPES = [
    (100, 1, 32, 64, 1, False),
    (100, 16, 128, 128, 1, False),
    (100, 64, 256, 256, 2, False),
]


class TrainStep:
    params = (TRAIN_SHAPES, ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        self.model, self.x = make(shape, np.dtype(dtype))
        out, _ = self.model(self.x)
        self.grad = np.ones_like(out)
        lf.set_num_threads(threads)

    def time_forward_backward(self, shape, dtype, threads):
        _, _, cache = self.model.forward_train(self.x)
        self.model.backward(cache, self.grad)

    def peakmem_forward_backward(self, shape, dtype, threads):
        _, _, cache = self.model.forward_train(self.x)
        self.model.backward(cache, self.grad)
