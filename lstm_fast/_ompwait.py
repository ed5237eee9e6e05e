"""A short OpenMP spin before idle threads sleep, unless the user chose a wait policy.

libgomp reads GOMP_SPINCOUNT once, when it is loaded, so lstm_fast/__init__.py imports this module
before the first extension module. libgomp's default (spin about 300000 times at every team
barrier) lets a thread whose partner lost its core to another process burn the rest of its time
slice at each of the recurrence's per-step barriers: a small training step ran 3-50x slower on two
threads than on one with a busy core (docs/threads.md). 300 spins keep an idle machine's barriers
fast. Imports nothing of the package, so any module may read SOURCE.
"""
import os

DEFAULT_SPINCOUNT = "300"


def _set_omp_wait():
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = DEFAULT_SPINCOUNT
        return "lstm_fast default"
    return "user"


#: who chose the wait settings libgomp was loaded with: "lstm_fast default" or "user"
SOURCE = _set_omp_wait()
