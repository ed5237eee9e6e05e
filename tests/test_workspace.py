"""Work buffers kept per thread between calls (LSTM_FAST_WORKSPACE_MB): the cap is read from the
environment, and a reused buffer never changes a result (a kernel that read what an earlier call
left there, or relied on fresh zeroed pages, would differ from a process that keeps nothing)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, keep):
    env = dict(os.environ)
    env.pop("LSTM_FAST_WORKSPACE_MB", None)
    if keep is not None:
        env["LSTM_FAST_WORKSPACE_MB"] = keep
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("keep, expected", [(None, 256 << 20), ("0", 0), ("64", 64 << 20),
                                            ("lots", 256 << 20), ("-3", 256 << 20), ("", 256 << 20)])
def test_the_cap_comes_from_the_environment(keep, expected):
    got = _run("from lstm_fast import _forward\nimport lstm_fast as lf\n"
               "print(_forward.workspace_max_bytes(), 'LSTM_FAST_WORKSPACE_MB' in "
               "lf._config.config()['workspace_kept'])", keep)
    assert got == [str(expected), "True"]


# Each process computes the last of `calls` on a fresh model; the float32 forward (wide mode's
# up-front projection buffer, the packed weights), training and the int8 layer's buffers
CODE = """
import hashlib, sys, numpy as np, lstm_fast as lf
calls = int(sys.argv[1])
rng = np.random.default_rng(1)
xs = [rng.standard_normal((12, 40, 96)).astype(np.float32) for _ in range(2)]
digest = hashlib.sha256()
m = lf.LSTM(96, 160, seed=3)
q = m.freeze(precision="int8")
for x in xs[2 - calls:]:
    out, (h, c) = m(x)
    out8, _ = q(x)
    y, _, cache = m.forward_train(x)
    grads = m.backward(cache, np.ones_like(y))
for a in (out, h, c, out8, y, grads.input) + tuple(grads.params.values()):
    digest.update(np.ascontiguousarray(a).tobytes())
print(digest.hexdigest())
"""


def test_reused_buffers_give_the_bits_of_fresh_ones():
    kept = _run(CODE.replace("sys.argv[1]", "2"), None)     # the second call reuses the buffers
    fresh = _run(CODE.replace("sys.argv[1]", "1"), "0")     # nothing kept: every buffer new
    assert kept == fresh


def test_parameters_start_on_a_cache_line(tmp_path):
    # the step's gemv and the packs load weight rows 64 bytes at a time; a parameter array 16
    # bytes off a line split every load in two (step of LSTM(128, 128): 9.3 against 5.7 us)
    import pickle

    import numpy as np

    import lstm_fast as lf
    models = [lf.LSTM(20, 24, num_layers=2, bidirectional=True, seed=0),
              lf.LSTM(8, 16, proj_size=5, dtype=np.float64, seed=1), lf.LSTMCell(12, 32, seed=2)]
    models.append(models[0].freeze())
    models.append(pickle.loads(pickle.dumps(models[1])))
    models[0].save(tmp_path / "m.npz")
    models.append(lf.load(tmp_path / "m.npz"))
    for m in models:   # each array's start (a reverse direction's lies one direction further)
        for name, p in m._params.items():
            if not name.endswith("_reverse"):
                assert p.ctypes.data % 64 == 0, (type(m).__name__, name)
    # the arrays stay numpy's own: writable where the model's are, the dtype and shape asked for
    w = lf._aligned.zeros((3, 5), np.float64)
    assert w.shape == (3, 5) and w.dtype == np.float64 and w.flags.writeable and not w.any()
    assert lf._aligned.zeros(0, np.float32).shape == (0,)
