"""Progress output fits where it goes (issue 17): the demo's bar only on terminals; into a pipe
or a log, one line per epoch and no carriage returns."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import lstm_fast as lf


def _demo_env():
    here = os.path.dirname(os.path.dirname(os.path.abspath(lf.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


def test_demo_into_a_pipe_prints_one_line_per_epoch(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lstm_fast", "demo", "--quick"], cwd=tmp_path,
                          env=_demo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert out.count("\r") == 0 and err.count("\r") == 0
    epochs = re.findall(r"^   epoch (\d+)/(\d+): train loss \S+, validation loss \S+$", out, re.M)
    trained = int(re.search(r"trained (\d+) epochs", out).group(1))
    assert [int(e) for e, _ in epochs] == list(range(1, trained + 1))
    assert len(out) < 5000             # a few lines, not a bar's thousands of updates


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_demo_on_a_terminal_draws_a_bar(tmp_path):
    master, slave = os.openpty()
    # a new pseudo-terminal has 0 columns, where tqdm draws an empty bar: give it a terminal's size
    import fcntl
    import struct
    import termios
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "lstm_fast", "demo", "--quick"], cwd=tmp_path,
                            env=_demo_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:                # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "test RMSE" in text
    assert text.count("\r") > text.count("\n")        # a bar redrawn in place (a tty maps \n to \r\n)
    assert not re.search(r"^   epoch \d+/\d+:", text.replace("\r", "\n"), re.M)


def _fit(progress):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5, 2)).astype(np.float32)
    y = rng.standard_normal((40, 1)).astype(np.float32)
    model, head = lf.LSTM(2, 4, batch_first=True, seed=0), lf.Linear(4, 1, seed=0)
    return lf.fit(model, head, x, y, epochs=3, batch_size=8, progress=progress, seed=0)


def test_fit_progress_outside_a_terminal(capsys):
    history = _fit(True)                 # pytest's captured streams are not terminals
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert re.findall(r"^   epoch (\d)/3: train loss \S+$", out, re.M) == ["1", "2", "3"]
    assert len(history.train_loss) == 3
    for quiet in (None, False):
        _fit(quiet)
        out, err = capsys.readouterr()
        assert out == "" and err == ""
