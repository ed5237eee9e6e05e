"""Backpropagation through time of one LSTM layer, all of its directions in one call.

IN/OUT rules: every array is C-contiguous and of one dtype; shapes were checked by the Python layer
(lstm_fast/_train.py). Gate blocks are torch's [i | f | g | o]. The forward pass ran with the same
`order`, `lengths` and `reverse` and kept the activated gates and c_t of every (d, t, b).

Work split:
1. The recurrence walks the steps backwards per (batch chunk, direction) item, like the forward's
   chunked mode (no barrier per step): per row it turns dh, dc into the pre-activation gradient dG
   of the four gates, and carries dh_prev = dG @ W_hh (one GEMM per chunk and step).
2. Then every gradient that sums over time and batch is one big GEMM per direction over all T*B
   rows: dW_ih = dG.T @ x, dW_hh = dG.T @ h_prev, dW_hr = dH.T @ h_raw, dx = sum_d dG @ W_ih;
   db sums dG's rows. These are split over the threads by output blocks, each summed over all
   rows in one fixed order, so the gradients are bitwise the same for any thread count.
Rows past a sequence's length keep dG = 0, so padding contributes nothing.
"""
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from _blas cimport gemm_rm, gemm_rm_tn, gemv_rm
from _pgemm cimport (lf_set_kernel, lf_ws_get, lf_ws_release, lf_ws_aligned, lf_pack_len, lf_pack_wt, lf_pack_wt_for, lf_pgemm,
                     lf_pgemm_at, lf_pgemm_at2, lf_pgemv, lf_pgemv_gates_tiles)
from _gates cimport lf_tanhf   # brings the vectorisable float32 tanh into this module's C
from _split cimport (lf_barrier, lf_barrier_init, lf_team_size, lf_team_unit_begin,
                     lf_team_unit_end, lf_barrier_wait, lf_ticks, lf_split_choose,
                     lf_split_record, lf_split_key, lf_split_ended, lf_split_budget,
                     lf_load_long, lf_store_long, lf_team_rank, LF_SPLIT_ABORT_LAG,
                     lf_team_arrive, lf_team_arrived, lf_team_open, lf_team_wait_open)

from lstm_fast._forward import batch_chunk, recurrence_mode, packed_gemm_active, split_mode_ok

cdef extern from *:
    """
    #include <math.h>
    /* dz for one row: from the upstream gradients of h_raw (dh) and c (dc, updated in place to the
       gradient of c_{t-1}), the activated gates [i|f|g|o] and c_t, c_{t-1}. */
    /* units u0..u1 only (split mode), the same loop body whichever range holds a unit */
    #define LF_CELL_BACK(T, SUFFIX, TANH)                                                      \
    static inline void lf_cell_back_range_##SUFFIX(Py_ssize_t hidden, Py_ssize_t u0,          \
            Py_ssize_t u1, const T* restrict dh, T* restrict dc, const T* restrict gates,     \
            const T* restrict c_t, const T* restrict c_prev, T* restrict dz,                  \
            T* restrict h_raw) {                                                              \
        const T *gi = gates, *gf = gates + hidden, *gg = gates + 2 * hidden;                  \
        const T *go = gates + 3 * hidden;                                                     \
        T *dzf = dz + hidden, *dzg = dz + 2 * hidden, *dzo = dz + 3 * hidden;                 \
        for (Py_ssize_t j = u0; j < u1; j++) {                                                \
            T tc = TANH(c_t[j]);                                                              \
            T dct = dc[j] + dh[j] * go[j] * (1 - tc * tc);                                    \
            dz[j] = dct * gg[j] * gi[j] * (1 - gi[j]);                                        \
            dzf[j] = dct * c_prev[j] * gf[j] * (1 - gf[j]);                                   \
            dzg[j] = dct * gi[j] * (1 - gg[j] * gg[j]);                                       \
            dzo[j] = dh[j] * tc * go[j] * (1 - go[j]);                                        \
            dc[j] = dct * gf[j];                                                              \
            h_raw[j] = go[j] * tc;                                                            \
        }                                                                                     \
    }                                                                                         \
    static inline void lf_cell_back_##SUFFIX(Py_ssize_t hidden, const T* restrict dh,         \
            T* restrict dc, const T* restrict gates, const T* restrict c_t,                   \
            const T* restrict c_prev, T* restrict dz, T* restrict h_raw) {                    \
        lf_cell_back_range_##SUFFIX(hidden, 0, hidden, dh, dc, gates, c_t, c_prev, dz, h_raw); \
    }
    LF_CELL_BACK(float, f32, lf_tanhf)
    LF_CELL_BACK(double, f64, tanh)
    """
    void lf_cell_back_f32(Py_ssize_t, const float*, float*, const float*, const float*,
                          const float*, float*, float*) noexcept nogil
    void lf_cell_back_range_f32(Py_ssize_t, Py_ssize_t, Py_ssize_t, const float*, float*,
                                const float*, const float*, const float*, float*, float*) noexcept nogil
    void lf_cell_back_f64(Py_ssize_t, const double*, double*, const double*, const double*,
                          const double*, double*, double*) noexcept nogil

cdef enum:
    # work-buffer slots (lf_ws_get): kept per thread from call to call
    WS_DZ = 0
    WS_H_PREV = 1
    WS_H_RAW = 2
    WS_DH_PROJ = 3
    WS_PACKED = 4
    WS_PACKED_GRAD = 5

cdef enum:
    GRAD_ROWS = 256       # rows of dx per GEMM item
    GRAD_X_COLS = 32      # columns of dx per item when there are few row blocks (one panel)
    GRAD_BLOCKS = 4       # weight gradients through BLAS: output rows (of 4H or P) in 4 blocks
                          # per direction (a function of the shape only: BLAS's bits may follow it)
    GRAD_MAX_ROWS = 1024  # ... through the packed kernel: at most this many rows per block
    GRAD_IN_PLACE_MAX = 128   # weight gradients read x / h_prev in place up to this many columns
    WIDE_COL_BLOCKS = 8   # wide mode (as the forward's): column blocks of a step's products
    WIDE_ROWS = 8         # wide mode: rows per item of a step's row phases
    FOLD_ROWS = 8         # batch 1: input-gradient rows per tile, one block of steps (_dh_prev_folded)
    SMALL_CALL_FLOPS = 64000000   # the forward's (src/_forward.pyx): all threads or one, measured


