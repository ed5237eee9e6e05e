"""Load time of a saved model file, where the version can save models."""
import os
import tempfile

import lstm_fast as lf


class LoadModel:
    params = ([".npz", ".safetensors"],)
    param_names = ["suffix"]

    def setup(self, suffix):
        if not hasattr(lf, "load"):
            raise NotImplementedError("lstm_fast.load is not available in this version")
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "model" + suffix)
        lf.LSTM(128, 256, num_layers=2, seed=0).save(self.path)

    def time_load(self, suffix):
        lf.load(self.path)
