"""The split chooser after a transient: a fresh process makes a shape's first 16 calls (the
chooser's first run of each way) while another process keeps CPU 1 busy for 0.5 s, waits for it
to end, then times 300 calls on two threads. A first choice of one thread taken during the busy
moment shows as calls 70-300 at one thread's time.

    python tools/chooser_transient.py          # int8 (100,16,128,128); run it a few times
"""
import subprocess
import sys
import time

import numpy as np

import lstm_fast as lf


def main():
    m = lf.LSTM(128, 128, seed=0)
    f = m.freeze(precision="int8")
    x = np.random.default_rng(0).standard_normal((100, 16, 128)).astype(np.float32)
    busy = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {1})\n"
                             "t = time.time()\nwhile time.time() - t < 0.5: pass"])
    time.sleep(0.05)
    with lf.threads(2):
        for _ in range(16):
            f(x)                      # the chooser's first runs, with CPU 1 busy
        busy.wait()
        ts = []
        for _ in range(300):
            t = time.perf_counter()
            f(x)
            ts.append(time.perf_counter() - t)
    ts = np.array(ts) * 1e3
    print(f"calls 1-50 median {np.median(ts[:50]):.3f} ms, 70-300 median {np.median(ts[70:]):.3f} ms")


if __name__ == "__main__":
    main()