ctypedef struct Back:
    Py_ssize_t seq_len, batch, input_size, hidden, proj, hidden_out, four_h, n_dirs, y_stride
    Py_ssize_t chunk, n_chunks
    const void* w_hh
    const void* w_hr
    # float32: W_hh.T, W_hr.T and W_ih.T packed for lf_pgemm (per direction), or NULL (BLAS)
    const float* pk_hh
    const float* pk_hr
    const float* pk_ih
    size_t pk_hh_len, pk_hr_len, pk_ih_len
    # float32 weight gradients through lf_pgemm_at2 (grad_packed): x and h_prev as W.T operands,
    # each packed along T*B (ld 0) or read in place (ld = its row length); per direction, h_prev's
    # operand starts b_hp_dir floats further
    int grad_packed
    const float* b_x
    const float* b_hp
    size_t ld_x, ld_hp, b_hp_dir
    const float* pk_hraw     # float32: h_raw packed along T*B for dW_hr (lf_pgemm_at), or NULL
    size_t pk_hraw_len
    Py_ssize_t grad_rows_gate, grad_rows_proj   # rows of 4H and of P per weight-gradient item
    # batch 1, float32: the input gradient's rows computed inside the recurrence (_dh_prev_folded)
    # into this (T, I) array, or NULL
    float* fold_dx
    const void* gates        # (D, T, B, 4H) activated gates from the forward
    const void* cs           # (D, T, B, H) c_t from the forward
    const void* y            # (T, B, D*H_out) the layer's output (h_t)
    const void* h0           # (D, B, H_out)
    const void* c0           # (D, B, H)
    const void* grad_y       # (T, B, D*H_out)
    const void* grad_hn      # (D, B, H_out)
    const void* grad_cn      # (D, B, H)
    const Py_ssize_t* order
    const Py_ssize_t* lengths
    const int* reverse
    void* dz                 # OUT (D, T, B, 4H) pre-activation gradients, zero at padding
    void* h_prev             # OUT (D, T, B, H_out) h_{t-1} of each step (for dW_hh)
    void* h_raw              # OUT (D, T, B, H) o*tanh(c) (for dW_hr), projection only
    void* dh_proj            # OUT (D, T, B, P) gradient of the projected h (for dW_hr)
    void* grad_h0            # OUT (D, B, H_out)
    void* grad_c0            # OUT (D, B, H)


cdef int _fold_enabled = 1


cdef long _split_budget_forced = 0
cdef long _split_alone_forced = 0


def set_split_alone(long steps):
    """Make every backward split-mode call run its first `steps` steps on the calling thread
    alone, as when the other threads are slow to wake (0: until they have all arrived; for
    tests; not thread-safe)."""
    global _split_alone_forced
    _split_alone_forced = steps


def set_split_budget(long ticks):
    """Give every backward split-mode call a budget of `ticks` a step (0: the measured one; for
    tests: 1 stops split mode after its first step; not thread-safe)."""
    global _split_budget_forced
    _split_budget_forced = ticks


def set_backward_input_fold(bint enabled):
    """Turn the batch-1 input gradient inside the recurrence (_dh_prev_folded) on or off; off
    computes it after the recurrence (tests compare the bits, benchmarks the times)."""
    global _fold_enabled
    _fold_enabled = 1 if enabled else 0


cdef inline Py_ssize_t _prev_time(const Back* K, Py_ssize_t d, Py_ssize_t t) noexcept nogil:
    # the time of the row's previous step: t-1 forward, t+1 backward
    return t + 1 if K.reverse[d] else t - 1


cdef void _back_row_pre(const Back* K, Py_ssize_t d, Py_ssize_t s, Py_ssize_t b,
                        floating* dh_row) noexcept nogil:
    """dh += dL/dy at this step; keep h_{t-1} (for dW_hh) and the projected dh (for dW_hr)."""
    cdef Py_ssize_t H_out = K.hidden_out, B = K.batch, T = K.seq_len, j
    cdef Py_ssize_t t = K.lengths[b] - 1 - s if K.reverse[d] else s
    cdef Py_ssize_t at = (d * T + t) * B + b
    cdef const floating* grad_y = (<const floating*> K.grad_y) + (t * B + b) * K.y_stride + d * H_out
    cdef const floating* h_prev_row
    for j in range(H_out):
        dh_row[j] = dh_row[j] + grad_y[j]
    if s == 0:
        h_prev_row = (<const floating*> K.h0) + (d * B + b) * H_out
    else:
        h_prev_row = (<const floating*> K.y) + (_prev_time(K, d, t) * B + b) * K.y_stride + d * H_out
    memcpy((<floating*> K.h_prev) + at * H_out, h_prev_row, H_out * sizeof(floating))
    if K.proj > 0:
        memcpy((<floating*> K.dh_proj) + at * K.proj, dh_row, K.proj * sizeof(floating))


cdef void _back_row_cell(const Back* K, Py_ssize_t d, Py_ssize_t s, Py_ssize_t b,
                         const floating* dh_raw_row, floating* dc_row, floating* dz_row,
                         floating* throwaway) noexcept nogil:
    """The cell's backward for one row: dz (also into the (D, T, B, 4H) buffer), dc -> dc_{t-1}."""
    cdef Py_ssize_t H = K.hidden, four_h = K.four_h, B = K.batch, T = K.seq_len
    cdef Py_ssize_t t = K.lengths[b] - 1 - s if K.reverse[d] else s
    cdef Py_ssize_t at = (d * T + t) * B + b
    cdef const floating* cs = <const floating*> K.cs
    cdef const floating* c_prev
    cdef floating* dz_at = (<floating*> K.dz) + at * four_h
    # h_raw = o*tanh(c) is kept for dW_hr only with a projection
    cdef floating* raw = (<floating*> K.h_raw) + at * H if K.proj > 0 else throwaway
    if s == 0:
        c_prev = (<const floating*> K.c0) + (d * B + b) * H
    else:
        c_prev = cs + ((d * T + _prev_time(K, d, t)) * B + b) * H
    if floating is float:
        lf_cell_back_f32(H, dh_raw_row, dc_row, (<const float*> K.gates) + at * four_h,
                         cs + at * H, c_prev, dz_at, raw)
    else:
        lf_cell_back_f64(H, dh_raw_row, dc_row, (<const double*> K.gates) + at * four_h,
                         cs + at * H, c_prev, dz_at, raw)
    memcpy(dz_row, dz_at, four_h * sizeof(floating))


cdef inline void _dh_raw_product(Py_ssize_t rows, Py_ssize_t d, Py_ssize_t col0, Py_ssize_t n_cols,
                                 const Back* K, const floating* dh, floating* dh_raw) noexcept nogil:
    # dh_raw[:, cols] = dh @ W_hr[d][:, cols]   (W_hr stored (P, H); dh_raw from column 0, ld H)
    cdef const floating* w_hr_cols = (<const floating*> K.w_hr) + d * K.proj * K.hidden + col0
    if floating is float:
        if K.pk_hr != NULL:
            if rows == 1:
                lf_pgemv(col0, n_cols, K.proj, dh, K.pk_hr + d * K.pk_hr_len, dh_raw)
            elif rows > 1:
                lf_pgemm(rows, col0, n_cols, K.proj, dh, K.proj, K.pk_hr + d * K.pk_hr_len,
                         dh_raw, K.hidden, 0)
            return
    dh_raw = dh_raw + col0
    if rows == 1:
        gemv_rm(c'T', <int> K.proj, <int> n_cols, <floating> 1, w_hr_cols, <int> K.hidden, dh,
                <floating> 0, dh_raw)
    elif rows > 1:
        gemm_rm(c'N', <int> rows, <int> n_cols, <int> K.proj, <floating> 1, dh, <int> K.proj,
                w_hr_cols, <int> K.hidden, <floating> 0, dh_raw, <int> K.hidden)


cdef inline void _dh_prev_product(Py_ssize_t rows, Py_ssize_t d, Py_ssize_t col0, Py_ssize_t n_cols,
                                  const Back* K, const floating* dz_rows, floating* dh) noexcept nogil:
    # dh[:, cols] = dz @ W_hh[d][:, cols]   (W_hh stored (4H, H_out); dh from column 0, ld H_out)
    cdef const floating* w_hh_cols = (<const floating*> K.w_hh) + d * K.four_h * K.hidden_out + col0
    if floating is float:
        if K.pk_hh != NULL:
            if rows == 1:
                lf_pgemv(col0, n_cols, K.four_h, dz_rows, K.pk_hh + d * K.pk_hh_len, dh)
            elif rows > 1:
                lf_pgemm(rows, col0, n_cols, K.four_h, dz_rows, K.four_h,
                         K.pk_hh + d * K.pk_hh_len, dh, K.hidden_out, 0)
            return
    dh = dh + col0
    if rows == 1:
        gemv_rm(c'T', <int> K.four_h, <int> n_cols, <floating> 1, w_hh_cols, <int> K.hidden_out,
                dz_rows, <floating> 0, dh)
    elif rows > 1:
        gemm_rm(c'N', <int> rows, <int> n_cols, <int> K.four_h, <floating> 1, dz_rows,
                <int> K.four_h, w_hh_cols, <int> K.hidden_out, <floating> 0, dh, <int> K.hidden_out)


