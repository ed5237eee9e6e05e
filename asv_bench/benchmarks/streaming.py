"""Latency of one step: LSTMCell, and LSTM.step where the model has it."""
import numpy as np

import lstm_fast as lf


class Step:
    params = ([1, 16], [64, 128])
    param_names = ["batch", "hidden"]

    def setup(self, batch, hidden):
        self.cell = lf.LSTMCell(hidden, hidden, seed=0)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((batch, hidden)).astype(np.float32)
        self.state = (np.zeros((batch, hidden), np.float32), np.zeros((batch, hidden), np.float32))
        self.model = lf.LSTM(hidden, hidden, seed=0)
        self.has_step = hasattr(self.model, "step")
        if self.has_step:
            self.model_state = self.model.zero_state(batch)

    def time_cell(self, batch, hidden):
        self.cell(self.x, self.state)

    def time_lstm_step(self, batch, hidden):
        if not self.has_step:
            raise NotImplementedError("LSTM.step is not available in this version")
        self.model.step(self.x, self.model_state)
