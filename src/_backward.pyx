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
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memcpy, memset

from _blas cimport gemm_rm, gemm_rm_tn, gemv_rm

cdef extern from *:
    """
    #include <math.h>
    /* dz for one row: from the upstream gradients of h_raw (dh) and c (dc, updated in place to the
       gradient of c_{t-1}), the activated gates [i|f|g|o] and c_t, c_{t-1}. */
    #define LF_CELL_BACK(T, SUFFIX, TANH)                                                      \
    static inline void lf_cell_back_##SUFFIX(Py_ssize_t hidden, const T* restrict dh,         \
            T* restrict dc, const T* restrict gates, const T* restrict c_t,                   \
            const T* restrict c_prev, T* restrict dz, T* restrict h_raw) {                    \
        const T *gi = gates, *gf = gates + hidden, *gg = gates + 2 * hidden;                  \
        const T *go = gates + 3 * hidden;                                                     \
        T *dzf = dz + hidden, *dzg = dz + 2 * hidden, *dzo = dz + 3 * hidden;                 \
        for (Py_ssize_t j = 0; j < hidden; j++) {                                             \
            T tc = TANH(c_t[j]);                                                              \
            T dct = dc[j] + dh[j] * go[j] * (1 - tc * tc);                                    \
            dz[j] = dct * gg[j] * gi[j] * (1 - gi[j]);                                        \
            dzf[j] = dct * c_prev[j] * gf[j] * (1 - gf[j]);                                   \
            dzg[j] = dct * gi[j] * (1 - gg[j] * gg[j]);                                       \
            dzo[j] = dh[j] * tc * go[j] * (1 - go[j]);                                        \
            dc[j] = dct * gf[j];                                                              \
            h_raw[j] = go[j] * tc;                                                            \
        }                                                                                     \
    }
    LF_CELL_BACK(float, f32, tanhf)
    LF_CELL_BACK(double, f64, tanh)
    """
    void lf_cell_back_f32(Py_ssize_t, const float*, float*, const float*, const float*,
                          const float*, float*, float*) noexcept nogil
    void lf_cell_back_f64(Py_ssize_t, const double*, double*, const double*, const double*,
                          const double*, double*, double*) noexcept nogil

cdef enum:
    GRAD_ROWS = 256       # rows of dx per GEMM item
    GRAD_COLS = 64        # output rows (of 4H or P) per weight-gradient item


ctypedef struct Back:
    Py_ssize_t seq_len, batch, input_size, hidden, proj, hidden_out, four_h, n_dirs, y_stride
    Py_ssize_t chunk, n_chunks
    const void* w_hh
    const void* w_hr
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