cdef bint _dh_prev_folded(const Back* K, Py_ssize_t i, const float* dz_row,
                          float* dh) noexcept nogil:
    # batch 1 (K.fold_dx), iteration i of the recurrence (time T-1-i): dh = dz_t @ W_hh, and in the
    # same loop an eighth of the input gradient dx = dz @ W_ih of the previous block of FOLD_ROWS
    # iterations' times (lf_pgemv_gates_tiles, one 8-row tile k-step every second k-step of the
    # row). The row streams W_hh from L2 and leaves the FMA units half idle, as in the forward.
    # Every output is the FMA chain of lf_pgemv and _input_grad_item's lf_pgemm: the same bits.
    # False (nothing done) in the iterations with no tiles: the first block's and a short last one.
    cdef Py_ssize_t four_h = K.four_h, I = K.input_size, quarter = K.hidden_out // 4
    cdef Py_ssize_t block = i // FOLD_ROWS, part = i % FOLD_ROWS, n_panels = I // 32, t0
    # each iteration's share: whole panels, or with fewer panels than iterations an equal k-range
    # of one (the tiles carry the partial sums over), so that every share fits the row's slots
    cdef Py_ssize_t v0 = part * n_panels // FOLD_ROWS, v1 = (part + 1) * n_panels // FOLD_ROWS
    cdef Py_ssize_t k0 = 0, k1 = four_h, chunks
    if n_panels < FOLD_ROWS and FOLD_ROWS % n_panels == 0:
        chunks = FOLD_ROWS // n_panels
        v0 = part // chunks
        v1 = v0 + 1
        k0 = (part % chunks) * four_h // chunks
        k1 = (part % chunks + 1) * four_h // chunks
    if block >= 1 and (block + 1) * FOLD_ROWS <= K.seq_len:
        t0 = K.seq_len - FOLD_ROWS * block
        lf_pgemv_gates_tiles(quarter, 0, quarter, four_h, dz_row, K.pk_hh, dh, 0, four_h,
                             (<const float*> K.dz) + t0 * four_h, four_h, K.pk_ih, v0, v1,
                             K.fold_dx + t0 * I, I, 0, k0, k1)
        return True
    return False


cdef void _load_grad_state(const Back* K, Py_ssize_t d, const Py_ssize_t* order, Py_ssize_t rows,
                           floating* dh, floating* dc) noexcept nogil:
    cdef Py_ssize_t r, b
    for r in range(rows):
        b = order[r]
        memcpy(dh + r * K.hidden_out, (<const floating*> K.grad_hn) + (d * K.batch + b) * K.hidden_out,
               K.hidden_out * sizeof(floating))
        memcpy(dc + r * K.hidden, (<const floating*> K.grad_cn) + (d * K.batch + b) * K.hidden,
               K.hidden * sizeof(floating))


cdef void _store_grad_state(const Back* K, Py_ssize_t d, const Py_ssize_t* order, Py_ssize_t rows,
                            const floating* dh, const floating* dc) noexcept nogil:
    cdef Py_ssize_t r, b
    for r in range(rows):
        b = order[r]
        memcpy((<floating*> K.grad_h0) + (d * K.batch + b) * K.hidden_out, dh + r * K.hidden_out,
               K.hidden_out * sizeof(floating))
        memcpy((<floating*> K.grad_c0) + (d * K.batch + b) * K.hidden, dc + r * K.hidden,
               K.hidden * sizeof(floating))


