"""Issue 18: the small training step and a batch-1 / batch-16 forward, idle and with one core taken
by a busy helper process (bounded in time by itself, killed in teardown), per thread count."""
import subprocess
import sys
import time

import numpy as np

import lstm_fast as lf
from lstm_fast._bench import BUSY_CODE, GRID, SMALL_TRAIN

from .common import THREADS, make


class _Busy:
    def _start(self, load):
        self.proc = None
        if load == "busy":
            # 120 s bound: a benchmark that dies before teardown leaves no spinner for long
            self.proc = subprocess.Popen([sys.executable, "-c", BUSY_CODE, "120"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            time.sleep(0.2)

    def teardown(self, *args):
        lf.set_num_threads(None)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


class ContendedTrainStep(_Busy):
    params = (["idle", "busy"], THREADS)
    param_names = ["load", "threads"]

    def setup(self, load, threads):
        self.model, self.x = make(SMALL_TRAIN, np.dtype(np.float32))
        self.grad = np.ones_like(self.model(self.x)[0])
        lf.set_num_threads(threads)
        self._start(load)

    def time_forward_backward(self, load, threads):
        _, _, cache = self.model.forward_train(self.x)
        self.model.backward(cache, self.grad)


class ContendedForward(_Busy):
    params = ([GRID[0], GRID[3]], ["idle", "busy"], THREADS)
    param_names = ["shape", "load", "threads"]

    def setup(self, shape, load, threads):
        self.model, self.x = make(shape, np.dtype(np.float32))
        lf.set_num_threads(threads)
        self._start(load)

    def time_forward(self, shape, load, threads):
        self.model(self.x)
