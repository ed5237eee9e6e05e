"""Reduced-precision layers on 2 threads against 1, idle and with one core busy (docs/threads.md).

    python tools/lowp_threads.py            # idle, then busy (a bounded helper process, killed)

Per shape and precision: 30 warm-up calls (the thread choice tries both ways in its first 16),
then the median of 15 calls, ms, and the 2-thread/1-thread ratio.
"""
import subprocess
import sys
import time

import numpy as np

import lstm_fast as lf

SHAPES = [(100, 16, 128, 128), (100, 64, 256, 256), (50, 64, 512, 512), (100, 256, 64, 64)]
BUSY = "import time\nend = time.time() + 300\nwhile time.time() < end: pass"


def median_ms(f, warmup=30, n=15):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return float(np.median(ts)) * 1e3


def table(label):
    rng = np.random.default_rng(0)
    for T, B, I, H in SHAPES:
        m = lf.LSTM(I, H, seed=0)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        cells = []
        for precision in ("bfloat16", "int8"):
            f = m.freeze(precision=precision)
            ms = {}
            for n in (2, 1):
                with lf.threads(n):
                    ms[n] = median_ms(lambda: f(x))
            cells.append(f"{precision} 2t {ms[2]:.2f} 1t {ms[1]:.2f} ({ms[2] / ms[1]:.2f}x)")
        print(f"{label} {(T, B, I, H)}: " + " | ".join(cells), flush=True)


def main():
    from lstm_fast._precision import path_for
    print("paths: bfloat16", path_for("bfloat16"), "int8", path_for("int8"), flush=True)
    table("idle")
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        table("busy")
    finally:
        busy.kill()
        busy.wait()


if __name__ == "__main__":
    main()
