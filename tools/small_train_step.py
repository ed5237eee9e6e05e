"""Time of a small training step (forward_train + backward): python tools/small_train_step.py THREADS REPS [all|fwd|inf]."""
import sys, time, numpy as np
import lstm_fast as lf
nt = int(sys.argv[1]); reps = int(sys.argv[2]); part = sys.argv[3] if len(sys.argv) > 3 else "all"
lf.set_num_threads(nt)
rng = np.random.default_rng(0)
m = lf.LSTM(1, 32)
x = rng.standard_normal((30, 32, 1), dtype=np.float32)
g = rng.standard_normal((30, 32, 32), dtype=np.float32)
def one():
    y, st, cache = m.forward_train(x)
    m.backward(cache, g)
for _ in range(30): one()
ts = []
if part == "fwd":
    for _ in range(reps):
        t = time.perf_counter(); m.forward_train(x); ts.append(time.perf_counter() - t)
elif part == "inf":
    for _ in range(reps):
        t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
else:
    for _ in range(reps):
        t = time.perf_counter(); one(); ts.append(time.perf_counter() - t)
ts = np.array(ts) * 1e3
print(f"{part} threads={nt} mean={ts.mean():.3f} median={np.median(ts):.3f} p90={np.percentile(ts,90):.3f} ms")
