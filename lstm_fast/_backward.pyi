from typing import Any

import numpy as np
import numpy.typing as npt

_A = npt.NDArray[np.floating[Any]]

def backward_layer(
    x: _A, w_ih: _A, w_hh: _A, w_hr: _A, gates: _A, cs: _A, y: _A, h0: _A, c0: _A,
    grad_y: _A, grad_hn: _A, grad_cn: _A,
    order: npt.NDArray[np.intp], lengths: npt.NDArray[np.intp], reverse: npt.NDArray[np.intc],
    grad_x: _A, grad_h0: _A, grad_c0: _A, grad_w_ih: _A, grad_w_hh: _A, grad_bias: _A,
    grad_w_hr: _A, n_threads: int,
) -> None: ...