cdef void _back_chunk(Py_ssize_t item, const Back* K, floating* scratch) noexcept nogil:
    """One (chunk, direction) item through all of its steps, last first."""
    cdef Py_ssize_t d = item % K.n_dirs
    cdef Py_ssize_t start = (item // K.n_dirs) * K.chunk
    cdef Py_ssize_t rows = K.chunk if start + K.chunk <= K.batch else K.batch - start
    cdef const Py_ssize_t* order = K.order + start
    cdef Py_ssize_t H = K.hidden, H_out = K.hidden_out, P = K.proj, four_h = K.four_h
    cdef Py_ssize_t B = K.batch, T = K.seq_len
    # scratch: dh (chunk, H_out) | dc (chunk, H) | dz rows (chunk, 4H) | dh_raw (chunk, H)
    cdef floating* dh = scratch
    cdef floating* dc = dh + K.chunk * H_out
    cdef floating* dz_rows = dc + K.chunk * H
    cdef floating* dh_raw = dz_rows + K.chunk * four_h
    cdef const floating* w_hh = (<const floating*> K.w_hh) + d * four_h * H_out
    cdef const floating* w_hr = (<const floating*> K.w_hr) + d * P * H
    cdef const floating* gates = <const floating*> K.gates
    cdef const floating* cs = <const floating*> K.cs
    cdef const floating* y = <const floating*> K.y
    cdef const floating* grad_y = <const floating*> K.grad_y
    cdef floating* dz_all = <floating*> K.dz
    cdef floating* h_prev_all = <floating*> K.h_prev
    cdef floating* h_raw_all = <floating*> K.h_raw
    cdef floating* dhp_all = <floating*> K.dh_proj
    cdef bint rev = K.reverse[d] != 0
    cdef Py_ssize_t r, b, s, t, t_prev, L_b, n_active, at, j
    cdef Py_ssize_t max_len = K.lengths[order[0]]
    cdef const floating* c_prev
    cdef const floating* h_prev_row
    cdef floating* dh_row
    cdef floating* raw_row

    for r in range(rows):
        b = order[r]
        memcpy(dh + r * H_out, (<const floating*> K.grad_hn) + (d * B + b) * H_out, H_out * sizeof(floating))
        memcpy(dc + r * H, (<const floating*> K.grad_cn) + (d * B + b) * H, H * sizeof(floating))

    for s in range(max_len - 1, -1, -1):
        n_active = rows
        while n_active > 0 and K.lengths[order[n_active - 1]] <= s:
            n_active -= 1
        for r in range(n_active):
            b = order[r]
            L_b = K.lengths[b]
            t = L_b - 1 - s if rev else s
            at = (d * T + t) * B + b
            # dh += dL/dy at this step
            dh_row = dh + r * H_out
            for j in range(H_out):
                dh_row[j] = dh_row[j] + grad_y[(t * B + b) * K.y_stride + d * H_out + j]
            # the previous step of this row: t-1 forward, t+1 backward; the initial state first
            if s == 0:
                c_prev = (<const floating*> K.c0) + (d * B + b) * H
                h_prev_row = (<const floating*> K.h0) + (d * B + b) * H_out
            else:
                t_prev = t + 1 if rev else t - 1
                c_prev = cs + ((d * T + t_prev) * B + b) * H
                h_prev_row = y + (t_prev * B + b) * K.y_stride + d * H_out
            memcpy(h_prev_all + at * H_out, h_prev_row, H_out * sizeof(floating))
            if P > 0:
                memcpy(dhp_all + at * P, dh_row, P * sizeof(floating))
        if P > 0:
            # the gradient of h_raw = o*tanh(c): dh_raw = dh @ W_hr
            if n_active == 1:
                gemv_rm(c'T', <int> P, <int> H, <floating> 1, w_hr, <int> H, dh, <floating> 0, dh_raw)
            elif n_active > 1:
                gemm_rm(c'N', <int> n_active, <int> H, <int> P, <floating> 1, dh, <int> P,
                        w_hr, <int> H, <floating> 0, dh_raw, <int> H)
        for r in range(n_active):
            b = order[r]
            L_b = K.lengths[b]
            t = L_b - 1 - s if rev else s
            at = (d * T + t) * B + b
            if s == 0:
                c_prev = (<const floating*> K.c0) + (d * B + b) * H
            else:
                t_prev = t + 1 if rev else t - 1
                c_prev = cs + ((d * T + t_prev) * B + b) * H
            raw_row = h_raw_all + at * H if P > 0 else dz_rows   # dz_rows: a throwaway target
            if floating is float:
                lf_cell_back_f32(H, (dh_raw + r * H) if P > 0 else (dh + r * H_out), dc + r * H,
                                 gates + at * four_h, cs + at * H, c_prev, dz_all + at * four_h,
                                 raw_row if P > 0 else (dh_raw + r * H))
            else:
                lf_cell_back_f64(H, (dh_raw + r * H) if P > 0 else (dh + r * H_out), dc + r * H,
                                 gates + at * four_h, cs + at * H, c_prev, dz_all + at * four_h,
                                 raw_row if P > 0 else (dh_raw + r * H))
            memcpy(dz_rows + r * four_h, dz_all + at * four_h, four_h * sizeof(floating))
        # dh_prev = dz @ W_hh  (W_hh stored (4H, H_out))
        if n_active == 1:
            gemv_rm(c'T', <int> four_h, <int> H_out, <floating> 1, w_hh, <int> H_out, dz_rows,
                    <floating> 0, dh)
        elif n_active > 1:
            gemm_rm(c'N', <int> n_active, <int> H_out, <int> four_h, <floating> 1, dz_rows,
                    <int> four_h, w_hh, <int> H_out, <floating> 0, dh, <int> H_out)

    for r in range(rows):
        b = order[r]
        memcpy((<floating*> K.grad_h0) + (d * B + b) * H_out, dh + r * H_out, H_out * sizeof(floating))
        memcpy((<floating*> K.grad_c0) + (d * B + b) * H, dc + r * H, H * sizeof(floating))


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
        row0 = k * GRAD_COLS
        n_rows = GRAD_COLS if row0 + GRAD_COLS <= K.four_h else K.four_h - row0
        # dW_ih[rows] = dz[:, rows].T @ x ; dW_hh[rows] = dz[:, rows].T @ h_prev
        gemm_rm_tn(<int> n_rows, <int> K.input_size, <int> TB, <floating> 1, dz + row0,
                   <int> K.four_h, x, <int> K.input_size, <floating> 0,
                   g_w_ih + (d * K.four_h + row0) * K.input_size, <int> K.input_size)
        gemm_rm_tn(<int> n_rows, <int> K.hidden_out, <int> TB, <floating> 1, dz + row0,
                   <int> K.four_h, (<const floating*> K.h_prev) + d * TB * K.hidden_out,
                   <int> K.hidden_out, <floating> 0,
                   g_w_hh + (d * K.four_h + row0) * K.hidden_out, <int> K.hidden_out)
        # db[rows] = sum of dz over all rows, in row order
        for j in range(row0, row0 + n_rows):
            g_bias[d * K.four_h + j] = 0
        for q in range(TB):
            for j in range(row0, row0 + n_rows):
                g_bias[d * K.four_h + j] += dz[q * K.four_h + j]
    else:
        row0 = (k - n_gate_blocks) * GRAD_COLS
        n_rows = GRAD_COLS if row0 + GRAD_COLS <= K.proj else K.proj - row0
        # dW_hr[rows] = dh_proj[:, rows].T @ h_raw
        gemm_rm_tn(<int> n_rows, <int> K.hidden, <int> TB, <floating> 1,
                   (<const floating*> K.dh_proj) + d * TB * K.proj + row0, <int> K.proj,
                   (<const floating*> K.h_raw) + d * TB * K.hidden, <int> K.hidden, <floating> 0,
                   g_w_hr + (d * K.proj + row0) * K.hidden, <int> K.hidden)


cdef void _input_grad_item(Py_ssize_t item, const Back* K, const floating* w_ih,
                           floating* g_x) noexcept nogil:
    # dx[rows] = sum_d dz[d, rows] @ W_ih[d]   (directions added in order 0, 1)
    cdef Py_ssize_t TB = K.seq_len * K.batch
    cdef Py_ssize_t row0 = item * GRAD_ROWS
    cdef Py_ssize_t n_rows = GRAD_ROWS if row0 + GRAD_ROWS <= TB else TB - row0
    cdef Py_ssize_t d
    for d in range(K.n_dirs):
        gemm_rm(c'N', <int> n_rows, <int> K.input_size, <int> K.four_h, <floating> 1,
                (<const floating*> K.dz) + (d * TB + row0) * K.four_h, <int> K.four_h,
                w_ih + d * K.four_h * K.input_size, <int> K.input_size,
                <floating> (0 if d == 0 else 1), g_x + row0 * K.input_size, <int> K.input_size)


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
                   int n_threads):
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
    # same chunking rule as the forward's chunked mode (a function of the batch size only)
    K.chunk = (K.batch + 3) // 4
    K.chunk = 8 if K.chunk < 8 else (64 if K.chunk > 64 else K.chunk)
    K.chunk = K.batch if K.chunk > K.batch else K.chunk
    K.n_chunks = (K.batch + K.chunk - 1) // K.chunk
    cdef Py_ssize_t D = K.n_dirs, TB = K.seq_len * K.batch
    cdef Py_ssize_t H = K.hidden, P = K.proj
    cdef floating* dz = <floating*> calloc(D * TB * K.four_h, sizeof(floating))
    cdef floating* h_prev = <floating*> calloc(D * TB * K.hidden_out, sizeof(floating))
    cdef floating* h_raw = <floating*> calloc(D * TB * H if P > 0 else 1, sizeof(floating))
    cdef floating* dh_proj = <floating*> calloc(D * TB * P if P > 0 else 1, sizeof(floating))
    if dz == NULL or h_prev == NULL or h_raw == NULL or dh_proj == NULL:
        free(dz); free(h_prev); free(h_raw); free(dh_proj)
        raise MemoryError(f"cannot allocate the backward workspace ({D} x {TB} x {K.four_h} values)")
    K.w_hh = &w_hh[0, 0, 0]
    K.w_hr = &w_hr[0, 0, 0] if P > 0 else NULL
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
    cdef Py_ssize_t n_items = K.n_chunks * D
    cdef Py_ssize_t n_gate_blocks = (K.four_h + GRAD_COLS - 1) // GRAD_COLS
    cdef Py_ssize_t n_proj_blocks = (P + GRAD_COLS - 1) // GRAD_COLS
    cdef Py_ssize_t n_weight_items = D * (n_gate_blocks + n_proj_blocks)
    cdef Py_ssize_t n_x_items = (TB + GRAD_ROWS - 1) // GRAD_ROWS
    cdef Py_ssize_t scratch_len = K.chunk * (K.hidden_out + 2 * H + K.four_h)
    cdef floating* scratch = NULL
    cdef Py_ssize_t item
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    # threads only where there is work for them (the bits never depend on the count)
    cdef double rec_flops = 4.0 * D * TB * K.four_h * K.hidden_out
    cdef double grad_flops = 2.0 * D * TB * K.four_h * (K.input_size + K.hidden_out) * 2
    cdef int threads_rec = <int> min(n_threads, n_items, max(1.0, rec_flops / 200000))
    cdef int threads_grad = <int> min(n_threads, n_weight_items, max(1.0, grad_flops / 200000))

    with nogil:
        if threads_rec <= 1:
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
        if not failed:
            if threads_grad <= 1:
                for item in range(n_weight_items):
                    _weight_grad_item(item, &K, x_ptr, w_ih_ptr, g_w_ih, g_w_hh, g_bias, g_w_hr,
                                      n_gate_blocks, n_proj_blocks)
                for item in range(n_x_items):
                    _input_grad_item(item, &K, w_ih_ptr, g_x)
            else:
                for item in prange(n_weight_items, num_threads=threads_grad, schedule='dynamic'):
                    _weight_grad_item(item, &K, x_ptr, w_ih_ptr, g_w_ih, g_w_hh, g_bias, g_w_hr,
                                      n_gate_blocks, n_proj_blocks)
                for item in prange(n_x_items, num_threads=threads_grad, schedule='static'):
                    _input_grad_item(item, &K, w_ih_ptr, g_x)
        free(dz)
        free(h_prev)
        free(h_raw)
        free(dh_proj)
    if failed:
        raise MemoryError("cannot allocate the per-thread scratch of the backward recurrence")
