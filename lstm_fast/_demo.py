"""`python -m lstm_fast demo`: the library's main job, end to end, with its numbers."""
import time

import numpy as np

from . import LSTM, reference, threads
from ._threads import _available_cores


def _flops(model, seq_len, batch):
    """2 * T * B * 4H * (in + H_out) per layer and direction (+ the projection, if any)."""
    total = 0
    for k in range(model.num_layers):
        per_step = 4 * model.hidden_size * (model._layer_input_size(k) + model.hidden_out)
        per_step += model.proj_size * model.hidden_size
        total += 2 * seq_len * batch * per_step * model.num_directions
    return total


def _median_time(fn, min_time=0.5, min_reps=3):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def inference_demo(quick=False):
    seq_len, batch, input_size, hidden, layers = (20, 8, 16, 32, 2) if quick else (100, 64, 128, 256, 2)
    print(f"== Inference: LSTM({input_size}, {hidden}, num_layers={layers}), float32, "
          f"batch of {batch} sequences x {seq_len} steps")
    rng = np.random.default_rng(0)
    # A state_dict as one would export it from torch: names, shapes and gate order i, f, g, o.
    source = LSTM(input_size, hidden, num_layers=layers, seed=42)
    state = source.state_dict()
    model = LSTM(input_size, hidden, num_layers=layers)
    model.load_state_dict(state)
    x = rng.standard_normal((seq_len, batch, input_size)).astype(np.float32)

    out, (h_n, c_n) = model(x)
    check = min(batch, 4)
    ref_out, _ = reference.lstm(x[:, :check].astype(np.float64), state, num_layers=layers)
    err = float(np.abs(out[:, :check] - ref_out).max())
    print(f"   output {out.shape}, h_n {h_n.shape}; max |error| vs the numpy reference "
          f"(float64, {check} sequences): {err:.2e}  {'OK' if err < 1e-4 else 'MISMATCH'}")
    flops = _flops(model, seq_len, batch)
    for n in sorted({1, _available_cores()}):
        with threads(n):
            t = _median_time(lambda: model(x))
        print(f"   {n} thread{'s' if n > 1 else ' '}: {t * 1e3:8.2f} ms/batch  "
              f"{batch / t:10.0f} sequences/s  {flops / t / 1e9:6.1f} GFLOP/s")
    return err < 1e-4


def run(quick=False):
    ok = inference_demo(quick)
    return 0 if ok else 1
