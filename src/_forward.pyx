"""Sequence forward of one LSTM layer, all of its directions in one call.

IN/OUT rules: every array is C-contiguous and of one dtype (float32 or float64); the Python layer
(lstm_fast/_lstm.py) has checked shapes, lengths (0..T) and sizes (< 2**31 per BLAS dimension).
Gate blocks follow torch's order [i | f | g | o] along the 4H axis.

How the work is split (chosen by measurement, see README "Design"):
1. Input projection of every time step, gx[d] = x @ W_ih[d].T, as one GEMM per fixed block of
   PROJ_ROWS rows of the (T*B, I) input; blocks of all directions are spread over the threads.
2. The recurrence: work items are (batch chunk, direction). Each OpenMP thread takes an item and runs
   its rows through all time steps with its own single-threaded BLAS calls, so there is no barrier
   per step, and both directions of a bidirectional layer run at the same time. Rows are visited
   longest first (`order`), so at step s the rows still running are a prefix of the chunk: finished
   sequences cost no work, and the reverse direction starts each row at its own last step.
Chunk sizes depend on the batch size only, never on the thread count, so every thread count
computes the same operations on the same operands: the results are bitwise identical.
"""
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from _blas cimport gemm_rm, gemv_rm
from _gates cimport (CellSpec, cell_row_standard, cell_row_cached, cell_row_general, sigmoid,
                     tanh_, activate)

import numpy as np

# Rows of the (T*B, I) input per projection GEMM: big enough for BLAS to run near peak, small
# enough to spread over threads and to keep the result block in L2.
cdef enum:
    PROJ_ROWS = 256


ctypedef struct Dims:
    Py_ssize_t seq_len, batch, input_size, hidden, proj, hidden_out, four_h, n_dirs
    Py_ssize_t chunk, n_chunks, y_stride
    int keep_cache


cpdef Py_ssize_t batch_chunk(Py_ssize_t batch) noexcept nogil:
    """Rows per work item of the recurrence: a function of the batch size only (thread-invariant).

    Large enough for an efficient GEMM (M >= 8), small enough that batches of 16 and more give at
    least two items to share between threads.
    """
    cdef Py_ssize_t chunk = (batch + 3) // 4
    if chunk < 8:
        chunk = 8
    if chunk > 64:
        chunk = 64
    return batch if chunk > batch else chunk


cdef inline void _recurrent_product(Py_ssize_t rows, const Dims* dm, const floating* h_prev,
                                    const floating* w_hh, floating* gh) noexcept nogil:
    # gh = h_prev @ W_hh.T: one row is a matrix-vector product, where gemv runs ~4x faster than gemm
    if rows == 1:
        gemv_rm(c'N', <int> dm.four_h, <int> dm.hidden_out, <floating> 1, w_hh, <int> dm.hidden_out,
                h_prev, <floating> 0, gh)
    else:
        gemm_rm(c'T', <int> rows, <int> dm.four_h, <int> dm.hidden_out, <floating> 1, h_prev,
                <int> dm.hidden_out, w_hh, <int> dm.hidden_out, <floating> 0, gh, <int> dm.four_h)


cdef inline void _projection(Py_ssize_t rows, const Dims* dm, const floating* h_raw,
                             const floating* w_hr, floating* h_out) noexcept nogil:
    # h = h_raw @ W_hr.T  (LSTMP)
    if rows == 1:
        gemv_rm(c'N', <int> dm.proj, <int> dm.hidden, <floating> 1, w_hr, <int> dm.hidden,
                h_raw, <floating> 0, h_out)
    else:
        gemm_rm(c'T', <int> rows, <int> dm.proj, <int> dm.hidden, <floating> 1, h_raw,
                <int> dm.hidden, w_hr, <int> dm.hidden, <floating> 0, h_out, <int> dm.proj)


