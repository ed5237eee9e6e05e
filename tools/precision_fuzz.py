"""Random models through every reduced-precision path this CPU runs: a longer check than the
test suite's fixed shapes, for a new CPU (on one with AMX it also compares the tiles with their
emulation on whole models).

For each of N random models (input and hidden sizes, layers, directions, projection, batch,
sequence length, lengths, initial states, thread count, input scale):
- int8: every path gives the generic path's bits (exact integer sums);
- bfloat16: the paths that compute VDPBF16PS's chain (avx512_bf16, avx512_fma, avx2_fma) give the
  generic path's bits, the hardware tiles (amx) the emulated tiles' bits (amx_emulated);
- every output is finite where the float32 model's is. The error against float32 is printed,
  the largest per precision, not judged: on random models with few hidden units and many
  inputs (weights of +-0.5, inputs scaled by 10) int8's error reaches tenths, as any dynamic
  int8 quantization's would; tests/test_precision.py judges the documented accuracy;
- one direction: steps give the sequence's bits;
- then N // 4 models of the shapes two threads split (by units: fewer than 8 rows, one direction,
  no projection, H a multiple of 32, 32 steps or more; by directions: bidirectional), each run
  with the split forced and the team joining after a random number of steps, and with one thread
  forced: the bits must be the same, and the same as the generic path's (as above).

    python tools/precision_fuzz.py [N] [SEED]
Prints each mismatch, the largest errors and a last line "N models, M mismatches"; exits 1 on any
mismatch.
"""
import sys

import numpy as np

import lstm_fast as lf
from lstm_fast import _lowp, _precision

FEAT = _lowp.cpu_features()
PATHS = {
    "int8": ["generic", "amx_emulated"] + [p for p, f in (("avx512_vnni", "avx512_vnni"), ("avx2", "avx2"),
                                                           ("amx", "amx_granted")) if FEAT[f]],
    "bfloat16": ["generic", "amx_emulated"] + [p for p, f in (("avx512_bf16", "avx512_bf16"),
                                                               ("avx512_fma", "avx512_fma"),
                                                               ("avx2_fma", "avx2_fma"),
                                                               ("amx", "amx_granted")) if FEAT[f]],
}
# whose bits each path must give, per precision
SAME_AS = {("bfloat16", "amx"): "amx_emulated", ("bfloat16", "amx_emulated"): None}


def flat(res):
    out, (h, c) = res
    return [out, h, c]


def run(model, precision, path, x, hx, lengths, n_threads):
    _precision._force_path(path)
    try:
        frozen = model.freeze(precision=precision)
    finally:
        _precision._force_path(None)
    with lf.threads(n_threads):
        res = flat(frozen(x, hx, lengths=lengths))
        steps = None
        if not model.bidirectional and lengths is None:
            state = hx if hx is not None else frozen.zero_state(x.shape[1])
            steps = []
            for t in range(x.shape[0]):
                y, state = frozen.step(x[t], state)
                steps.append(y)
            steps = [np.stack(steps), *state]
    return res, steps


