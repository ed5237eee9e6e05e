"""Two builds of lstm_fast timed in turn, one shape: the before/after figures of
docs/performance.md and the CHANGELOG on a noisy shared host.

Copy each built package (the `lstm_fast` folder with its compiled modules) into a folder of its
own, then:

    .venv/bin/python tools/ab_compare.py OLD_DIR NEW_DIR T B I H LAYERS THREADS ROUNDS CALLS [train|int8|bfloat16|step-PRECISION]

(step-float32, step-bfloat16, step-int8: T calls of the frozen model's `step`, state carried;
step-live: the same of the live float32 model.)

FORCE_PATH=avx512_fma (or any path of lstm_fast._precision._FORCEABLE) in the environment freezes
the reduced-precision models on that path in both builds.

Each build runs in a persistent worker process; the two are asked in turns (alternating which
goes first) for the best of CALLS calls, ROUNDS times, so that both see the same phases of the
host, pinned to the same first THREADS cores. Prints the min and median of each and the median
of the per-round ratios."""
import os
import subprocess
import sys

import numpy as np

WORKER = r'''
import os, sys, time, numpy as np
T, B, I, H, L, threads, calls = map(int, sys.argv[1:8])
what = sys.argv[8] if len(sys.argv) > 8 else ""
train = what == "train"
stepping = what.startswith("step-")
# both builds on the same cores: a worker left on a vCPU whose host core is busier reads slower
# for the whole run (seen here: medians 0.28 against 0.40 ms, swapping sides between runs)
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:max(threads, 1)])
import lstm_fast as lf
m = lf.LSTM(I, H, num_layers=L)
if os.environ.get("FORCE_PATH"):   # a reduced-precision path forced, as the tests force it
    from lstm_fast import _precision
    _precision._force_path(os.environ["FORCE_PATH"])
f = m.freeze(precision=what.replace("step-", "")) if what.replace("step-", "") in ("int8", "bfloat16", "float32") else m
x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
g = np.ones((T, B, H), np.float32)
def run():
    if train:
        _, _, cache = m.forward_train(x)
        m.backward(cache, g)
    elif stepping:
        state = f.zero_state(B)
        for t in range(T):
            _, state = f.step(x[t], state)
    else:
        f(x)
with lf.threads(threads):
    run(); run()
    for _ in sys.stdin:
        ts = []
        for _ in range(calls):
            t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
        print(min(ts), flush=True)
'''


def main(argv):
    if len(argv) < 10:
        sys.exit(__doc__)
    dirs = {"old": argv[0], "new": argv[1]}
    for d in dirs.values():
        # the worker imports lstm_fast from its working folder: without a package there it would
        # silently time the checkout's own build on both sides
        if not os.path.isfile(os.path.join(d, "lstm_fast", "__init__.py")):
            sys.exit(f"{d} holds no lstm_fast package: copy a build's lstm_fast folder into it")
    T, B, I, H, L, threads, rounds, calls = map(int, argv[2:10])
    extra = argv[10:11]
    procs = {v: subprocess.Popen([sys.executable, "-c", WORKER]
                                 + [str(a) for a in (T, B, I, H, L, threads, calls)] + extra,
                                 cwd=d, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for v, d in dirs.items()}
    times = {"old": [], "new": []}
    try:
        for r in range(rounds):
            for v in (("old", "new") if r % 2 == 0 else ("new", "old")):
                procs[v].stdin.write("go\n")
                procs[v].stdin.flush()
                times[v].append(float(procs[v].stdout.readline()))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    old, new = np.array(times["old"]), np.array(times["new"])
    print(f"T{T} B{B} I{I} H{H} L{L}, {threads} thread(s){' ' + extra[0] if extra else ''}: "
          f"old min {old.min() * 1e3:.2f} med {np.median(old) * 1e3:.2f} ms | new min "
          f"{new.min() * 1e3:.2f} med {np.median(new) * 1e3:.2f} ms | new/old min "
          f"{new.min() / old.min():.3f}, median of ratios {np.median(new / old):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
