from typing import Any

import numpy as np
import numpy.typing as npt

GEMV_MAX_ROWS: int

class StepPlan:
    may_split: bool
    @property
    def gemv_rows(self) -> int: ...
    def panel_team_ok(self, n_threads: int) -> bool: ...
    def __init__(
        self,
        w_ih: list[npt.NDArray[np.floating[Any]]],
        w_hh: list[npt.NDArray[np.floating[Any]]],
        b_ih: list[npt.NDArray[np.floating[Any]] | None],
        b_hh: list[npt.NDArray[np.floating[Any]] | None],
        w_hr: list[npt.NDArray[np.floating[Any]] | None],
        packed: list[npt.NDArray[np.float32]] | None = None,
    ) -> None: ...
    def run(
        self,
        x: npt.NDArray[np.floating[Any]],
        h: npt.NDArray[np.floating[Any]],
        c: npt.NDArray[np.floating[Any]],
        n_threads: int = 1,
        use_packed: bool = True,
    ) -> None: ...