cdef void _run_item(Py_ssize_t item, const Dims* dm, const CellSpec* spec, const floating* gx_all,
                    const floating* w_hh, const floating* bias, const floating* w_hr,
                    const floating* peephole, const Py_ssize_t* order, const Py_ssize_t* lengths,
                    const int* reverse, floating* h, floating* c, floating* y,
                    floating* cache_gates, floating* cache_c, floating* scratch) noexcept nogil:
    """Run one (chunk, direction) item through all of its time steps."""
    cdef Py_ssize_t d = item % dm.n_dirs
    cdef Py_ssize_t start = (item // dm.n_dirs) * dm.chunk
    cdef Py_ssize_t rows = dm.chunk if start + dm.chunk <= dm.batch else dm.batch - start
    cdef Py_ssize_t H = dm.hidden, H_out = dm.hidden_out, four_h = dm.four_h
    cdef Py_ssize_t B = dm.batch, T = dm.seq_len
    cdef bint rev = reverse[d] != 0
    cdef bint has_proj = dm.proj > 0
    # thread scratch: gh (chunk, 4H) | h (chunk, H_out) | c (chunk, H) | h_raw (chunk, H)
    cdef floating* gh = scratch
    cdef floating* hs = gh + dm.chunk * four_h
    cdef floating* cs = hs + dm.chunk * H_out
    cdef floating* hraw = cs + dm.chunk * H
    cdef const floating* w_hh_d = w_hh + d * four_h * H_out
    cdef const floating* w_hr_d = w_hr + d * dm.proj * H
    cdef const floating* bias_d = bias + d * four_h
    cdef const floating* peep_d = peephole + d * 3 * H if spec.has_peephole else peephole
    cdef Py_ssize_t r, b, s, t, n_active, max_len
    cdef floating* h_row
    cdef const floating* gx
    cdef Py_ssize_t cache_at

    for r in range(rows):
        b = order[start + r]
        memcpy(hs + r * H_out, h + (d * B + b) * H_out, H_out * sizeof(floating))
        memcpy(cs + r * H, c + (d * B + b) * H, H * sizeof(floating))

    max_len = lengths[order[start]]
    n_active = rows
    for s in range(max_len):
        while n_active > 0 and lengths[order[start + n_active - 1]] <= s:
            n_active -= 1
        _recurrent_product(n_active, dm, hs, w_hh_d, gh)   # gh = h_prev @ W_hh.T
        for r in range(n_active):
            b = order[start + r]
            t = lengths[b] - 1 - s if rev else s
            gx = gx_all + ((d * T + t) * B + b) * four_h
            h_row = hraw + r * H if has_proj else hs + r * H_out
            if spec.standard:
                if dm.keep_cache:
                    cache_at = (d * T + t) * B + b
                    cell_row_cached(H, gh + r * four_h, gx, bias_d, cs + r * H, h_row,
                                    cache_gates + cache_at * four_h, cache_c + cache_at * H)
                else:
                    cell_row_standard(H, gh + r * four_h, gx, bias_d, cs + r * H, h_row)
            else:
                cell_row_general(spec, H, gh + r * four_h, gx, bias_d, peep_d, cs + r * H, h_row)
        if has_proj:
            _projection(n_active, dm, hraw, w_hr_d, hs)   # h = (o * tanh(c)) @ W_hr.T
        for r in range(n_active):
            b = order[start + r]
            t = lengths[b] - 1 - s if rev else s
            memcpy(y + (t * B + b) * dm.y_stride + d * H_out, hs + r * H_out,
                   H_out * sizeof(floating))

    for r in range(rows):
        b = order[start + r]
        memcpy(h + (d * B + b) * H_out, hs + r * H_out, H_out * sizeof(floating))
        memcpy(c + (d * B + b) * H, cs + r * H, H * sizeof(floating))


cdef void _project_block(Py_ssize_t item, Py_ssize_t n_blocks, Py_ssize_t total_rows,
                         const Dims* dm, const floating* x, const floating* w_ih,
                         floating* gx_all) noexcept nogil:
    # gx[d, rows] = x[rows] @ W_ih[d].T  for one block of PROJ_ROWS rows of the (T*B, I) input
    cdef Py_ssize_t d = item // n_blocks
    cdef Py_ssize_t row0 = (item % n_blocks) * PROJ_ROWS
    cdef Py_ssize_t rows = PROJ_ROWS if row0 + PROJ_ROWS <= total_rows else total_rows - row0
    gemm_rm(c'T', <int> rows, <int> dm.four_h, <int> dm.input_size, <floating> 1,
            x + row0 * dm.input_size, <int> dm.input_size,
            w_ih + d * dm.four_h * dm.input_size, <int> dm.input_size, <floating> 0,
            gx_all + (d * total_rows + row0) * dm.four_h, <int> dm.four_h)


cdef CellSpec _make_spec(object spec) except *:
    """spec is None (standard cell) or (acts[3], alphas[3], betas[3], clip, input_forget)."""
    cdef CellSpec out
    cdef int k
    out.standard = 1
    out.clip = 0
    out.input_forget = 0
    out.has_peephole = 0
    for k in range(3):
        out.act[k] = 0 if k == 0 else 1
        out.alpha[k] = 0
        out.beta[k] = 0
    if spec is not None:
        acts, alphas, betas, clip, input_forget = spec
        out.standard = 0
        for k in range(3):
            out.act[k] = acts[k]
            out.alpha[k] = alphas[k]
            out.beta[k] = betas[k]
        out.clip = clip
        out.input_forget = input_forget
    return out


def forward_layer(const floating[:, :, ::1] x,          # IN  (T, B, I) layer input
                  const floating[:, :, ::1] w_ih,       # IN  (D, 4H, I)
                  const floating[:, :, ::1] w_hh,       # IN  (D, 4H, H_out)
                  const floating[:, ::1] bias,          # IN  (D, 4H) b_ih + b_hh
                  const floating[:, :, ::1] w_hr,       # IN  (D, P, H); (D, 0, H) without projection
                  const floating[:, ::1] peephole,      # IN  (D, 3H) [p_i|p_f|p_o], or (D, 0): none
                  const Py_ssize_t[::1] order,          # IN  (B,) rows by length, longest first
                  const Py_ssize_t[::1] lengths,        # IN  (B,) valid steps per row, 0..T
                  const int[::1] reverse,               # IN  (D,) 1: direction d runs backwards
                  floating[:, :, ::1] h,                # IN/OUT (D, B, H_out) initial -> final
                  floating[:, :, ::1] c,                # IN/OUT (D, B, H)
                  floating[:, :, ::1] y,                # OUT (T, B, D*H_out); padding untouched
                  floating[:, :, :, ::1] cache_gates,   # OUT (D, T, B, 4H) activated gates, or size 0
                  floating[:, :, :, ::1] cache_c,       # OUT (D, T, B, H) cell states, or size 0
                  object spec,                          # None (standard) or ONNX cell options
                  int n_threads):
    """Run one layer (all directions) over a batch of sequences; see the module docstring."""
    cdef Dims dm
    cdef CellSpec cell = _make_spec(spec)
    dm.seq_len = x.shape[0]
    dm.batch = x.shape[1]
    dm.input_size = x.shape[2]
    dm.n_dirs = w_ih.shape[0]
    dm.four_h = w_ih.shape[1]
    dm.hidden = dm.four_h // 4
    dm.proj = w_hr.shape[1]
    dm.hidden_out = dm.proj if dm.proj > 0 else dm.hidden
    dm.y_stride = y.shape[2]
    dm.chunk = batch_chunk(dm.batch)
    dm.n_chunks = (dm.batch + dm.chunk - 1) // dm.chunk
    dm.keep_cache = cache_gates.shape[1] > 0 and cache_c.shape[1] > 0
    cell.has_peephole = peephole.shape[1] > 0
    if dm.seq_len == 0 or dm.batch == 0:
        return

    cdef Py_ssize_t total_rows = dm.seq_len * dm.batch
    cdef Py_ssize_t n_blocks = (total_rows + PROJ_ROWS - 1) // PROJ_ROWS
    cdef Py_ssize_t n_proj_items = n_blocks * dm.n_dirs
    cdef Py_ssize_t n_items = dm.n_chunks * dm.n_dirs
    cdef Py_ssize_t scratch_len = dm.chunk * (dm.four_h + dm.hidden_out + 2 * dm.hidden)
    cdef floating* gx_all = <floating*> malloc(dm.n_dirs * total_rows * dm.four_h * sizeof(floating))
    if gx_all == NULL:
        raise MemoryError(f"cannot allocate the input projection buffer "
                          f"({dm.n_dirs} x {total_rows} x {dm.four_h} values)")
    cdef floating* scratch = NULL
    cdef const floating* x_ptr = &x[0, 0, 0]
    cdef const floating* w_ih_ptr = &w_ih[0, 0, 0]
    cdef const floating* w_hh_ptr = &w_hh[0, 0, 0]
    cdef const floating* bias_ptr = &bias[0, 0]
    cdef const floating* w_hr_ptr = &w_hr[0, 0, 0] if dm.proj > 0 else NULL
    cdef const floating* peep_ptr = &peephole[0, 0] if cell.has_peephole else NULL
    cdef floating* cg_ptr = &cache_gates[0, 0, 0, 0] if dm.keep_cache else NULL
    cdef floating* cc_ptr = &cache_c[0, 0, 0, 0] if dm.keep_cache else NULL
    cdef floating* h_ptr = &h[0, 0, 0]
    cdef floating* c_ptr = &c[0, 0, 0]
    cdef floating* y_ptr = &y[0, 0, 0]
    cdef const Py_ssize_t* order_ptr = &order[0]
    cdef const Py_ssize_t* len_ptr = &lengths[0]
    cdef const int* rev_ptr = &reverse[0]
    cdef Py_ssize_t item
    cdef int failed = 0
    cdef int* failed_ptr = &failed   # written through a pointer: prange would privatise `failed`
    cdef int threads_proj = <int> min(n_threads, n_proj_items)
    cdef int threads_rec = <int> min(n_threads, n_items)

    with nogil:
        if threads_proj <= 1:
            for item in range(n_proj_items):
                _project_block(item, n_blocks, total_rows, &dm, x_ptr, w_ih_ptr, gx_all)
        else:
            for item in prange(n_proj_items, num_threads=threads_proj, schedule='static'):
                _project_block(item, n_blocks, total_rows, &dm, x_ptr, w_ih_ptr, gx_all)

        if threads_rec <= 1:
            scratch = <floating*> malloc(scratch_len * sizeof(floating))
            if scratch == NULL:
                failed = 1
            else:
                for item in range(n_items):
                    _run_item(item, &dm, &cell, gx_all, w_hh_ptr, bias_ptr, w_hr_ptr, peep_ptr,
                              order_ptr, len_ptr, rev_ptr, h_ptr, c_ptr, y_ptr, cg_ptr, cc_ptr,
                              scratch)
                free(scratch)
        else:
            with parallel(num_threads=threads_rec):
                scratch = <floating*> malloc(scratch_len * sizeof(floating))   # one per thread
                for item in prange(n_items, schedule='dynamic'):
                    if scratch == NULL:
                        failed_ptr[0] = 1
                    else:
                        _run_item(item, &dm, &cell, gx_all, w_hh_ptr, bias_ptr, w_hr_ptr,
                                  peep_ptr, order_ptr, len_ptr, rev_ptr, h_ptr, c_ptr, y_ptr,
                                  cg_ptr, cc_ptr, scratch)
                free(scratch)
        free(gx_all)
    if failed:
        raise MemoryError("cannot allocate the per-thread scratch of the LSTM recurrence")


def gate_math_py(floating[::1] values, str function):
    """Test twin of the kernels' nonlinearities: applies "sigmoid", "tanh" or an ONNX activation
    code given as "act:<code>:<alpha>:<beta>" to every value, in the array's own precision."""
    out = np.empty(values.shape[0], dtype=np.float32 if floating is float else np.float64)
    cdef floating[::1] res = out
    cdef Py_ssize_t j
    cdef int code = -1
    cdef double alpha = 0, beta = 0
    if function.startswith("act:"):
        _, c, a, b = function.split(":")
        code, alpha, beta = int(c), float(a), float(b)
    elif function not in ("sigmoid", "tanh"):
        raise ValueError(f"unknown function {function!r}")
    for j in range(values.shape[0]):
        if code >= 0:
            res[j] = activate(code, values[j], alpha, beta)
        elif function == "sigmoid":
            res[j] = sigmoid(values[j])
        else:
            res[j] = tanh_(values[j])
    return out
