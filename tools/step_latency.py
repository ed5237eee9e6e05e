"""Streaming latency: LSTM.step against torch.nn.LSTMCell (batch 1, hidden 128, 1 thread), and steps vs the
whole sequence. Run: .venv/bin/python tools/step_latency.py"""
import numpy as np, lstm_fast as lf, torch, time
m = lf.LSTM(128,128,seed=0); st = m.zero_state(1); x = np.random.randn(1,128).astype(np.float32)
for _ in range(100): y, st = m.step(x, st)
t=time.perf_counter(); n=20000
for _ in range(n): y, st = m.step(x, st)
a=(time.perf_counter()-t)/n
cell = torch.nn.LSTMCell(128,128); xt=torch.from_numpy(x); hc=(torch.zeros(1,128),torch.zeros(1,128))
torch.set_num_threads(1)
with torch.inference_mode():
    for _ in range(100): hc = cell(xt, hc)
    t=time.perf_counter()
    for _ in range(n): hc = cell(xt, hc)
b=(time.perf_counter()-t)/n
print(f"lf step {a*1e6:.2f}us torch LSTMCell {b*1e6:.2f}us ratio {b/a:.2f}")
# correctness
x_seq = np.random.randn(7,3,128).astype(np.float32); m2 = lf.LSTM(128, 16, num_layers=2, seed=1)
st = m2.zero_state(3); ys=[]
for t_ in range(7):
    y, st = m2.step(x_seq[t_], st); ys.append(y)
out,(h,c) = m2(x_seq); print(np.abs(np.stack(ys)-out).max(), np.abs(st[0]-h).max())
