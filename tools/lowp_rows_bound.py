"""Where an int8/bfloat16 layer should stop running split by rows: the same frozen models timed
with several values of lowp_rows_max_bytes (the weight bytes up to which a layer runs split by
rows, lstm_fast._cpu.derive), taken in turns within each round; the outputs must be bitwise the
same whichever way ran. Median ms per call of 7 rounds.

    .venv/bin/python tools/lowp_rows_bound.py [--precision bfloat16,int8] [--threads 1,2]
        [--bounds 786432,4194304,8388608,16777216] [--shapes "100,64,256,256,2;50,64,512,512,1"]
"""
import argparse
import time

import numpy as np

import lstm_fast as lf
from lstm_fast import _cpu, _lowp

DEFAULT_SHAPES = "100,64,256,256,2;100,16,128,128,1;50,64,512,512,1;100,256,64,64,1;25,128,1024,1024,1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bfloat16,int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--bounds", default="786432,4194304,8388608,16777216")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="T,B,I,H,layers;...")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    bounds = [int(b) for b in args.bounds.split(",")]
    isa_code, params = _cpu.kernel_settings()
    print(f"cpu: {_cpu.describe().get('model_name')}; derived lowp_rows_max_bytes "
          f"{params['lowp_rows_max_bytes']}")
    rng = np.random.default_rng(0)
    try:
        for shape in args.shapes.split(";"):
            T, B, I, H, layers = map(int, shape.split(","))
            m = lf.LSTM(I, H, num_layers=layers, seed=0)
            x = rng.standard_normal((T, B, I)).astype(np.float32)
            for precision in args.precision.split(","):
                f = m.freeze(precision=precision)
                for n in map(int, args.threads.split(",")):
                    times = {b: [] for b in bounds}
                    first = None
                    with lf.threads(n):
                        for _ in range(args.rounds):
                            for b in bounds:
                                _lowp._set_kernel(isa_code, dict(params, lowp_rows_max_bytes=b))
                                f(x)                 # past the split/one-thread chooser's runs
                                start = time.perf_counter()
                                out = f(x)[0]
                                times[b].append(time.perf_counter() - start)
                                if first is None:
                                    first = out
                                assert np.array_equal(first, out), "the bits changed with the bound"
                    print(f"({T},{B},{I},{H},{layers}) {precision} threads {n}: " + "  ".join(
                        f"bound {b // 1024}K {np.median(times[b]) * 1e3:.2f} ms" for b in bounds),
                        flush=True)
    finally:
        _cpu._apply()


if __name__ == "__main__":
    main()
