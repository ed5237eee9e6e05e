"""The default thread count: affinity mask, cgroup CPU quota (fake cgroup trees), OMP_NUM_THREADS
and set_num_threads winning, and what show_config says about it."""
import io
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout

import numpy as np
import pytest

import lstm_fast as lf
from lstm_fast import _threads
from lstm_fast._threads import cgroup_cpu_limit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _tree(tmp_path, proc, files):
    """A fake /sys/fs/cgroup under tmp_path/cg and a fake /proc/self/cgroup."""
    root = tmp_path / "cg"
    root.mkdir(parents=True)
    for rel, text in files.items():
        _write(str(root / rel), text)
    proc_file = tmp_path / "proc_cgroup"  # beside the tree
    proc_file.write_text(proc)
    return str(root), str(proc_file)


def test_v2_quota_of_one_cpu(tmp_path):
    root, proc = _tree(tmp_path, "0::/user.slice/job\n", {"user.slice/job/cpu.max": "100000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == (1.0, "cgroup cpu.max quota 100000/100000")


def test_v2_fractional_and_ancestor_limits(tmp_path):
    # the job allows 1.5 CPUs, its parent 0.5: the tightest wins
    root, proc = _tree(tmp_path, "0::/a/b\n", {"a/b/cpu.max": "150000 100000", "a/cpu.max": "25000 50000"})
    assert cgroup_cpu_limit(root, proc) == (0.5, "cgroup cpu.max quota 25000/50000")
    root2, proc2 = _tree(tmp_path / "x", "0::/a/b\n", {"a/b/cpu.max": "150000 100000", "a/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root2, proc2) == (1.5, "cgroup cpu.max quota 150000/100000")


def test_v2_no_quota(tmp_path):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) is None
    root2, proc2 = _tree(tmp_path / "x", "0::/\n", {})
    assert cgroup_cpu_limit(root2, proc2) is None


def test_v2_container_without_namespace_falls_back_to_mount(tmp_path):
    # /proc/self/cgroup shows the host's path, the container sees its own cgroup at the mount
    root, proc = _tree(tmp_path, "0::/docker/abc123\n", {"cpu.max": "200000 100000"})
    assert cgroup_cpu_limit(root, proc) == (2.0, "cgroup cpu.max quota 200000/100000")


def test_v2_hybrid_unified(tmp_path):
    root, proc = _tree(tmp_path, "1:cpu:/\n0::/svc\n", {"unified/svc/cpu.max": "100000 100000",
                                                         "cpu/cpu.cfs_quota_us": "-1",
                                                         "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) == (1.0, "cgroup cpu.max quota 100000/100000")


def test_v1_quota(tmp_path):
    root, proc = _tree(tmp_path, "4:cpu,cpuacct:/kubepods/pod1\n3:memory:/kubepods/pod1\n",
                       {"cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us": "50000\n",
                        "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) == (0.5, "cgroup cpu.cfs_quota_us 50000/100000")


def test_v1_unlimited_and_separate_cpu_mount(tmp_path):
    root, proc = _tree(tmp_path, "2:cpuacct:/\n1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1",
                                                            "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) is None
    root2, proc2 = _tree(tmp_path / "x", "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "300000",
                                                       "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root2, proc2) == (3.0, "cgroup cpu.cfs_quota_us 300000/100000")


@pytest.mark.parametrize("text", ["", "garbage", "abc 100000", "100000 0", "\x00\xff"])
def test_bad_files_mean_no_quota(tmp_path, text):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": text})
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(root, str(tmp_path / "missing")) is None


@pytest.fixture
def fake_quota(monkeypatch):
    """Make the process look as if its cgroup had the given quota (cpus, description)."""
    def set_quota(limit):
        monkeypatch.setattr(_threads, "_cgroup_cache", [limit])
        monkeypatch.setattr(_threads, "_global_threads", None)
        monkeypatch.setattr(_threads, "_OMP_ENV", 0)
    return set_quota


def _show_config_threads_line():
    buf = io.StringIO()
    with redirect_stdout(buf):
        lf.show_config()
    return [line.split(":", 1)[1].strip() for line in buf.getvalue().splitlines()
            if line.split(":", 1)[0].strip() == "threads"][0]


@pytest.mark.skipif(not lf._threading.openmp_enabled() or _threads._affinity_cores() < 2
                    or lf._threading.omp_max_threads() < 2,
                    reason="needs an OpenMP build and two cores")
def test_quota_of_one_cpu_gives_one_thread(fake_quota, tmp_path):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    fake_quota(cgroup_cpu_limit(root, proc))
    assert lf.get_num_threads() == 1
    assert _show_config_threads_line() == "1 (cgroup cpu.max quota 100000/100000)"
    # a quota of 1.2 CPUs rounds up to 2 threads (on two cores)
    fake_quota((1.2, "cgroup cpu.max quota 120000/100000"))
    assert lf.get_num_threads() == min(2, _threads._affinity_cores())
    # set_num_threads and threads() still win over the quota
    fake_quota((1.0, "cgroup cpu.max quota 100000/100000"))
    try:
        lf.set_num_threads(2)
        assert lf.get_num_threads() == 2
        assert _show_config_threads_line() == "2 (set_num_threads)"
    finally:
        _threads._global_threads = None
    with lf.threads(2):
        assert lf.get_num_threads() == 2
        assert _show_config_threads_line() == "2 (lstm_fast.threads)"
    # None means what the process may use: the quota
    with lf.threads(None):
        assert lf.get_num_threads() == 1


@pytest.mark.skipif(_threads._affinity_cores() < 2, reason="needs two cores")
def test_quota_results_equal_bits(fake_quota):
    # the count changes, the bits do not
    model = lf.LSTM(4, 32, seed=0)
    x = np.random.default_rng(0).standard_normal((20, 3, 4)).astype(np.float32)
    fake_quota(None)
    ref, _ = model(x)
    fake_quota((1.0, "cgroup cpu.max quota 100000/100000"))
    out, _ = model(x)
    np.testing.assert_array_equal(out, ref)


def _child(code, env=None):
    full_env = dict(os.environ)
    full_env.pop("OMP_NUM_THREADS", None)
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or _threads._affinity_cores() < 2,
                    reason="needs sched_setaffinity and two cores")
def test_affinity_in_a_child():
    # the mask is narrowed after lstm_fast (and OpenMP) started: the next call follows it
    out = _child("""
        import os, io, contextlib, time
        import lstm_fast as lf
        from lstm_fast import _threads
        before = lf.get_num_threads()
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        time.sleep(_threads.AFFINITY_REFRESH + 0.05)   # the mask is read again once a second
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            lf.show_config()
        line = [l for l in buf.getvalue().splitlines() if l.split(":")[0].strip() == "threads"][0]
        print(before, lf.get_num_threads(), line.split(":", 1)[1].strip())
    """)
    before, after, line = out.split(" ", 2)
    assert int(before) >= 2 and int(after) == 1
    assert line == "1 (affinity)"


@pytest.mark.skipif(not lf._threading.openmp_enabled(), reason="needs an OpenMP build")
def test_omp_num_threads_wins_over_affinity():
    out = _child("""
        import os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        import lstm_fast as lf
        from lstm_fast import _threads
        _threads._cgroup_cache[:] = [(1.0, "cgroup cpu.max quota 100000/100000")]
        print(lf.get_num_threads(), _threads.thread_source())
    """, env={"OMP_NUM_THREADS": "3"})
    assert out == "3 3 (OMP_NUM_THREADS)"


@pytest.mark.parametrize("env, spin, source", [
    ({}, "300", "GOMP_SPINCOUNT=300 (lstm_fast default)"),
    ({"GOMP_SPINCOUNT": "5000"}, "5000", "GOMP_SPINCOUNT=5000 (user)"),
    ({"OMP_WAIT_POLICY": "active"}, None, "OMP_WAIT_POLICY=active (user)"),
])
def test_omp_wait_default_only_when_the_user_set_none(env, spin, source):
    """A short libgomp spin by default (busy cores: docs/threads.md); the user's setting wins."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import os, lstm_fast, lstm_fast._config as c; "
            "print(os.environ.get('GOMP_SPINCOUNT')); print(c.config()['omp_wait'])")
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == [str(spin), source]


def test_small_calls_switching_threads_keep_the_bits():
    # A small call runs on all its threads or on one, as measured for its shape (lf_split_choose:
    # the first runs of 8 calls take each way in turn). Every call, whichever way it took, must
    # give the one-thread bits, and the values torch gives.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    m = lf.LSTM(3, 24)
    x = rng.standard_normal((7, 20, 3)).astype(np.float32)
    g = rng.standard_normal((7, 20, 24)).astype(np.float32)

    def run():
        y, _, cache = m.forward_train(x)
        grads = m.backward(cache, g)
        return [y, grads.input, *grads.hx, *(grads.params[k] for k in sorted(grads.params))]

    old = lf.get_num_threads()
    try:
        lf.set_num_threads(1)
        ref = run()
        lf.set_num_threads(2)
        for _ in range(40):
            for a, b in zip(run(), ref):
                np.testing.assert_array_equal(a, b)
    finally:
        lf.set_num_threads(old)
    t = torch.nn.LSTM(3, 24)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict().items()})
    np.testing.assert_allclose(ref[0], t(torch.from_numpy(x))[0].detach().numpy(), rtol=1e-5,
                               atol=2e-6)
