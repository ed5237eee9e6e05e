"""Recurrence modes side by side (chunked vs wide) on the bench grid, 1 and 2 threads: the numbers behind
recurrence_mode(). Run: .venv/bin/python tools/measure_modes.py"""
import numpy as np, lstm_fast as lf, time
def tm(f, mintime=0.3):
    f(); ts=[]; t0=time.perf_counter()
    while time.perf_counter()-t0 < mintime or len(ts)<5:
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return np.median(ts)
grid=[(100,1,32,64,1,False),(100,1,128,128,1,False),(1000,1,16,32,1,False),(100,16,128,128,1,False),(100,16,128,128,1,True),(100,64,256,256,2,False),(100,256,64,64,1,False),(50,64,512,512,1,False),(25,128,1024,1024,1,False)]
for (T,B,I,H,L,bi) in grid:
    m = lf.LSTM(I,H,num_layers=L,bidirectional=bi); x = np.random.randn(T,B,I).astype(np.float32)
    D=2 if bi else 1; fl = sum(2*T*B*4*H*((I if k==0 else D*H)+H)*D for k in range(L))
    row=[]
    for th in [1,2]:
        with lf.threads(th):
            for mode in [1,2]:
                m._recurrence_mode=mode; t=tm(lambda: m(x)); row.append(f"th{th} {'chk' if mode==1 else 'wid'} {t*1e3:8.3f}ms {fl/t/1e9:6.1f}GF")
    print((T,B,I,H,L,bi), ' | '.join(row), flush=True)
