from typing import Any

import numpy as np
import numpy.typing as npt

def batch_chunk(batch: int) -> int: ...
def packed_chunk(batch: int, n_threads: int) -> int: ...
def recurrence_mode(batch: int, hidden: int, hidden_out: int, itemsize: int) -> str: ...
def forward_layer(
    x: npt.NDArray[np.floating[Any]],
    w_ih: npt.NDArray[np.floating[Any]],
    w_hh: npt.NDArray[np.floating[Any]],
    bias: npt.NDArray[np.floating[Any]],
    w_hr: npt.NDArray[np.floating[Any]],
    peephole: npt.NDArray[np.floating[Any]],
    order: npt.NDArray[np.intp],
    lengths: npt.NDArray[np.intp],
    reverse: npt.NDArray[np.intc],
    h: npt.NDArray[np.floating[Any]],
    c: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.floating[Any]],
    cache_gates: npt.NDArray[np.floating[Any]],
    cache_c: npt.NDArray[np.floating[Any]],
    spec: tuple[Any, ...] | None,
    n_threads: int,
    mode: int = ...,
    prepacked: npt.NDArray[np.float32] | None = ...,
) -> None: ...
def pack_weights(
    w_ih: npt.NDArray[np.float32], w_hh: npt.NDArray[np.float32], w_hr: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32] | None: ...
def forward_plain(
    x: Any,
    w_ih: list[npt.NDArray[np.floating[Any]]],
    w_hh: list[npt.NDArray[np.floating[Any]]],
    b_ih: list[npt.NDArray[np.floating[Any]]] | None,
    b_hh: list[npt.NDArray[np.floating[Any]]] | None,
    w_hr: list[npt.NDArray[np.floating[Any]]] | None,
    n_threads: int,
    mode: int = ...,
    packed: list[npt.NDArray[np.float32] | None] | None = ...,
    h_n: npt.NDArray[np.floating[Any]] | None = ...,
    c_n: npt.NDArray[np.floating[Any]] | None = ...,
) -> tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]]] | None: ...
def cell_gates_py(z: npt.NDArray[np.floating[Any]], c: npt.NDArray[np.floating[Any]]) -> tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]]]: ...
def gate_math_py(values: npt.NDArray[np.floating[Any]], function: str) -> npt.NDArray[np.floating[Any]]: ...
