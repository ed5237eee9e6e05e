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




def load_sunspots():
    """Yearly sunspot numbers 1700-2008 shipped with the package: (years, values) as float64."""
    from importlib.resources import files

    text = files("lstm_fast").joinpath("data/sunspots_yearly.csv").read_text()
    rows = [line.split(",") for line in text.splitlines() if line and not line.startswith(("#", "YEAR"))]
    data = np.array(rows, dtype=np.float64)
    return data[:, 0], data[:, 1]


def _windows(series, window):
    x = np.stack([series[i:i + window] for i in range(len(series) - window)])[:, :, None]
    return x, series[window:, None]


def training_demo(quick=False, plot_path="lstm_fast_forecast.png"):
    from . import Linear, fit, optim

    years, values = load_sunspots()
    window, hidden = 20, 32
    n_test = 60
    print(f"== Training: one-step-ahead forecast of yearly sunspot numbers ({int(years[0])}-"
          f"{int(years[-1])}, NOAA NGDC, public domain), LSTM(1, {hidden}) + Linear({hidden}, 1)")
    split = len(values) - n_test
    mean, std = values[:split].mean(), values[:split].std()
    scaled = ((values - mean) / std).astype(np.float32)
    x, y = _windows(scaled, window)
    first_test = split - window                      # windows whose target lies in the test years
    x_train, y_train = x[:first_test], y[:first_test]
    x_test, y_test = x[first_test:], y[first_test:]
    n_val = 30
    model = LSTM(1, hidden, batch_first=True, seed=0)
    head = Linear(hidden, 1, seed=1)
    opt = optim.Adam([model.parameters(), head.parameters()], lr=5e-3)
    history = fit(model, head, x_train[:-n_val], y_train[:-n_val], epochs=20 if quick else 150,
                  batch_size=32, optimizer=opt, validation=(x_train[-n_val:], y_train[-n_val:]),
                  patience=None if quick else 40, seed=0, clip_norm=1.0,
                  # a bar on a terminal, one line per epoch into a pipe or a log (_fit._Progress)
                  progress=True)
    out, _ = model(x_test)
    pred = head(out[:, -1])[:, 0] * std + mean
    truth = values[split:]
    rmse = float(np.sqrt(np.mean((pred - truth) ** 2)))
    naive = float(np.sqrt(np.mean((values[split - 1:-1] - truth) ** 2)))
    seasonal = float(np.sqrt(np.mean((values[split - 11:-11] - truth) ** 2)))
    print(f"   trained {len(history.train_loss)} epochs (best validation at epoch {history.best_epoch + 1}), "
          f"{history.sequences_per_second:.0f} sequences/s (forward + backward + Adam)")
    print(f"   test RMSE over {n_test} years ({int(years[split])}-{int(years[-1])}): LSTM {rmse:.1f}, "
          f"naive last value {naive:.1f}, seasonal naive (11 years) {seasonal:.1f}")
    beats = rmse < naive
    print(f"   {'OK: the LSTM beats the naive forecast' if beats else 'WORSE than the naive forecast'}")
    if plot_path:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("   (matplotlib is not installed: no plot; pip install matplotlib for one)")
        else:
            fig, ax = plt.subplots(figsize=(9, 3.5))
            ax.plot(years, values, color="0.6", lw=1, label="observed")
            ax.plot(years[split:], pred, color="C3", lw=1.5, label=f"LSTM one-step forecast (RMSE {rmse:.1f})")
            ax.axvline(years[split], color="k", ls=":", lw=1)
            ax.set_xlabel("year")
            ax.set_ylabel("sunspot number")
            ax.legend(loc="upper left", fontsize=8)
            fig.tight_layout()
            fig.savefig(plot_path, dpi=100)
            plt.close(fig)
            print(f"   forecast plot written to {plot_path}")
    return beats


def run(quick=False, plot_path="lstm_fast_forecast.png"):
    ok = inference_demo(quick)
    ok = training_demo(quick, plot_path) and ok
    return 0 if ok else 1