cdef void _back_chunk(Py_ssize_t item, const Back* K, floating* scratch) noexcept nogil:
    """Chunked mode: one (chunk, direction) item through all of its steps, last first."""
    cdef Py_ssize_t d = item % K.n_dirs
    cdef Py_ssize_t start = (item // K.n_dirs) * K.chunk
    cdef Py_ssize_t rows = K.chunk if start + K.chunk <= K.batch else K.batch - start
    cdef const Py_ssize_t* order = K.order + start
    cdef Py_ssize_t H = K.hidden, H_out = K.hidden_out, four_h = K.four_h
    # scratch: dh (chunk, H_out) | dc (chunk, H) | dz rows (chunk, 4H) | dh_raw (chunk, H)
    cdef floating* dh = scratch
    cdef floating* dc = dh + K.chunk * H_out
    cdef floating* dz_rows = dc + K.chunk * H
    cdef floating* dh_raw = dz_rows + K.chunk * four_h
    cdef const floating* w_hh = (<const floating*> K.w_hh) + d * four_h * H_out
    cdef const floating* w_hr = (<const floating*> K.w_hr) + d * K.proj * H
    cdef Py_ssize_t r, s, n_active
    cdef Py_ssize_t max_len = K.lengths[order[0]]

    _load_grad_state(K, d, order, rows, dh, dc)
    for s in range(max_len - 1, -1, -1):
        n_active = rows
        while n_active > 0 and K.lengths[order[n_active - 1]] <= s:
            n_active -= 1
        for r in range(n_active):
            _back_row_pre(K, d, s, order[r], dh + r * H_out)
        if K.proj > 0:
            _dh_raw_product(n_active, d, 0, H, K, dh, dh_raw)
        for r in range(n_active):
            _back_row_cell(K, d, s, order[r], (dh_raw + r * H) if K.proj > 0 else (dh + r * H_out),
                           dc + r * H, dz_rows + r * four_h, dh_raw + r * H)
        if floating is float:
            if K.fold_dx != NULL and _dh_prev_folded(K, max_len - 1 - s, dz_rows, dh):
                continue
        _dh_prev_product(n_active, d, 0, H_out, K, dz_rows, dh)
    _store_grad_state(K, d, order, rows, dh, dc)


cdef void _split_rows(const Back* K, Py_ssize_t s, Py_ssize_t n_active, Py_ssize_t u0,
                      Py_ssize_t u1, float* dh, float* dc, float* dzb, float* throwaway) noexcept nogil:
    # split mode, one thread's units of step s: dh += dL/dy, h_{t-1} kept, the cell's backward
    cdef Py_ssize_t H = K.hidden, four_h = K.four_h, B = K.batch, T = K.seq_len
    cdef Py_ssize_t r, b, t, at, j, g
    cdef const float* grad_y
    cdef const float* h_prev_row
    cdef const float* c_prev
    cdef const float* cs = <const float*> K.cs
    cdef float* dz_at
    for r in range(n_active):
        b = K.order[r]
        t = s                                        # one direction, never reversed
        at = t * B + b
        grad_y = (<const float*> K.grad_y) + (t * B + b) * K.y_stride
        for j in range(u0, u1):
            dh[r * H + j] = dh[r * H + j] + grad_y[j]
        if s == 0:
            h_prev_row = (<const float*> K.h0) + b * H
            c_prev = (<const float*> K.c0) + b * H
        else:
            h_prev_row = (<const float*> K.y) + ((t - 1) * B + b) * K.y_stride
            c_prev = cs + ((t - 1) * B + b) * H
        memcpy((<float*> K.h_prev) + at * H + u0, h_prev_row + u0, (u1 - u0) * sizeof(float))
        dz_at = (<float*> K.dz) + at * four_h
        lf_cell_back_range_f32(H, u0, u1, dh + r * H, dc + r * H,
                               (<const float*> K.gates) + at * four_h, cs + at * H, c_prev, dz_at,
                               throwaway + r * H)
        for g in range(4):
            memcpy(dzb + r * four_h + g * H + u0, dz_at + g * H + u0, (u1 - u0) * sizeof(float))


cdef long _back_split(const Back* K, float* state, int n_threads, long budget,
                      long start) noexcept nogil:
    """Split mode (the forward's; float32, packed kernel, one direction, one chunk, no projection):
    each thread owns whole 32-unit panels of the hidden units. Per step it adds dL/dy to its
    units of dh, runs their cell backward (dz of their four gate columns), meets the others at a
    spin barrier, then computes its units of dh_{t-1} = dz @ W_hh from every unit's dz. dz rows
    alternate between two buffers by step, so a thread may start the next step while another
    still reads this one's. Same sums as chunked mode: the bits do not depend on the split.

    With a budget (the forward's _run_split), the first thread checks the ticks since `start`
    after its cell rows of a step; past budget * (steps + LF_SPLIT_ABORT_LAG) it sets that step
    as the last one split before the barrier, every thread finishes the step's product and
    leaves, and the calling thread runs the steps left on all units. Returns the steps run split.

    As in the forward, the first thread does not wait for the others to wake: it runs whole steps
    alone until they have all arrived, then the team shares the units from the next step on.

    state: dh (B, H) | dc (B, H) | throwaway (B, H) | dz rows 2 x (B, 4H)."""
    cdef Py_ssize_t H = K.hidden, B = K.batch, four_h = K.four_h
    cdef float* dh = state
    cdef float* dc = dh + B * H
    cdef float* throwaway = dc + B * H
    cdef float* dz_bufs = throwaway + B * H
    cdef Py_ssize_t max_len = K.lengths[K.order[0]]
    cdef lf_barrier barrier
    cdef int team
    cdef Py_ssize_t u0, u1, s, n_active
    cdef float* dzb
    cdef long last_split = 0             # shared: the last step (counting down) run split
    cdef long* last_ptr = &last_split    # through a pointer: the parallel block would privatise it
    cdef long done_alone = -1            # steps the first thread ran alone (the team's start)
    cdef long* done_ptr = &done_alone
    cdef long arrived = 0                # threads past the first that have started
    cdef long* arrived_ptr = &arrived
    cdef long alone = _split_alone_forced
    _load_grad_state(K, 0, K.order, B, dh, dc)
    lf_barrier_init(&barrier)
    with parallel(num_threads=n_threads):
        team = lf_team_size()
        u0 = lf_team_unit_begin(H)
        u1 = lf_team_unit_end(H)
        s = max_len - 1
        if lf_team_rank() == 0:
            while s >= 0 and (max_len - 1 - s < alone or lf_team_arrived(arrived_ptr) < team - 1):
                _back_full_step(K, s, dh, dc, dz_bufs, throwaway)
                s = s - 1
            lf_team_open(done_ptr, max_len - 1 - s)
        else:
            lf_team_arrive(arrived_ptr)
            s = max_len - 1 - lf_team_wait_open(done_ptr)
        while s >= lf_load_long(last_ptr):
            n_active = _active(K, s)
            dzb = dz_bufs + (s % 2) * B * four_h
            if u1 > u0:
                _split_rows(K, s, n_active, u0, u1, dh, dc, dzb, throwaway)
            if (budget > 0 and lf_team_rank() == 0 and s > 0
                    and lf_ticks() - start > budget * (max_len - s + LF_SPLIT_ABORT_LAG)):
                lf_store_long(last_ptr, s)
            lf_barrier_wait(&barrier, team)
            if u1 > u0:
                if n_active == 1:
                    lf_pgemv(u0, u1 - u0, four_h, dzb, K.pk_hh, dh)
                else:
                    lf_pgemm(n_active, u0, u1 - u0, four_h, dzb, four_h, K.pk_hh, dh, H, 0)
            s = s - 1
    for s in range(last_split - 1, -1, -1):
        _back_full_step(K, s, dh, dc, dz_bufs, throwaway)
    _store_grad_state(K, 0, K.order, B, dh, dc)
    return max_len - last_split


cdef inline void _back_full_step(const Back* K, Py_ssize_t s, float* dh, float* dc, float* dz_bufs,
                                 float* throwaway) noexcept nogil:
    # split mode's step s on every unit, by one thread (before the team has started, or after
    # the budget stopped it): the same cell rows and product, so the same bits
    cdef Py_ssize_t n_active = _active(K, s)
    cdef float* dzb = dz_bufs + (s % 2) * K.batch * K.four_h
    _split_rows(K, s, n_active, 0, K.hidden, dh, dc, dzb, throwaway)
    if n_active == 1:
        lf_pgemv(0, K.hidden, K.four_h, dzb, K.pk_hh, dh)
    else:
        lf_pgemm(n_active, 0, K.hidden, K.four_h, dzb, K.four_h, K.pk_hh, dh, K.hidden, 0)


cdef void _wide_rows(Py_ssize_t item, Py_ssize_t s, Py_ssize_t n_active, Py_ssize_t n_row_blocks,
                     int phase, const Back* K, floating* dh, floating* dc, floating* dzr,
                     floating* dhr) noexcept nogil:
    # wide mode, row phases of one block of rows of one direction: 0 = pre (and the cell
    # without projection), 1 = the cell after the projection's product
    cdef Py_ssize_t d = item // n_row_blocks
    cdef Py_ssize_t r0 = (item % n_row_blocks) * WIDE_ROWS
    cdef Py_ssize_t r1 = r0 + WIDE_ROWS if r0 + WIDE_ROWS <= n_active else n_active
    cdef Py_ssize_t B = K.batch, H = K.hidden, H_out = K.hidden_out, r, b
    cdef floating* dh_d = dh + d * B * H_out
    cdef floating* dc_d = dc + d * B * H
    cdef floating* dzr_d = dzr + d * B * K.four_h
    cdef floating* dhr_d = dhr + d * B * H
    for r in range(r0, r1):
        b = K.order[r]
        if phase == 0:
            _back_row_pre(K, d, s, b, dh_d + r * H_out)
        if (phase == 0 and K.proj == 0) or phase == 1:
            _back_row_cell(K, d, s, b, (dhr_d + r * H) if K.proj > 0 else (dh_d + r * H_out),
                           dc_d + r * H, dzr_d + r * K.four_h, dhr_d + r * H)


cdef void _wide_cols(Py_ssize_t item, Py_ssize_t n_active, Py_ssize_t n_blocks, Py_ssize_t width,
                     Py_ssize_t total, int which, const Back* K, floating* dh, floating* dzr,
                     floating* dhr) noexcept nogil:
    # wide mode, column phases: which = 0: dh_raw = dh @ W_hr, 1: dh = dz @ W_hh
    cdef Py_ssize_t d = item // n_blocks
    cdef Py_ssize_t col0 = (item % n_blocks) * width
    cdef Py_ssize_t n_cols = width if col0 + width <= total else total - col0
    cdef Py_ssize_t B = K.batch
    if which == 0:
        _dh_raw_product(n_active, d, col0, n_cols, K, dh + d * B * K.hidden_out,
                        dhr + d * B * K.hidden)
    else:
        _dh_prev_product(n_active, d, col0, n_cols, K, dzr + d * B * K.four_h,
                         dh + d * B * K.hidden_out)


cdef void _back_wide(const Back* K, floating* state, int n_threads) noexcept nogil:
    """Wide mode: every step over the whole batch, the products split by columns over threads.

    state: dh (D, B, H_out) | dc (D, B, H) | dz rows (D, B, 4H) | dh_raw (D, B, H), rows in order.
    """
    cdef Py_ssize_t D = K.n_dirs, B = K.batch
    cdef floating* dh = state
    cdef floating* dc = dh + D * B * K.hidden_out
    cdef floating* dzr = dc + D * B * K.hidden
    cdef floating* dhr = dzr + D * B * K.four_h
    # column blocks in multiples of 32 (whole lf_pgemm panels)
    cdef Py_ssize_t out_w = ((K.hidden_out + WIDE_COL_BLOCKS - 1) // WIDE_COL_BLOCKS + 31) // 32 * 32
    cdef Py_ssize_t n_out = (K.hidden_out + out_w - 1) // out_w
    cdef Py_ssize_t raw_w = ((K.hidden + WIDE_COL_BLOCKS - 1) // WIDE_COL_BLOCKS + 31) // 32 * 32
    cdef Py_ssize_t n_raw = (K.hidden + raw_w - 1) // raw_w
    cdef Py_ssize_t d, s, item, n_active, n_rb
    cdef Py_ssize_t max_len = K.lengths[K.order[0]]
    for d in range(D):
        _load_grad_state(K, d, K.order, B, dh + d * B * K.hidden_out, dc + d * B * K.hidden)
    if n_threads <= 1:
        for s in range(max_len - 1, -1, -1):
            n_active = _active(K, s)
            n_rb = (n_active + WIDE_ROWS - 1) // WIDE_ROWS
            for item in range(D * n_rb):
                _wide_rows(item, s, n_active, n_rb, 0, K, dh, dc, dzr, dhr)
            if K.proj > 0:
                for item in range(D * n_raw):
                    _wide_cols(item, n_active, n_raw, raw_w, K.hidden, 0, K, dh, dzr, dhr)
                for item in range(D * n_rb):
                    _wide_rows(item, s, n_active, n_rb, 1, K, dh, dc, dzr, dhr)
            for item in range(D * n_out):
                _wide_cols(item, n_active, n_out, out_w, K.hidden_out, 1, K, dh, dzr, dhr)
    else:
        with parallel(num_threads=n_threads):
            # each prange ends with a barrier that orders the phases of a step
            for s in range(max_len - 1, -1, -1):
                n_active = _active(K, s)
                n_rb = (n_active + WIDE_ROWS - 1) // WIDE_ROWS
                for item in prange(D * n_rb, schedule='static'):
                    _wide_rows(item, s, n_active, n_rb, 0, K, dh, dc, dzr, dhr)
                if K.proj > 0:
                    for item in prange(D * n_raw, schedule='static'):
                        _wide_cols(item, n_active, n_raw, raw_w, K.hidden, 0, K, dh, dzr, dhr)
                    for item in prange(D * n_rb, schedule='static'):
                        _wide_rows(item, s, n_active, n_rb, 1, K, dh, dc, dzr, dhr)
                for item in prange(D * n_out, schedule='static'):
                    _wide_cols(item, n_active, n_out, out_w, K.hidden_out, 1, K, dh, dzr, dhr)
    for d in range(D):
        _store_grad_state(K, d, K.order, B, dh + d * B * K.hidden_out, dc + d * B * K.hidden)


cdef inline Py_ssize_t _active(const Back* K, Py_ssize_t s) noexcept nogil:
    cdef Py_ssize_t rows = K.batch
    while rows > 0 and K.lengths[K.order[rows - 1]] <= s:
        rows -= 1
    return rows


cdef void* _work_buffer(int slot, size_t n_bytes, bint zero) noexcept nogil:
    # a work buffer from slot `slot` (lf_ws_get), zero-filled if asked; NULL on failure
    cdef void* p = lf_ws_get(slot, n_bytes)
    if p != NULL and zero:
        memset(p, 0, n_bytes)
    return p


cdef void _release_all(void* dz, void* h_prev, void* h_raw, void* dh_proj) noexcept nogil:
    lf_ws_release(WS_DZ, dz)
    lf_ws_release(WS_H_PREV, h_prev)
    lf_ws_release(WS_H_RAW, h_raw)
    lf_ws_release(WS_DH_PROJ, dh_proj)


cdef inline Py_ssize_t _grad_block(Py_ssize_t rows, bint packed, Py_ssize_t n_threads) noexcept nogil:
    # rows per weight-gradient block, rounded up to 16. BLAS: a quarter. Packed kernel (every
    # output one FMA chain over T*B whatever the blocks, so the bits never depend on them): one
    # block per thread of at most GRAD_MAX_ROWS rows, as each block streams all T*B rows of x and
    # h_prev ((100,256,64,64) dW_ih + dW_hh in a C benchmark: one thread 79 -> 93 GF/s with one
    # block instead of 4, two threads 155 -> 183; (100,64,256,256) on two: 157 -> 207)
    cdef Py_ssize_t n = GRAD_BLOCKS
    if packed:
        n = (rows + GRAD_MAX_ROWS - 1) // GRAD_MAX_ROWS
        if n < n_threads:
            n = n_threads
    return ((rows + n - 1) // n + 15) // 16 * 16


cdef inline void _bias_grad(const Back* K, Py_ssize_t d, const floating* dz, Py_ssize_t row0,
                            Py_ssize_t n_rows, Py_ssize_t TB, floating* g_bias) noexcept nogil:
    # db[rows] = sum of dz over all rows, in row order
    cdef Py_ssize_t q, j
    for j in range(row0, row0 + n_rows):
        g_bias[d * K.four_h + j] = 0
    for q in range(TB):
        for j in range(row0, row0 + n_rows):
            g_bias[d * K.four_h + j] += dz[q * K.four_h + j]


cdef void _weight_grad_item(Py_ssize_t item, const Back* K, const floating* x,
                            const floating* w_ih, floating* g_w_ih, floating* g_w_hh,
                            floating* g_bias, floating* g_w_hr, Py_ssize_t n_gate_blocks,
                            Py_ssize_t n_proj_blocks) noexcept nogil:
    # one block of output rows of one direction's weight gradients, summed over all T*B rows
    cdef Py_ssize_t per_dir = n_gate_blocks + n_proj_blocks
    cdef Py_ssize_t d = item // per_dir
    cdef Py_ssize_t k = item % per_dir
    cdef Py_ssize_t TB = K.seq_len * K.batch, row0, n_rows, j, q
    cdef const floating* dz = (<const floating*> K.dz) + d * TB * K.four_h
    cdef floating acc
    if k < n_gate_blocks:
        row0 = k * K.grad_rows_gate
        n_rows = K.grad_rows_gate if row0 + K.grad_rows_gate <= K.four_h else K.four_h - row0
        if floating is float:
            if K.grad_packed:
                # dW_ih, dW_hh and db of these rows in one pass over dz (the same sums as apart)
                lf_pgemm_at2(n_rows, TB, dz + row0, K.four_h,
                             K.input_size, K.b_x, K.ld_x,
                             g_w_ih + (d * K.four_h + row0) * K.input_size, K.input_size,
                             K.hidden_out, K.b_hp + d * K.b_hp_dir, K.ld_hp,
                             g_w_hh + (d * K.four_h + row0) * K.hidden_out, K.hidden_out,
                             g_bias + d * K.four_h + row0)
                return
        # dW_ih[rows] = dz[:, rows].T @ x ; dW_hh[rows] = dz[:, rows].T @ h_prev
        gemm_rm_tn(<int> n_rows, <int> K.input_size, <int> TB, <floating> 1, dz + row0,
                   <int> K.four_h, x, <int> K.input_size, <floating> 0,
                   g_w_ih + (d * K.four_h + row0) * K.input_size, <int> K.input_size)
        gemm_rm_tn(<int> n_rows, <int> K.hidden_out, <int> TB, <floating> 1, dz + row0,
                   <int> K.four_h, (<const floating*> K.h_prev) + d * TB * K.hidden_out,
                   <int> K.hidden_out, <floating> 0,
                   g_w_hh + (d * K.four_h + row0) * K.hidden_out, <int> K.hidden_out)
        _bias_grad(K, d, dz, row0, n_rows, TB, g_bias)
    else:
        row0 = (k - n_gate_blocks) * K.grad_rows_proj
        n_rows = K.grad_rows_proj if row0 + K.grad_rows_proj <= K.proj else K.proj - row0
        if floating is float:
            if K.pk_hraw != NULL:
                lf_pgemm_at(n_rows, K.hidden, TB, (<const float*> K.dh_proj) + d * TB * K.proj + row0,
                            K.proj, K.pk_hraw + d * K.pk_hraw_len,
                            g_w_hr + (d * K.proj + row0) * K.hidden, K.hidden)
                return
        # dW_hr[rows] = dh_proj[:, rows].T @ h_raw
        gemm_rm_tn(<int> n_rows, <int> K.hidden, <int> TB, <floating> 1,
                   (<const floating*> K.dh_proj) + d * TB * K.proj + row0, <int> K.proj,
                   (<const floating*> K.h_raw) + d * TB * K.hidden, <int> K.hidden, <floating> 0,
                   g_w_hr + (d * K.proj + row0) * K.hidden, <int> K.hidden)


cdef void _input_grad_item(Py_ssize_t item, Py_ssize_t n_col_groups, const Back* K,
                           const floating* w_ih, floating* g_x) noexcept nogil:
    # dx[rows, cols] = sum_d dz[d, rows] @ W_ih[d][:, cols]   (directions added in order 0, 1)
    # for one block of GRAD_ROWS rows and one of n_col_groups groups of GRAD_X_COLS columns;
    # each output is the same sum whatever the split
    cdef Py_ssize_t TB = K.seq_len * K.batch, I = K.input_size
    cdef Py_ssize_t row0 = (item // n_col_groups) * GRAD_ROWS
    cdef Py_ssize_t n_rows = GRAD_ROWS if row0 + GRAD_ROWS <= TB else TB - row0
    cdef Py_ssize_t col0 = 0, n_cols = I
    cdef Py_ssize_t d
    if n_col_groups > 1:
        col0 = (item % n_col_groups) * GRAD_X_COLS
        n_cols = GRAD_X_COLS if col0 + GRAD_X_COLS <= I else I - col0
    for d in range(K.n_dirs):
        if floating is float:
            if K.pk_ih != NULL:
                lf_pgemm(n_rows, col0, n_cols, K.four_h,
                         (<const float*> K.dz) + (d * TB + row0) * K.four_h, K.four_h,
                         K.pk_ih + d * K.pk_ih_len, g_x + row0 * I, I, 0 if d == 0 else 1)
                continue
        gemm_rm(c'N', <int> n_rows, <int> n_cols, <int> K.four_h, <floating> 1,
                (<const floating*> K.dz) + (d * TB + row0) * K.four_h, <int> K.four_h,
                w_ih + d * K.four_h * I + col0, <int> I,
                <floating> (0 if d == 0 else 1), g_x + row0 * I + col0, <int> I)


def backward_layer(const floating[:, :, ::1] x,            # IN  (T, B, I) the layer's input
                   const floating[:, :, ::1] w_ih,         # IN  (D, 4H, I)
                   const floating[:, :, ::1] w_hh,         # IN  (D, 4H, H_out)
                   const floating[:, :, ::1] w_hr,         # IN  (D, P, H) or (D, 0, H)
                   const floating[:, :, :, ::1] gates,     # IN  (D, T, B, 4H) forward cache
                   const floating[:, :, :, ::1] cs,        # IN  (D, T, B, H) forward cache
                   const floating[:, :, ::1] y,            # IN  (T, B, D*H_out) the layer's output
                   const floating[:, :, ::1] h0,           # IN  (D, B, H_out)
                   const floating[:, :, ::1] c0,           # IN  (D, B, H)
                   const floating[:, :, ::1] grad_y,       # IN  (T, B, D*H_out)
                   const floating[:, :, ::1] grad_hn,      # IN  (D, B, H_out)
                   const floating[:, :, ::1] grad_cn,      # IN  (D, B, H)
                   const Py_ssize_t[::1] order,            # IN  (B,) rows by length, longest first
                   const Py_ssize_t[::1] lengths,          # IN  (B,)
                   const int[::1] reverse,                 # IN  (D,)
                   floating[:, :, ::1] grad_x,             # OUT (T, B, I)
                   floating[:, :, ::1] grad_h0,            # OUT (D, B, H_out)
                   floating[:, :, ::1] grad_c0,            # OUT (D, B, H)
                   floating[:, :, ::1] grad_w_ih,          # OUT (D, 4H, I)
                   floating[:, :, ::1] grad_w_hh,          # OUT (D, 4H, H_out)
                   floating[:, ::1] grad_bias,             # OUT (D, 4H) (b_ih and b_hh alike)
                   floating[:, :, ::1] grad_w_hr,          # OUT (D, P, H) or size 0
                   int n_threads,
                   int mode=0):                            # 0: by shape, 1: chunked, 2: wide
    """Gradients of one layer (all directions); see the module docstring."""
    cdef Back K
    K.seq_len = x.shape[0]
    K.batch = x.shape[1]
    K.input_size = x.shape[2]
    K.n_dirs = w_ih.shape[0]
    K.four_h = w_ih.shape[1]
    K.hidden = K.four_h // 4
    K.proj = w_hr.shape[1]
    K.hidden_out = K.proj if K.proj > 0 else K.hidden
    K.y_stride = y.shape[2]
    if K.seq_len == 0 or K.batch == 0:
        raise ValueError("backward_layer needs at least one step and one sequence")
    K.chunk = batch_chunk(K.batch)   # the forward's rule: a function of the batch size only
    K.n_chunks = (K.batch + K.chunk - 1) // K.chunk
    cdef Py_ssize_t D = K.n_dirs, TB = K.seq_len * K.batch
    cdef Py_ssize_t H = K.hidden, P = K.proj
    # The recurrence writes every running (t, b) row of dz, h_prev, h_raw and dh_proj; the rows
    # past a sequence's length must read zero in the weight-gradient products. Without padding
    # there are none, and the zeroing (26 MB of dz at (100,256,64,64)) is skipped.
    cdef bint padded = False
    cdef Py_ssize_t b
    for b in range(K.batch):
        if lengths[b] != K.seq_len:
            padded = True
    cdef floating* dz = <floating*> _work_buffer(WS_DZ, D * TB * K.four_h * sizeof(floating), padded)
    cdef floating* h_prev = <floating*> _work_buffer(WS_H_PREV, D * TB * K.hidden_out * sizeof(floating),
                                                     padded)
    cdef floating* h_raw = <floating*> _work_buffer(WS_H_RAW, (D * TB * H if P > 0 else 1) * sizeof(floating),
                                                    padded)
    cdef floating* dh_proj = <floating*> _work_buffer(WS_DH_PROJ,
                                                      (D * TB * P if P > 0 else 1) * sizeof(floating), padded)
    if dz == NULL or h_prev == NULL or h_raw == NULL or dh_proj == NULL:
        _release_all(dz, h_prev, h_raw, dh_proj)
        raise MemoryError(f"cannot allocate the backward workspace ({D} x {TB} x {K.four_h} values)")
    K.w_hh = &w_hh[0, 0, 0]
    K.w_hr = &w_hr[0, 0, 0] if P > 0 else NULL
    # float32: the transposed weights packed once for lf_pgemm (the forward's switch decides)
    cdef void* pk_raw = NULL
    cdef float* pk = NULL
    cdef Py_ssize_t dd
    K.pk_hh = K.pk_hr = K.pk_ih = NULL
    K.pk_hh_len = K.pk_hr_len = K.pk_ih_len = 0
    if floating is float:
        if packed_gemm_active():
            K.pk_hh_len = lf_pack_len(K.hidden_out, K.four_h)
            K.pk_ih_len = lf_pack_len(K.input_size, K.four_h)
            K.pk_hr_len = lf_pack_len(H, P) if P > 0 else 0
            pk = lf_ws_aligned(WS_PACKED, D * (K.pk_hh_len + K.pk_ih_len + K.pk_hr_len), &pk_raw)
            if pk == NULL:
                _release_all(dz, h_prev, h_raw, dh_proj)
                raise MemoryError("cannot allocate the packed weights of backward")
            # with more threads, only what changed is written (lf_pack_w_for in the forward)
            with nogil:
                for dd in range(D):
                    lf_pack_wt_for(&w_hh[dd, 0, 0], K.hidden_out, K.hidden_out, K.four_h,
                                   pk + dd * K.pk_hh_len, n_threads > 1)
                    lf_pack_wt_for(&w_ih[dd, 0, 0], K.input_size, K.input_size, K.four_h,
                                   pk + D * K.pk_hh_len + dd * K.pk_ih_len, n_threads > 1)
                    if P > 0:
                        lf_pack_wt_for(&w_hr[dd, 0, 0], H, H, P,
                                       pk + D * (K.pk_hh_len + K.pk_ih_len) + dd * K.pk_hr_len,
                                       n_threads > 1)
            K.pk_hh = pk
            K.pk_ih = pk + D * K.pk_hh_len
            K.pk_hr = (pk + D * (K.pk_hh_len + K.pk_ih_len)) if P > 0 else NULL
    K.gates = &gates[0, 0, 0, 0]
    K.cs = &cs[0, 0, 0, 0]
    K.y = &y[0, 0, 0]
    K.h0 = &h0[0, 0, 0]
    K.c0 = &c0[0, 0, 0]
    K.grad_y = &grad_y[0, 0, 0]
    K.grad_hn = &grad_hn[0, 0, 0]
    K.grad_cn = &grad_cn[0, 0, 0]
    K.order = &order[0]
    K.lengths = &lengths[0]
    K.reverse = &reverse[0]
    K.dz = dz
    K.h_prev = h_prev
    K.h_raw = h_raw
    K.dh_proj = dh_proj
    K.grad_h0 = &grad_h0[0, 0, 0]
    K.grad_c0 = &grad_c0[0, 0, 0]
    cdef const floating* x_ptr = &x[0, 0, 0]
    cdef const floating* w_ih_ptr = &w_ih[0, 0, 0]
    cdef floating* g_x = &grad_x[0, 0, 0]
    cdef floating* g_w_ih = &grad_w_ih[0, 0, 0]
    cdef floating* g_w_hh = &grad_w_hh[0, 0, 0]
    cdef floating* g_bias = &grad_bias[0, 0]
    cdef floating* g_w_hr = &grad_w_hr[0, 0, 0] if P > 0 else NULL
    # float32 weight gradients through the packed kernel. x and h_prev are W.T operands already
    # (rows along T*B): up to GRAD_IN_PLACE_MAX columns they are read in place, wider ones are
    # packed along T*B (a k-block's panel would span too many pages: (50,64,512,512) backward
    # 254 -> 267 ms in place), and so is h_raw for dW_hr. Without the memory for the packed
    # copies, BLAS computes these gradients.
    cdef void* pk2_raw = NULL
    cdef float* pk2 = NULL
    cdef size_t pk_x_len = 0, pk_hp_len = 0
    K.grad_packed = 0
    K.pk_hraw = NULL
    K.pk_hraw_len = 0
    K.ld_x = K.input_size if K.input_size <= GRAD_IN_PLACE_MAX else 0
    K.ld_hp = K.hidden_out if K.hidden_out <= GRAD_IN_PLACE_MAX else 0
    if floating is float:
        if K.pk_hh != NULL and TB > 0:
            pk_x_len = 0 if K.ld_x else lf_pack_len(K.input_size, TB)
            pk_hp_len = 0 if K.ld_hp else lf_pack_len(K.hidden_out, TB)
            K.pk_hraw_len = lf_pack_len(H, TB) if P > 0 else 0
            if pk_x_len + pk_hp_len + K.pk_hraw_len == 0:
                K.grad_packed = 1
            else:
                pk2 = lf_ws_aligned(WS_PACKED_GRAD, pk_x_len + D * (pk_hp_len + K.pk_hraw_len),
                                    &pk2_raw)
                K.grad_packed = pk2 != NULL
    K.b_x = (<const float*> x_ptr) if K.ld_x else pk2
    K.b_hp = (<const float*> K.h_prev) if K.ld_hp else (pk2 + pk_x_len if pk2 != NULL else NULL)
    K.b_hp_dir = TB * K.hidden_out if K.ld_hp else pk_hp_len
    # split mode as in the forward (same conditions), with more than one thread
    # the forward's rule (a reversed lone direction, ONNX's, never trains here: kept out anyway)
    cdef bint split_ok = split_mode_ok(K.batch, H, D, P, True, K.pk_hh != NULL) and reverse[0] == 0
    # split or one thread by the measured speed of each (lf_split_choose), as in the forward; a
    # small call split mode cannot take chooses between all its threads and one (the forward's
    # SMALL_CALL_FLOPS), measured over the whole call
    cdef bint small_call = (2.0 * D * TB * K.four_h * (K.input_size + K.hidden_out)
                            < SMALL_CALL_FLOPS)
    cdef long choice_key = 0
    cdef int choice = 0
    if mode == 0 and (split_ok or small_call) and n_threads > 1:
        choice_key = lf_split_key(K.batch, H, K.input_size, n_threads,
                                  2 + (4 if sizeof(floating) == 8 else 0))
        choice = lf_split_choose(choice_key)
        if not split_ok and not (choice & 1):
            n_threads = 1
    cdef Py_ssize_t n_items = K.n_chunks * D
    cdef double grad_flops = 2.0 * D * TB * K.four_h * (K.input_size + K.hidden_out) * 2
    # threads the weight gradients have work for; per direction (the directions' items run side
    # by side), the row blocks a direction's gradients are cut into
    cdef int grad_threads = <int> min(n_threads, max(1.0, grad_flops / 200000))
    cdef Py_ssize_t grad_threads_per_dir = (grad_threads + D - 1) // D
    K.grad_rows_gate = _grad_block(K.four_h, K.grad_packed, grad_threads_per_dir)
    K.grad_rows_proj = _grad_block(P, pk2 != NULL, grad_threads_per_dir) if P > 0 else 1
    cdef Py_ssize_t n_gate_blocks = (K.four_h + K.grad_rows_gate - 1) // K.grad_rows_gate
    cdef Py_ssize_t n_proj_blocks = (P + K.grad_rows_proj - 1) // K.grad_rows_proj if P > 0 else 0
    cdef Py_ssize_t n_weight_items = D * (n_gate_blocks + n_proj_blocks)
    cdef Py_ssize_t n_x_items = (TB + GRAD_ROWS - 1) // GRAD_ROWS
    # few row blocks (short sequences, batch 1): dx split by columns too, so that every thread
    # gets a share ((100,1,128,128): one item of 13 MFLOP before)
    cdef Py_ssize_t n_x_col_groups = 1
    if n_x_items < 4:
        n_x_col_groups = (K.input_size + GRAD_X_COLS - 1) // GRAD_X_COLS
    n_x_items *= n_x_col_groups
    cdef Py_ssize_t scratch_len = K.chunk * (K.hidden_out + 2 * H + K.four_h)
    cdef Py_ssize_t wide_len = D * K.batch * (K.hidden_out + 2 * H + K.four_h)
    if mode == 0:
        if split_ok and choice & 1:
            mode = 3
        else:
            mode = 2 if recurrence_mode(K.batch, H, K.hidden_out, sizeof(floating),
                                        K.pk_hh != NULL, D) == "wide" else 1
    elif mode == 3 and not split_ok:
        mode = 1
    # batch 1 on one thread (chunked: one item), W_hh at least 256 KB: the input gradient's rows
    # come out of the recurrence's L2-bound products (_dh_prev_folded), not a GEMM after it
    K.fold_dx = NULL
    if floating is float:
        if (_fold_enabled and mode == 1 and K.pk_hh != NULL and D == 1 and P == 0 and K.batch == 1
                and not padded and reverse[0] == 0 and K.seq_len >= 2 * FOLD_ROWS
                and K.hidden_out % 128 == 0 and K.input_size % 32 == 0):
            K.fold_dx = g_x
            n_x_items = 0
    cdef floating* scratch = NULL
    cdef Py_ssize_t item
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    # threads only where there is work for them (the bits never depend on the count)
    cdef double rec_flops = 4.0 * D * TB * K.four_h * K.hidden_out
    cdef int threads_rec = <int> min(n_threads, n_items, max(1.0, rec_flops / 200000))
    cdef int threads_grad = <int> min(grad_threads, n_weight_items)
    cdef int threads_wide = <int> min(n_threads, D * 8, max(1.0, rec_flops / K.seq_len / 200000))

    cdef long ticks = lf_ticks()          # the recurrence's time, for lf_split_record
    cdef long split_steps                 # steps split mode ran before its budget stopped it
    with nogil:
        if mode == 3:
            if floating is float:
                scratch = <floating*> malloc(11 * K.batch * H * sizeof(floating))
                if scratch == NULL:
                    failed = 1
                else:
                    split_steps = _back_split(&K, scratch, n_threads, _split_budget_forced
                                              or lf_split_budget(choice_key, choice), ticks)
                    if split_steps < K.lengths[K.order[0]]:
                        # stopped past its budget: measured as the whole call (the forward's
                        # _run_split caller says why)
                        choice = choice | 2
                    free(scratch)
        elif mode == 2:
            scratch = <floating*> malloc(wide_len * sizeof(floating))
            if scratch == NULL:
                failed = 1
            else:
                _back_wide(&K, scratch, threads_wide)
                free(scratch)
        elif threads_rec <= 1:
            scratch = <floating*> malloc(scratch_len * sizeof(floating))
            if scratch == NULL:
                failed = 1
            else:
                for item in range(n_items):
                    _back_chunk(item, &K, scratch)
                free(scratch)
        else:
            with parallel(num_threads=threads_rec):
                scratch = <floating*> malloc(scratch_len * sizeof(floating))
                for item in prange(n_items, schedule='dynamic'):
                    if scratch == NULL:
                        failed_ptr[0] = 1
                    else:
                        _back_chunk(item, &K, scratch)
                free(scratch)
        if choice & 2 and split_ok:
            lf_split_record(choice_key, choice, lf_ticks() - ticks, K.seq_len)
        if floating is float:
            if not failed and K.fold_dx != NULL:
                # the rows no block's tiles took: the first times, which the recurrence ends with
                lf_pgemm(K.seq_len - FOLD_ROWS * (K.seq_len // FOLD_ROWS - 1), 0, K.input_size,
                         K.four_h, <const float*> K.dz, K.four_h, K.pk_ih, K.fold_dx,
                         K.input_size, 0)
        if not failed and pk2 != NULL:
            if floating is float:
                if not K.ld_x:
                    lf_pack_wt(x_ptr, K.input_size, K.input_size, TB, pk2)
                for dd in range(D):
                    if not K.ld_hp:
                        lf_pack_wt((<const float*> K.h_prev) + dd * TB * K.hidden_out, K.hidden_out,
                                   K.hidden_out, TB, pk2 + pk_x_len + dd * pk_hp_len)
                    if P > 0:
                        lf_pack_wt((<const float*> K.h_raw) + dd * TB * H, H, H, TB,
                                   pk2 + pk_x_len + D * pk_hp_len + dd * K.pk_hraw_len)
                K.pk_hraw = (pk2 + pk_x_len + D * pk_hp_len) if P > 0 else NULL
        if not failed:
            if threads_grad <= 1:
                for item in range(n_weight_items):
                    _weight_grad_item(item, &K, x_ptr, w_ih_ptr, g_w_ih, g_w_hh, g_bias, g_w_hr,
                                      n_gate_blocks, n_proj_blocks)
                for item in range(n_x_items):
                    _input_grad_item(item, n_x_col_groups, &K, w_ih_ptr, g_x)
            else:
                # one team for both kinds of items (the larger weight items first), so that no
                # thread idles while another finishes the last items of the first kind
                for item in prange(n_weight_items + n_x_items, num_threads=threads_grad,
                                   schedule='dynamic'):
                    if item < n_weight_items:
                        _weight_grad_item(item, &K, x_ptr, w_ih_ptr, g_w_ih, g_w_hh, g_bias,
                                          g_w_hr, n_gate_blocks, n_proj_blocks)
                    else:
                        _input_grad_item(item - n_weight_items, n_x_col_groups, &K, w_ih_ptr, g_x)
        if choice & 2 and not split_ok:
            lf_split_record(choice_key, choice, lf_ticks() - ticks, K.seq_len)
        if choice_key != 0:
            lf_split_ended(choice_key)      # the next call's pause counts from here, as in the forward
        _release_all(dz, h_prev, h_raw, dh_proj)
        lf_ws_release(WS_PACKED, pk_raw)
        lf_ws_release(WS_PACKED_GRAD, pk2_raw)
    if failed:
        raise MemoryError("cannot allocate the per-thread scratch of the backward recurrence")


def _set_kernel(int isa, dict params):
    """This module's copy of the kernel path and parameters (see _forward._set_kernel)."""
    return lf_set_kernel(isa, params["tile_rows"], params["kc"], params["kc_narrow"])


from lstm_fast import _cpu as _cpu_module
_set_kernel(*_cpu_module.kernel_settings())
