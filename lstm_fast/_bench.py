"""`python -m lstm_fast bench [--compare]`: lstm_fast side by side with torch and ONNX Runtime.

Every system runs the same float32 weights and inputs, at the same thread count, interleaved within
each shape (round-robin over the systems, repeated), and the table reports medians. The GEMM
column is the time the same BLAS takes, in the same run, for the matrix products alone (the input
projection and T recurrent products per layer and direction); its ratio to lstm_fast's time says
how close the whole LSTM comes to the machine's GEMM limit. The "frozen" column is the same model
after ``freeze()`` (weights packed once, as ONNX Runtime does when it makes a session), the
lstm_fast columns the model as trained (weights packed anew by every call).
"""
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from . import LSTM, threads
from ._config import config

GRID = [
    # (T, B, I, H, layers, bidirectional)
    (100, 1, 32, 64, 1, False),
    (100, 1, 128, 128, 1, False),
    (1000, 1, 16, 32, 1, False),
    (100, 16, 128, 128, 1, False),
    (100, 16, 128, 128, 1, True),
    (100, 64, 256, 256, 2, False),
    (100, 256, 64, 64, 1, False),
    (50, 64, 512, 512, 1, False),
    (25, 128, 1024, 1024, 1, False),
]
QUICK_GRID = [GRID[0], GRID[3], GRID[4]]
GEMM_PAUSE = 0.3   # seconds after the threaded GEMM reference, before the next system runs


def flops(T, B, I, H, layers, bidirectional):
    """2*T*B*4H*(in + H) per layer and direction."""
    D = 2 if bidirectional else 1
    return sum(2 * T * B * 4 * H * ((I if k == 0 else D * H) + H) * D for k in range(layers))


CHOOSER_WARMUP_CALLS = 16


def _warm_up(runners, names, n_threads):
    """On several threads, call lstm_fast's runners CHOOSER_WARMUP_CALLS times first: a shape's
    first calls measure one thread and then split mode, a run of 8 calls each (lf_split.h), before
    the faster is chosen. A bench of a few calls a round would otherwise time that exploring (the
    int8 and bfloat16 layers of 100 ms took one thread in 8 of their first 10 calls); bench
    --contended times it on purpose and has no warm-up."""
    if n_threads > 1:
        for name in names:
            if name in runners:
                for _ in range(CHOOSER_WARMUP_CALLS):
                    runners[name]()


def _timer(fn, min_time):
    """Seconds per call of fn, calling it enough times to fill min_time, after untimed calls for
    as long again (at least one). Every system gets the same: each is timed in its steady state,
    not in the wake-up that follows the pause before it (AMD EPYC Zen 4 KVM guest, two threads,
    (100,16,128,128): after 0.3 s idle, the 3rd to about the 13th call ran at one thread's speed,
    4.2 ms against 2.2, while the sleeping worker's vCPU was slow to wake; docs/threads.md)."""
    fn()
    start = time.perf_counter()
    while time.perf_counter() - start < min_time:
        fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def _torch_runner(model, x, n_threads):
    import torch

    torch.set_num_threads(n_threads)
    t = torch.nn.LSTM(model.input_size, model.hidden_size, num_layers=model.num_layers,
                      bidirectional=model.bidirectional).eval()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    xt = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            t(xt)
    return run


