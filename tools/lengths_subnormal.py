"""Variable lengths and tiny (subnormal-prone) values against the same batch at full length / normal values.
Run: .venv/bin/python tools/lengths_subnormal.py"""
import numpy as np, lstm_fast as lf, time
def tm(f, n=7):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return np.median(ts)
for bi in (False, True):
    m = lf.LSTM(128,128,bidirectional=bi,seed=0); x = np.random.default_rng(0).standard_normal((100,64,128)).astype(np.float32)
    lens = np.random.default_rng(1).integers(1,101,size=64)
    for th in (1,2):
        with lf.threads(th):
            a=tm(lambda: m(x)); b=tm(lambda: m(x, lengths=lens)); c=tm(lambda: m(x, lengths=np.full(64,100)))
        print(f"bi={bi} th={th}: full {a*1e3:.2f} ms, lengths U(1,100) {b*1e3:.2f} ms (mean len {lens.mean():.0f}), lengths all 100 {c*1e3:.2f} ms")
m = lf.LSTM(128,128,seed=0); x = np.random.default_rng(0).standard_normal((100,16,128)).astype(np.float32)
m2 = lf.LSTM(128,128,seed=0); m2.load_state_dict({k: v*1e-20 for k,v in m.state_dict().items()}); x2 = x*1e-19
for th in (1,2):
    with lf.threads(th):
        a=tm(lambda: m(x)); b=tm(lambda: m2(x2))
    out,_=m2(x2); sub=np.mean((out!=0)&(np.abs(out)<np.finfo(np.float32).tiny))
    print(f"subnormal th={th}: normal {a*1e3:.2f} ms, tiny values {b*1e3:.2f} ms ({b/a:.2f}x), subnormal outputs {sub:.0%}")