def split_models(n_models, rng):
    """Models the two-thread splits take: split forced (the team joining after `alone` steps)
    against one thread forced, same path, bit for bit."""
    bad = 0
    runs = {w: _lowp.split_runs(w) for w in ("units", "directions")}
    for i in range(n_models):
        H, I = 32 * int(rng.integers(2, 7)), int(rng.integers(1, 200))
        T, B = int(rng.integers(32, 90)), int(rng.integers(1, 8))
        layers, bi = int(rng.integers(1, 3)), bool(rng.integers(0, 2))
        proj = int(rng.integers(1, H)) if bi and rng.random() < 0.3 else 0
        model = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, proj_size=proj, seed=1000 + i)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        lengths = rng.integers(1, T + 1, size=B) if rng.random() < 0.5 else None
        alone = int(rng.integers(0, T + 1))
        desc = dict(I=I, H=H, layers=layers, bi=bi, proj=proj, B=B, T=T, lengths=lengths is not None,
                    alone=alone)
        for precision, paths in PATHS.items():
            one = {}
            for p in paths:
                _precision._force_path(p)
                try:
                    frozen = model.freeze(precision=precision)
                finally:
                    _precision._force_path(None)
                res = {}
                try:
                    for way in ("one", "split"):
                        _lowp.set_split_way(way)
                        _lowp.set_split_alone(alone if way == "split" else 0)
                        with lf.threads(2):
                            res[way] = flat(frozen(x, lengths=lengths))
                finally:
                    _lowp.set_split_way("measured")
                    _lowp.set_split_alone(0)
                one[p] = res["one"]
                if not all(np.array_equal(a, b) for a, b in zip(res["one"], res["split"])):
                    bad += 1
                    print("MISMATCH split", precision, p, desc, flush=True)
                ref = SAME_AS.get((precision, p), "generic")
                if ref is not None and ref in one and not all(
                        np.array_equal(a, b) for a, b in zip(res["one"], one[ref])):
                    bad += 1
                    print("MISMATCH one thread: bits differ from", ref, precision, p, desc, flush=True)
    ran = ", ".join(f"{_lowp.split_runs(w) - n} layers split by {w}" for w, n in runs.items())
    print(f"{n_models} split models checked ({ran})", flush=True)
    return bad


def main(n_models=100, seed=0):
    rng = np.random.default_rng(seed)
    bad = 0
    worst = {p: (0.0, None) for p in PATHS}
    for i in range(n_models):
        I, H = int(rng.integers(1, 300)), int(rng.integers(1, 160))
        layers, bi = int(rng.integers(1, 3)), bool(rng.integers(0, 2))
        proj = int(rng.integers(1, H)) if H > 1 and rng.random() < 0.3 else 0
        B, T = int(rng.choice([1, 2, 3, 5, 16, 17, 33, 70])), int(rng.integers(1, 7))
        model = lf.LSTM(I, H, num_layers=layers, bidirectional=bi, proj_size=proj, seed=i)
        scale = float(rng.choice([0.01, 1.0, 10.0]))   # of the inputs
        x = (rng.standard_normal((T, B, I)) * scale).astype(np.float32)
        lengths = None
        if rng.random() < 0.5:
            lengths = rng.integers(1, T + 1, size=B)
            lengths[0] = T
        hx = None
        if rng.random() < 0.5:
            n = layers * (2 if bi else 1)
            hx = (rng.standard_normal((n, B, proj or H)).astype(np.float32),
                  rng.standard_normal((n, B, H)).astype(np.float32))
        n_threads = int(rng.integers(1, 3))
        exact = flat(model(x, hx, lengths=lengths))
        desc = dict(I=I, H=H, layers=layers, bi=bi, proj=proj, B=B, T=T, lengths=lengths is not None,
                    hx=hx is not None, threads=n_threads, scale=scale)
        for precision, paths in PATHS.items():
            got = {p: run(model, precision, p, x, hx, lengths, n_threads) for p in paths}
            for p, (res, steps) in got.items():
                ref = SAME_AS.get((precision, p), "generic")
                problems = []
                if ref is not None and not all(np.array_equal(a, b) for a, b in zip(res, got[ref][0])):
                    problems.append(f"bits differ from {ref}")
                err = max(float((np.abs(a - b) / (1 + np.abs(b))).max(initial=0.0)) for a, b in zip(res, exact))
                if not all(np.isfinite(a[np.isfinite(b)]).all() for a, b in zip(res, exact)):
                    problems.append("not finite where float32 is")
                if err > worst[precision][0]:
                    worst[precision] = (err, desc)
                if steps is not None and not all(np.array_equal(a, b) for a, b in zip(steps, res)):
                    problems.append("steps differ from the sequence")
                if problems:
                    bad += 1
                    print("MISMATCH", precision, p, desc, "; ".join(problems), flush=True)
    bad += split_models(max(n_models // 4, 1), rng)
    for precision, (err, desc) in worst.items():
        print(f"largest {precision} error against float32, |a - b| / (1 + |b|): {err:.3g} ({desc})")
    print(f"{n_models} models, {bad} mismatches")
    return bad


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    sys.exit(1 if main(*args) else 0)
