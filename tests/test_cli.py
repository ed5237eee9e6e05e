"""The command line: `python -m lstm_fast demo|info` run and say what they should."""
import os
import subprocess
import sys


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lstm_fast", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_quick_runs_and_checks_against_reference():
    result = _run("demo", "--quick")
    assert result.returncode == 0, result.stderr
    assert "numpy reference" in result.stdout and "OK" in result.stdout
    assert "GFLOP/s" in result.stdout
    assert "test RMSE" in result.stdout and "beats the naive forecast" in result.stdout


def test_info_names_openmp_and_blas():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert "openmp" in result.stdout and "blas" in result.stdout
    assert "cpu_features" in result.stdout and "build_flags" in result.stdout


def test_bench_quick_runs(tmp_path):
    result = _run("bench", "--quick", "--threads", "1", "--repeats", "1", "--blas",
                  "--out", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png"))
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "b.md").read_text()
    assert "GEMM-limit fraction" in table and "T100 B16 I128 H128 L1 bi" in table
    assert "frozen speedup" in table and "BLAS fallback ms" in table and "of sgemm peak" in table
    # the CPU and the kernel path are named beside the figures, and the sgemm peak measured
    from lstm_fast import _cpu
    assert _cpu.describe()["model_name"] in table
    assert f"lstm_fast kernel path: {_cpu.isa()}" in table
    assert "sgemm peak" in table and "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset" in table


def test_unknown_command_fails():
    assert _run("nope").returncode != 0


def test_bench_contended_quick_runs_and_kills_its_helper(tmp_path):
    """The contended table: idle and busy rows for the training step and the grid shapes (not timed)."""
    import re

    out = tmp_path / "c.md"
    result = _run("bench", "--contended", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = out.read_text()
    assert "train T30 B32 I1 H32 L1" in table and "infer T100 B1 I32 H64 L1" in table
    assert re.search(r"lstm_fast idle \d+t", table) and re.search(r"lstm_fast busy \d+t", table)
    assert "GOMP_SPINCOUNT" in result.stdout
    # the busy helper is gone once the command returns
    # (without LD_PRELOAD: under tools/sanitize.sh, ps with the sanitizer runtimes preloaded hung)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, env=env).stdout
    assert "while time.monotonic() < end" not in ps


def test_bench_train_follows_rows_and_rejects_bad_ones():
    # --rows picks the training shapes too (it was ignored by --train: every shape ran)
    result = _run("bench", "--train", "--threads", "1", "--repeats", "1", "--rows", "0")
    assert result.returncode == 0, result.stderr
    assert "T100 B1 I32 H64 L1" in result.stdout and "T100 B1 I128 H128" not in result.stdout
    bad = _run("bench", "--train", "--rows", "99")
    assert bad.returncode != 0 and "--rows takes indices 0..8" in bad.stderr


def test_bench_warms_lstm_fast_past_the_choosers_exploring_on_several_threads():
    from lstm_fast import _bench

    calls = {"lf int8": 0, "torch": 0}
    runners = {name: (lambda name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls}
    _bench._warm_up(runners, ["lf int8", "lf absent"], 1)
    assert calls == {"lf int8": 0, "torch": 0}           # one thread: no choice to settle
    _bench._warm_up(runners, ["lf int8", "lf absent"], 2)
    # two runs of 8 calls each way (lf_split.h's LF_CHOICE_RUN) before the choice settles
    assert calls == {"lf int8": 16, "torch": 0}