def onnx_model(model):
    """An ONNX graph of model's layers: LSTM nodes (gate order i,o,f,c), with Transpose+Reshape
    between layers to turn Y (T, D, B, H) into the next layer's (T, B, D*H)."""
    from onnx import TensorProto, helper, numpy_helper

    sd, H, D = model.state_dict(), model.hidden_size, model.num_directions
    to_onnx = [0, 3, 1, 2]   # torch blocks i,f,g,o -> ONNX i,o,f,c

    def reorder(w):
        return np.concatenate([w.reshape(4, H, -1)[q] for q in to_onnx]).reshape(w.shape)

    nodes, inits, current = [], [], "X"
    for k in range(model.num_layers):
        names = [f"_l{k}", f"_l{k}_reverse"][:D]
        W = np.stack([reorder(sd["weight_ih" + n]) for n in names])
        R = np.stack([reorder(sd["weight_hh" + n]) for n in names])
        B = np.stack([np.concatenate([reorder(sd["bias_ih" + n]), reorder(sd["bias_hh" + n])]) for n in names])
        for name, arr in (("W", W), ("R", R), ("B", B)):
            inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{name}{k}"))
        nodes.append(helper.make_node("LSTM", [current, f"W{k}", f"R{k}", f"B{k}"], [f"Y{k}"],
                                      hidden_size=H, direction="bidirectional" if D == 2 else "forward"))
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]))
        inits.append(numpy_helper.from_array(np.array([0, 0, D * H], np.int64), f"shape{k}"))
        nodes.append(helper.make_node("Reshape", [f"Yt{k}", f"shape{k}"], [f"out{k}"]))
        current = f"out{k}"
    graph = helper.make_graph(
        nodes, "lstm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None, model.input_size])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _ort_runner(model, x, n_threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_model(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])

    def run():
        sess.run(None, {"X": x})
    return run


def _gemm_runner(T, B, I, H, layers, bidirectional, n_threads):
    """The LSTM's matrix products alone, through the kernels' own BLAS wrapper without the GIL
    (no Python per product): per layer and direction, the input projection (T*B, in) x (in, 4H)
    and T recurrent products (B, H) x (H, 4H). BLAS runs with n_threads."""
    from threadpoolctl import threadpool_limits

    from ._forward import gemm_repeat_py

    D = 2 if bidirectional else 1
    rng = np.random.default_rng(0)
    products = []
    for k in range(layers):
        in_k = I if k == 0 else D * H
        for m, kk, repeats in ((T * B, in_k, 1), (B, H, T)):
            a = rng.random((m, kk), np.float32)
            b = rng.random((4 * H, kk), np.float32)
            products.append((a, b, np.empty((m, 4 * H), np.float32), repeats))

    def run():
        with threadpool_limits(n_threads, user_api="blas"):
            for _ in range(D):
                for a, b, c, repeats in products:
                    gemm_repeat_py(a, b, c, repeats)
    return run


def _peak_runner(n, n_threads):
    """numpy float32 matmul of n x n matrices with n_threads BLAS threads: the sgemm peak, timed
    in the same rounds as the systems (a peak measured once before the grid meets other phases
    of a shared host than the rows it is compared with)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n), np.float32)
    b = np.random.default_rng(1).random((n, n), np.float32)

    def run():
        with threadpool_limits(n_threads, user_api="blas"):
            a @ b
    return run


TRAIN_GRID = GRID   # the training target covers every grid shape


def _torch_train_runner(model, x, n_threads):
    import torch

    torch.set_num_threads(n_threads)
    t = torch.nn.LSTM(model.input_size, model.hidden_size, num_layers=model.num_layers,
                      bidirectional=model.bidirectional)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    xt = torch.from_numpy(x).requires_grad_()

    def run():
        t.zero_grad()
        out, _ = t(xt)
        out.sum().backward()
    return run


def _lf_train_runner(model, x):
    out, _ = model(x)
    grad = np.ones_like(out)

    def run():
        _, _, cache = model.forward_train(x)
        model.backward(cache, grad)
    return run


def run_training(thread_counts=(1, 2), repeats=5, min_time=0.05, quick=False, pause=0.05,
                 grid=None):
    """Forward + backward of a sum loss: lstm_fast against torch autograd, interleaved (grid:
    the shapes, default the whole grid)."""
    grid = grid or (TRAIN_GRID[:2] if quick else TRAIN_GRID)
    if quick:
        repeats, min_time = 2, 0.01
    print("Machine:\n" + machine_description())
    rows = []
    for n_threads in thread_counts:
        for shape in grid:
            T, B, I, H, layers, bi = shape
            model = LSTM(I, H, num_layers=layers, bidirectional=bi, seed=0)
            x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
            runners = {"lstm_fast": _lf_train_runner(model, x)}
            try:
                runners["torch"] = _torch_train_runner(model, x, n_threads)
            except ImportError:
                pass
            times = {name: [] for name in runners}
            with threads(n_threads):
                _warm_up(runners, ["lstm_fast"], n_threads)
                for _ in range(repeats):
                    for name, fn in runners.items():
                        time.sleep(pause)
                        times[name].append(_timer(fn, min_time))
            med = {name: float(np.median(ts)) for name, ts in times.items()}
            ratio = med.get("torch", np.nan) / med["lstm_fast"]
            rows.append((n_threads, shape, med["lstm_fast"], med.get("torch", np.nan), ratio))
            print(f"{n_threads} thr  {_shape_name(shape):<28} forward+backward: lstm_fast "
                  f"{med['lstm_fast'] * 1e3:9.3f} ms  torch autograd {med.get('torch', np.nan) * 1e3:9.3f} ms  "
                  f"speedup {ratio:5.2f}x", flush=True)
    return rows


PEAK_N = 2048
PEAK_CODE = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
n, threads = int(sys.argv[1]), [int(t) for t in sys.argv[2].split(",")]
a = np.random.default_rng(0).random((n, n), np.float32)
b = np.random.default_rng(1).random((n, n), np.float32)
out = {}
for t in threads:
    with threadpool_limits(t):
        a @ b
        best = 1e9
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    out[t] = 2.0 * n ** 3 / best / 1e9
print(json.dumps(out))
"""


def sgemm_peak(thread_counts=(1, 2), n=PEAK_N):
    """numpy float32 matmul of n x n matrices (best of 5), GFLOP/s per thread count, measured in
    two child processes: with the environment as it is, and with OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE removed (OpenBLAS reads them when it loads, so only a new process can measure
    without them). Returns {"as set": {threads: GF/s}, "unset": {...}, "env": the values}."""
    counts = ",".join(str(t) for t in thread_counts)
    env_names = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    result = {"env": {k: os.environ.get(k) for k in env_names}, "n": n}
    for label, drop in (("as set", ()), ("unset", env_names)):
        env = {k: v for k, v in os.environ.items() if k not in drop}
        try:
            out = subprocess.run([sys.executable, "-c", PEAK_CODE, str(n), counts], env=env,
                                 capture_output=True, text=True, timeout=600)
            result[label] = {int(k): v for k, v in json.loads(out.stdout).items()}
        except (OSError, ValueError, subprocess.TimeoutExpired):
            result[label] = {}
    return result


def peak_lines(peak):
    env = ", ".join(f"{k}={v}" for k, v in peak["env"].items())
    lines = []
    for label in ("as set", "unset"):
        values = ", ".join(f"{t} thread{'s' if t > 1 else ''} {g:.1f} GF/s"
                           for t, g in sorted(peak.get(label, {}).items()))
        what = f"environment as set ({env})" if label == "as set" else \
            "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset for this measurement"
        lines.append(f"- sgemm peak (numpy float32 matmul {peak['n']}^3), {what}: {values or 'n/a'}")
    return lines


def machine_description():
    info = config()
    keys = ["cpu", "cpu_description", "cpu_isa", "kernel_params", "cores_available", "blas", "openmp", "threads", "OMP_NUM_THREADS",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "build_flags", "numpy", "scipy"]
    lines = [f"- {k}: {info.get(k)}" for k in keys]
    lines.append(f"- OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE set: "
                 f"{'yes' if os.environ.get('OPENBLAS_CORETYPE') or os.environ.get('OPENBLAS_L2_SIZE') else 'no'}")
    try:
        import torch

        lines.append(f"- torch: {torch.__version__}")
    except ImportError:
        pass
    try:
        import onnxruntime

        lines.append(f"- onnxruntime: {onnxruntime.__version__}")
    except ImportError:
        pass
    lines.append(f"- python: {platform.python_version()}, {platform.platform()}")
    return "\n".join(lines)


@contextlib.contextmanager
def _path(isa):
    """lstm_fast on kernel path `isa` (lstm_fast._cpu._set_isa) for the block, then back."""
    from . import _cpu

    before = _cpu._override
    _cpu._set_isa(isa)
    try:
        yield
    finally:
        _cpu._set_isa(before)


def run(compare=False, quick=False, thread_counts=(1, 2), repeats=5, min_time=0.05,
        out_md="bench.md", out_png="bench.png", pause=0.05, blas=False, peak=True, grid=None):
    """blas: also time lstm_fast's BLAS fallback (the generic path: BLAS products and the
    compiler-vectorised cell, what a CPU without AVX-512 and AVX2 runs), column "blas".
    peak: measure the sgemm peak first (sgemm_peak, best of 5, with the environment as set and
    without OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE), then time it again in every round beside the
    systems: each row's "of sgemm peak" is lstm_fast's median GFLOP/s over the median peak of
    the same rounds."""
    from . import _cpu

    grid = grid or (QUICK_GRID if quick else GRID)
    if quick:
        repeats, min_time = 3, 0.01
    systems = ["lstm_fast", "gemm"]
    if compare:
        for name, module in (("torch", "torch"), ("onnxruntime", "onnxruntime")):
            try:
                __import__(module)
                systems.append(name)
            except ImportError:
                print(f"({name} is not installed: left out; pip install lstm-fast[compare])")
    desc = machine_description()
    desc += f"\n- lstm_fast kernel path: {_cpu.isa()} (LSTM_FAST_ISA={os.environ.get('LSTM_FAST_ISA')!r})"
    for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        if os.environ.get(name):
            desc += f"\n- {name}={os.environ[name]} (torch's environment)"
    peaks = {}
    peak_n = 512 if quick else PEAK_N
    if peak:
        measured = sgemm_peak(thread_counts, n=peak_n)
        desc += "\n" + "\n".join(peak_lines(measured))
        for t in thread_counts:
            values = [measured.get(k, {}).get(t) for k in ("as set", "unset")]
            values = [v for v in values if v]
            if values:
                peaks[t] = max(values)
    print("Machine:\n" + desc)
    rows = []
    for n_threads in thread_counts:
        for shape in grid:
            T, B, I, H, layers, bi = shape
            model = LSTM(I, H, num_layers=layers, bidirectional=bi, seed=0)
            x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
            frozen = model.freeze()
            runners = {"lstm_fast": lambda: model(x), "frozen": lambda: frozen(x),
                       "gemm": _gemm_runner(T, B, I, H, layers, bi, n_threads)}
            if "torch" in systems:
                runners["torch"] = _torch_runner(model, x, n_threads)
            if "onnxruntime" in systems:
                runners["onnxruntime"] = _ort_runner(model, x, n_threads)
            contexts = {}
            if peak:
                runners["peak"] = _peak_runner(peak_n, n_threads)
            if blas:
                runners["blas"] = lambda: model(x)
                contexts["blas"] = lambda: _path("generic")
            times = {name: [] for name in runners}
            with threads(n_threads):
                _warm_up(runners, ["lstm_fast", "frozen"], n_threads)
                previous = None
                for _ in range(repeats):          # interleaved: every system once per round
                    for name, fn in runners.items():
                        # let the previous system's spinning threads idle; OpenBLAS's workers
                        # spin for about 2^28 cycles (70 ms here) after a threaded call: with
                        # 50 ms, the (100,1,128,128) call after it took 0.34 ms against 0.23
                        time.sleep(GEMM_PAUSE if previous in ("gemm", "peak") and n_threads > 1
                                   else pause)
                        with contexts.get(name, contextlib.nullcontext)():
                            times[name].append(_timer(fn, min_time))
                        previous = name
            med = {name: float(np.median(ts)) for name, ts in times.items()}
            peers = [med[p] for p in ("torch", "onnxruntime") if p in med]
            row = dict(threads=n_threads, shape=shape, ms=med["lstm_fast"] * 1e3,
                       gflops=flops(*shape) / med["lstm_fast"] / 1e9,
                       gemm_fraction=med["gemm"] / med["lstm_fast"],
                       torch_ms=med.get("torch", np.nan) * 1e3,
                       ort_ms=med.get("onnxruntime", np.nan) * 1e3,
                       speedup=(min(peers) / med["lstm_fast"]) if peers else np.nan,
                       frozen_ms=med["frozen"] * 1e3,
                       frozen_speedup=(min(peers) / med["frozen"]) if peers else np.nan,
                       peak_fraction=(flops(*shape) / med["lstm_fast"]
                                      / (2.0 * peak_n ** 3 / med["peak"])) if "peak" in med else np.nan,
                       peak_gflops=2.0 * peak_n ** 3 / med["peak"] / 1e9 if "peak" in med else np.nan,
                       peak_before=peaks.get(n_threads, np.nan),
                       blas_ms=med.get("blas", np.nan) * 1e3,
                       blas_speedup=med.get("blas", np.nan) / med["lstm_fast"])
            rows.append(row)
            print(_format_row(row), flush=True)
    table = _markdown(rows)
    with open(out_md, "w") as f:
        f.write("Machine:\n\n" + desc + "\n\n" + table + "\n")
    print(f"\nwrote {out_md}")
    _plot(rows, out_png)
    return rows


def _shape_name(shape):
    T, B, I, H, layers, bi = shape
    return f"T{T} B{B} I{I} H{H} L{layers}{' bi' if bi else ''}"


def _format_row(r):
    return (f"{r['threads']} thr  {_shape_name(r['shape']):<28} lstm_fast {r['ms']:9.3f} ms "
            f"{r['gflops']:6.1f} GF/s  torch {r['torch_ms']:9.3f}  ort {r['ort_ms']:9.3f}  "
            f"speedup vs fastest peer {r['speedup']:5.2f}x  GEMM fraction {r['gemm_fraction']:.2f}  "
            f"frozen {r['frozen_ms']:9.3f} ms {r['frozen_speedup']:5.2f}x  "
            f"of sgemm peak {r.get('peak_fraction', np.nan):.2f} "
            f"(peak {r.get('peak_gflops', np.nan):.0f} GF/s in these rounds)"
            + (f"  blas fallback {r['blas_ms']:9.3f} ms ({r['blas_speedup']:.2f}x)"
               if not np.isnan(r.get("blas_ms", np.nan)) else ""))


def _markdown(rows):
    has_blas = any(not np.isnan(r.get("blas_ms", np.nan)) for r in rows)
    lines = ["| threads | T, B, I, H, layers | lstm_fast ms | GFLOP/s | torch ms | ORT ms | "
             "speedup vs fastest peer | GEMM-limit fraction | of sgemm peak (peak GF/s, same rounds) | frozen ms | "
             "frozen speedup |" + (" BLAS fallback ms | vs BLAS fallback |" if has_blas else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if has_blas else "")]
    for r in rows:
        line = (f"| {r['threads']} | {_shape_name(r['shape'])} | {r['ms']:.3f} | {r['gflops']:.1f} | "
                f"{r['torch_ms']:.3f} | {r['ort_ms']:.3f} | {r['speedup']:.2f}x | "
                f"{r['gemm_fraction']:.2f} | {r.get('peak_fraction', np.nan):.2f} "
                f"({r.get('peak_gflops', np.nan):.0f}) | "
                f"{r['frozen_ms']:.3f} | {r['frozen_speedup']:.2f}x |")
        if has_blas:
            line += f" {r['blas_ms']:.3f} | {r['blas_speedup']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, n_threads in zip(axes, sorted({r["threads"] for r in rows})):
        sel = [r for r in rows if r["threads"] == n_threads]
        labels = [_shape_name(r["shape"]) for r in sel]
        y = np.arange(len(sel))
        ax.barh(y - 0.2, [r["speedup"] for r in sel], height=0.4, color="C0", label="LSTM")
        ax.barh(y + 0.2, [r["frozen_speedup"] for r in sel], height=0.4, color="C1",
                label="LSTM.freeze()")
        ax.axvline(1.0, color="k", lw=1)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_title(f"{n_threads} thread{'s' if n_threads > 1 else ''}")
        ax.set_xlabel("speedup over the fastest of torch / ONNX Runtime")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


# The small training step of issue 18: LSTM(1, 32), batch 32, T=30, forward_train + backward.
SMALL_TRAIN = (30, 32, 1, 32, 1, False)
BUSY_CODE = "import time, sys\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"


@contextlib.contextmanager
def busy_core(seconds):
    """A helper process spinning on one core for at most `seconds` (its own bound), killed on exit
    of the block whatever happens."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_CODE, str(seconds)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)    # let it start spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


def run_contended(quick=False, repeats=5, min_time=0.1, out_md=None, pause=0.02, busy_seconds=900):
    """Each shape idle and with one core busy, default threads and one thread, torch beside (same
    thread counts): the figures of docs/threads.md. Times are the mean per call (stalls count)."""
    from . import get_num_threads

    grid = [GRID[0], GRID[3]] if quick else list(GRID)
    if quick:
        repeats, min_time, busy_seconds = 1, 0.005, 60
    default = get_num_threads()
    counts = [default, 1] if default != 1 else [1]
    try:
        import torch  # the runs set its thread count
        have_torch = True
    except ImportError:
        have_torch = False
    # described before the runs: torch.set_num_threads in them can leave the OpenMP count changed
    desc = machine_description()
    print("Machine:\n" + desc)
    wait = f"- omp_wait: {config().get('omp_wait', 'libgomp default')}"
    print(wait)
    print(f"- busy: a helper process spinning on one core; thread counts {counts}; "
          f"mean ms per call, median of {repeats} rounds (thread counts in turns)", flush=True)
    cases = [("train " + _shape_name(SMALL_TRAIN), SMALL_TRAIN, True)]
    cases += [("infer " + _shape_name(s), s, False) for s in grid]
    results = {}

    def measure(load):
        for label, shape, train in cases:
            T, B, I, H, layers, bi = shape
            model = LSTM(I, H, num_layers=layers, bidirectional=bi, seed=0)
            x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
            runners = {}
            for n in counts:
                runners[(n, "lstm_fast")] = (_lf_train_runner(model, x) if train
                                             else (lambda m=model, x=x: m(x)))
                if have_torch:
                    runners[(n, "torch")] = (_torch_train_runner if train else _torch_runner)(model, x, n)
            times = {key: [] for key in runners}
            # the thread counts take turns within each round, so that the host's slow phases
            # (seconds long on a shared machine) fall on both sides of the busy 2t/1t ratio
            for _ in range(repeats):
                for (n, name), fn in runners.items():
                    with threads(n):
                        if name == "torch":
                            torch.set_num_threads(n)
                        time.sleep(pause)
                        times[(n, name)].append(_timer(fn, min_time))
            for (n, name), ts in times.items():
                results[(label, load, n, name)] = float(np.median(ts))
            for n in counts:
                print(f"  {load:<4} {n} thr  {label:<34} " + "  ".join(
                    f"{name} {results[(label, load, n, name)] * 1e3:8.3f} ms"
                    for name in ("lstm_fast", "torch") if (n, name) in runners), flush=True)

    measure("idle")
    with busy_core(busy_seconds):
        measure("busy")
    names = ["lstm_fast"] + (["torch"] if have_torch else [])
    head = ["case"]
    for name in names:
        head += [f"{name} {load} {n}t" for load in ("idle", "busy") for n in counts]
        if len(counts) > 1:
            head.append(f"{name} busy {counts[0]}t/1t")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _, _ in cases:
        cells = [label]
        for name in names:
            cells += [f"{results[(label, load, n, name)] * 1e3:.3f}" for load in ("idle", "busy")
                      for n in counts]
            if len(counts) > 1:
                cells.append(f"{results[(label, 'busy', counts[0], name)] / results[(label, 'busy', 1, name)]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if out_md:
        with open(out_md, "w") as f:
            f.write("Machine:\n" + desc + "\n" + wait + "\n\n" + table + "\n")
    return results


# ---------------------------------------------------------------------------- reduced precision
def _torch_bf16_runners(model, x, n_threads):
    """torch's bfloat16 module (module.to(torch.bfloat16), oneDNN) and float32 under autocast."""
    import torch

    torch.set_num_threads(n_threads)
    t = torch.nn.LSTM(model.input_size, model.hidden_size, num_layers=model.num_layers,
                      bidirectional=model.bidirectional).eval()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    tb = torch.nn.LSTM(model.input_size, model.hidden_size, num_layers=model.num_layers,
                       bidirectional=model.bidirectional).eval()
    tb.load_state_dict(t.state_dict())
    tb = tb.to(torch.bfloat16)
    xt = torch.from_numpy(x)

    def module():
        with torch.inference_mode():
            tb(xt.bfloat16())[0].float()

    def autocast():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            t(xt)[0].float()
    return module, autocast


def ort_dynamic_quant_model(model):
    """onnxruntime.quantization.quantize_dynamic of onnx_model(model): its LSTM nodes become
    com.microsoft.DynamicQuantizeLSTM (int8 weights, uint8 activations). The model's bytes."""
    import logging
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its pre-processing advice

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f32.onnx"), os.path.join(d, "int8.onnx")
        with open(src, "wb") as f:
            f.write(onnx_model(model).SerializeToString())
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        with open(dst, "rb") as f:
            return f.read()


def _ort_quant_runner(model, x, n_threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(ort_dynamic_quant_model(model), opts, providers=["CPUExecutionProvider"])

    def run():
        sess.run(None, {"X": x})
    return run


def run_precision(precisions=("bfloat16", "int8"), thread_counts=(1, 2), repeats=5, min_time=0.05,
                  grid=None, quick=False, out_md="bench_precision.md", pause=0.05):
    """The grid in reduced precision, side by side with lstm_fast float32 (frozen), torch's
    bfloat16 module, torch autocast bfloat16 and ONNX Runtime's DynamicQuantizeLSTM (when
    installed). Prints the CPU path each precision ran. Times in ms (median of interleaved rounds)."""
    from . import _precision

    grid = grid or (QUICK_GRID if quick else GRID)
    if quick:
        repeats, min_time = 3, 0.01
    have = {}
    for name in ("torch", "onnxruntime"):
        try:
            __import__(name)
            have[name] = True
        except ImportError:
            have[name] = False
            print(f"({name} is not installed: left out; pip install lstm-fast[compare])")
    desc = machine_description()
    desc += "\n- paths: " + ", ".join(f"{p} {_precision.path_for(p)}" for p in ("float32",) + tuple(precisions))
    desc += f" (LSTM_FAST_ISA={os.environ.get('LSTM_FAST_ISA')!r})"
    print("Machine:\n" + desc)
    cols = ["lf float32"] + [f"lf {p}" for p in precisions]
    if have["torch"]:
        cols += ["torch bf16 module", "torch autocast bf16"]
    if have["onnxruntime"] and "int8" in precisions:
        cols += ["ORT DynamicQuantizeLSTM"]
    rows = []
    for n_threads in thread_counts:
        for shape in grid:
            T, B, I, H, layers, bi = shape
            model = LSTM(I, H, num_layers=layers, bidirectional=bi, seed=0)
            x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
            frozen = {"float32": model.freeze()}
            for p in precisions:
                frozen[p] = model.freeze(precision=p)
            runners = {f"lf {p}": (lambda f=f: f(x)) for p, f in frozen.items()}
            if have["torch"]:
                runners["torch bf16 module"], runners["torch autocast bf16"] = _torch_bf16_runners(model, x, n_threads)
            if "ORT DynamicQuantizeLSTM" in cols:
                runners["ORT DynamicQuantizeLSTM"] = _ort_quant_runner(model, x, n_threads)
            times = {name: [] for name in runners}
            with threads(n_threads):
                _warm_up(runners, [f"lf {p}" for p in frozen], n_threads)
                for _ in range(repeats):
                    for name, fn in runners.items():
                        time.sleep(pause)
                        times[name].append(_timer(fn, min_time))
            row = {"threads": n_threads, "shape": shape}
            row.update({name: float(np.median(ts)) * 1e3 for name, ts in times.items()})
            rows.append(row)
            print(_precision_line(row, cols), flush=True)
    table = _precision_markdown(rows, cols, precisions)
    if out_md:
        with open(out_md, "w") as f:
            f.write("Machine:\n\n" + desc + "\n\n" + table + "\n")
        print(f"\nwrote {out_md}")
    return rows


def _precision_line(row, cols):
    parts = [f"{name} {row[name]:.3f}" for name in cols if name in row]
    return f"threads={row['threads']} {_shape_name(row['shape'])}: " + ", ".join(parts) + " ms"


def _precision_markdown(rows, cols, precisions):
    ratios = []
    if "lf bfloat16" in cols and "torch bf16 module" in cols:
        ratios.append(("bf16 vs torch bf16", "torch bf16 module", "lf bfloat16"))
    if "lf int8" in cols and "lf bfloat16" in cols:
        ratios.append(("int8 vs our bf16", "lf bfloat16", "lf int8"))
    if "lf int8" in cols and "ORT DynamicQuantizeLSTM" in cols:
        ratios.append(("int8 vs ORT", "ORT DynamicQuantizeLSTM", "lf int8"))
    for p in precisions:
        ratios.append((f"{p} vs our f32", "lf float32", f"lf {p}"))
    head = ["threads", "T, B, I, H, layers, bidir"] + [c + " ms" for c in cols] + [r[0] for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["threads"]), _shape_name(r["shape"])] + [f"{r[c]:.3f}" for c in cols]
        cells += [f"{r[a] / r[b]:.2f}x" for _, a, b in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
