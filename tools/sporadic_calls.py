"""Calls spaced by pauses (a server's sporadic requests), default threads against one thread,
idle or with one core busy: the regime the split chooser measures apart (src/lf_split.h).

Run: .venv/bin/python tools/sporadic_calls.py [--gap-ms 5] [--busy] [--train]
Prints the median latency of each shape on 2 threads and on 1, calls `gap` apart."""
import argparse
import subprocess
import sys
import time

import numpy as np

import lstm_fast as lf

SHAPES = [(100, 1, 32, 64), (100, 1, 128, 128), (100, 16, 128, 128)]
TRAIN_SHAPE = (30, 32, 1, 32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gap-ms", type=float, default=5.0)
    ap.add_argument("--busy", action="store_true", help="a busy loop on another core")
    ap.add_argument("--train", action="store_true", help="the small training step instead")
    ap.add_argument("--calls", type=int, default=150)
    args = ap.parse_args()
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c",
                                 "import time\nend = time.monotonic() + 900\n"
                                 "while time.monotonic() < end: pass"])
    try:
        for T, B, I, H in [TRAIN_SHAPE] if args.train else SHAPES:
            m = lf.LSTM(I, H)
            x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
            g = np.ones((T, B, H), np.float32)

            def call():
                if args.train:
                    _, _, cache = m.forward_train(x)
                    m.backward(cache, g)
                else:
                    m(x)

            med = {}
            for _ in range(3):
                for n in (2, 1):
                    with lf.threads(n):
                        ts = []
                        for _ in range(args.calls):
                            time.sleep(args.gap_ms / 1000)
                            t = time.perf_counter()
                            call()
                            ts.append(time.perf_counter() - t)
                    med.setdefault(n, []).append(np.median(ts[20:]))   # after the first runs
            two, one = np.median(med[2]), np.median(med[1])
            print(f"{'train' if args.train else 'infer'} T{T} B{B} I{I} H{H}, a call every "
                  f"{args.gap_ms:g} ms{' (one core busy)' if args.busy else ''}: 2 threads "
                  f"{two * 1e3:.3f} ms, 1 thread {one * 1e3:.3f} ms, 2t/1t {two / one:.2f}",
                  flush=True)
    finally:
        if busy is not None:
            busy.kill()


if __name__ == "__main__":
    main()
