"""lstm_fast float32, bfloat16 and int8 and torch's bfloat16 module on the same weights, timed in
alternating rounds in one process: the ratios behind the reduced-precision targets of
docs/precision.md, on a host too noisy for systems timed one after the other.

    .venv/bin/python tools/precision_side_by_side.py [--threads 1,2] [--rounds 15] [--calls 5]
        [--shapes "100,1,128,128,1;100,16,128,128,1,bi"]

Each round times every system (best of --calls calls), in an order that alternates between
rounds; a row prints each system's median over the rounds and the median of the per-round
ratios (float32 / bfloat16, float32 / int8, torch bf16 module / lf bfloat16). torch is left out
when it is not installed. The process is pinned to the first --threads cores."""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lstm_fast as lf  # noqa: E402
from lstm_fast import _bench  # noqa: E402

RATIOS = (("f32/bf16", "lf float32", "lf bfloat16"), ("f32/int8", "lf float32", "lf int8"),
          ("torch bf16/lf bf16", "torch bf16 module", "lf bfloat16"))


def parse_shapes(text):
    shapes = []
    for part in text.split(";"):
        fields = part.split(",")
        T, B, I, H, L = (int(v) for v in fields[:5])
        shapes.append((T, B, I, H, L, len(fields) > 5 and fields[5] == "bi"))
    return shapes


def runners_for(shape, n_threads):
    T, B, I, H, layers, bi = shape
    model = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, seed=0)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    runners = {f"lf {p}": (lambda f=model.freeze(precision=p): f(x))
               for p in ("float32", "bfloat16", "int8")}
    try:
        import torch  # noqa: F401
    except ImportError:
        return runners
    runners["torch bf16 module"] = _bench._torch_bf16_runners(model, x, n_threads)[0]
    return runners


def side_by_side(shape, n_threads, rounds, calls):
    runners = runners_for(shape, n_threads)
    names = list(runners)
    best = {name: [] for name in names}
    with lf.threads(n_threads):
        for name in names:          # the chooser's first calls (lf_split.h) and warm caches
            for _ in range(_bench.CHOOSER_WARMUP_CALLS if n_threads > 1 else 2):
                runners[name]()
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                ts = []
                for _ in range(calls):
                    start = time.perf_counter()
                    runners[name]()
                    ts.append(time.perf_counter() - start)
                best[name].append(min(ts))
    med = {name: float(np.median(v)) * 1e3 for name, v in best.items()}
    ratios = {label: float(np.median(np.array(best[a]) / np.array(best[b])))
              for label, a, b in RATIOS if a in best and b in best}
    return med, ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--shapes", default=None, help="T,B,I,H,layers[,bi] separated by ';' (default: the bench grid)")
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes) if args.shapes else [tuple(s) for s in _bench.GRID]
    print(_bench.machine_description())
    cores = sorted(os.sched_getaffinity(0))
    for n_threads in (int(v) for v in args.threads.split(",")):
        os.sched_setaffinity(0, cores[:n_threads])
        for shape in shapes:
            med, ratios = side_by_side(shape, n_threads, args.rounds, args.calls)
            print(f"threads={n_threads} {_bench._shape_name(shape)}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in med.items()) + " ms | "
                  + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()), flush=True)
        os.sched_setaffinity(0, cores)


if __name__ == "__main__":
    main()
