"""Sequence forward of one LSTM layer, all of its directions in one call.

IN/OUT rules: every array is C-contiguous and of one dtype (float32 or float64); the Python layer
(lstm_fast/_lstm.py) has checked shapes, lengths (0..T) and sizes (< 2**31 per BLAS dimension).
Gate blocks follow torch's order [i | f | g | o] along the 4H axis.

How the work is split (chosen by measurement, see README "Design"):
1. Input projection of every time step, gx[d] = x @ W_ih[d].T, as one GEMM per block of about
   PROJ_ROWS rows of the (T*B, I) input (and PROJ_COLS gate columns with the packed kernel);
   blocks of all directions are spread over the threads. Skipped when the chunked recurrence
   projects each step's rows itself (fused, below), and at batch 1 when W_hh (a thread's share)
   is beyond L1 or that work fits in the part of each step that streams W_hh from L2: each
   step's W_hh product then projects part of the next steps' inputs in its idle FMA slots
   (_gates_interleaved).
2. The recurrence, in one of three modes:
   - chunked: work items are (batch chunk, direction); with the packed kernel one chunk per
     thread, at least two (packed_chunk), else quarters of the batch. Each OpenMP thread takes an item and runs
     its rows through all time steps with its own single-threaded products: no barrier per step,
     and both directions of a bidirectional layer run at the same time. Fused (packed kernel,
     chunks of >= 8 rows, W_ih + W_hh <= FUSED_MAX_BYTES): each step first projects its rows'
     inputs, with the same sums, while they are in cache.
   - wide (W_hh beyond what a chunk per pass can stream well): every step does one product per
     direction over the whole batch, its gate columns split in fixed blocks over the threads,
     then the cell update split by rows.
   - split (packed kernel, batch < 8, one direction, more than one thread): every thread owns
     whole 32-unit panels of the hidden units, packs their weights and computes their gates and
     cell update; one spin barrier per step. Auto mode runs it or the one-thread mode, whichever
     was measured faster for the shape (lf_split_choose in lf_split.h).
   Rows are visited longest first (`order`), so at step s the rows still running are a prefix:
   finished sequences cost no work, and the reverse direction starts each row at its own last step.
Every block size depends on the shapes only, never on the thread count, so every thread count
computes the same operations on the same operands: the results are bitwise identical.
"""
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.pyport cimport PY_SSIZE_T_MAX

from _blas cimport gemm_rm, gemv_rm
from _pgemm cimport (lf_malloc64, lf_ws_get, lf_ws_max, lf_ws_release, lf_ws_aligned, lf_pack_len, lf_pack_w, lf_pack_w_for, lf_pgemm_available, lf_pgemm, lf_set_kernel, lf_isa,
                     lf_pgemv, lf_pgemv_dir, lf_pgemv_gates, lf_pgemv_gates_tiles, lf_prefetch)
from _split cimport (lf_barrier, lf_barrier_init, lf_team_size, lf_team_unit_begin,
                     lf_team_unit_end, lf_barrier_wait, lf_ticks, lf_split_choose,
                     lf_split_record, lf_split_key, lf_split_ended, lf_split_budget,
                     lf_load_long, lf_store_long, lf_team_rank, LF_SPLIT_ABORT_LAG,
                     lf_team_arrive, lf_team_arrived, lf_team_open, lf_team_wait_open)
from _gates cimport (CellSpec, cell_row_standard, cell_row_cached, cell_row_general, sigmoid,
                     tanh_, activate, lf_matvec_t_f32, lf_matvec_t_f64, lf_cell_units_simd)

import numpy as np

from lstm_fast._aligned import zeros as aligned_zeros
cimport numpy as cnp

cnp.import_array()

cdef enum:
    # Rows of the (T*B, I) input per projection GEMM: big enough for BLAS to run near peak,
    # small enough to spread over threads.
    PROJ_ROWS = 256
    # Gate columns per projection item with the packed kernel (4 panels), whose bits do not depend
    # on the split: batch-1 inputs (T*B < PROJ_ROWS) still give every thread a share.
    PROJ_COLS = 128
    # Fused per-step projection up to this size of W_ih + W_hh (bytes). Measured (Zen 4, 32 MB L3,
    # 1 thread): (100,256,64,64) 23.6 -> 20.2 ms, (50,64,512,512) (8 MB) 133 -> 126 ms, but
    # (25,128,1024,1024) (32 MB) 575 -> 619 ms.
    # FUSED_MAX_BYTES: a module variable (below), derived from the CPU
    # Wide mode from this W_hh size (bytes) for batches > 1, and for a single row from WIDE_GEMV_BYTES
    # (its gemv is memory-bound: splitting W_hh's rows over threads adds bandwidth).
    # WIDE_MIN_BYTES: a module variable (below), derived from the CPU
    # WIDE_GEMV_BYTES: a module variable (below), derived from the CPU
    # With the packed kernel, wide mode only for a single work item from this W_hh size
    # PACKED_WIDE_BYTES: a module variable (below), derived from the CPU
    # ... and always from this size, where each chunk's pass over W_hh comes from L3 or memory:
    # one pass per step over all rows ((25,128,1024,1024): 553 vs 568 ms on one thread)
    # PACKED_WIDE_MAX_BYTES: a module variable (below), derived from the CPU
    # Split mode (batch < 8, one direction) from this hidden size (split_mode_ok)
    SPLIT_MIN_HIDDEN = 64
    # Batch-1 steps project the inputs of later steps in blocks of this many (one 8-row tile of
    # lf_pgemm, _gates_interleaved), where a thread's share of W_hh is at least INTERLEAVE_MIN_BYTES,
    # or where the tile work fits in the groups after a step's first (_tiles_from_group).
    # Measured (1 thread, up-front -> interleaved): H=128 (256 KB) 0.42 -> 0.35 ms, H=96 1.11x,
    # H=64 (64 KB) 1.00x with tiles from the first group; 2 threads (split): H=128 (128 KB a
    # thread) 1.08x, H=96 1.04x, H=64 (32 KB, in L1) 0.91x.
    INTERLEAVE_ROWS = 8
    # INTERLEAVE_MIN_BYTES: a module variable (below), derived from the CPU
    # Wide mode: gate columns and rows per work item of a step.
    WIDE_COL_BLOCKS = 8
    WIDE_ROWS = 8
    # Below this many flops per thread, waking OpenMP threads costs more than it saves (a
    # sleeping libgomp worker takes tens of microseconds to wake). The thread count never changes
    # the bits, so it may follow the size of the work.
    MIN_FLOPS_PER_THREAD = 200000
    # Below this many flops a call (a layer's forward or backward) runs on all its threads or on
    # one, whichever was measured faster for its shape (lf_split_choose): its parallel regions
    # are short, so waking the workers (OpenMP's short spin, see lstm_fast/_ompwait.py) or a
    # core taken by another process costs more than the split saves. LSTM(1,32), batch 32,
    # T=30 (8 MFLOP a forward) on the AMX Xeon, idle: forward_train + backward 0.57 ms on two
    # threads against 0.43 on one. Above it two threads win clearly ((100,16,128,128): 419 MFLOP).
    SMALL_CALL_FLOPS = 64000000
    # Packed weights of this many floats and more are packed by all threads ((25,128,1024,1024),
    # 8M floats: a few ms of a call, serial before)
    PACK_PARALLEL_FLOATS = 1 << 20

# Sizes derived from the CPU (lstm_fast/_cpu.py derive(): L1d, L2, L3, FMA units), set once at
# import by _set_kernel; the values beside them are the Zen 4 ones they were measured as, which
# derive() gives for a Zen 4 description. Functions of the CPU only: every thread count makes
# the same choices.
cdef Py_ssize_t FUSED_MAX_BYTES = 8 * 1024 * 1024         # L3 / 4
cdef Py_ssize_t WIDE_MIN_BYTES = 128 * 1024               # L2 / 8
cdef Py_ssize_t WIDE_GEMV_BYTES = 2 * 1024 * 1024         # 2 x L2
cdef Py_ssize_t PACKED_WIDE_BYTES = 512 * 1024            # L2 / 2
cdef Py_ssize_t PACKED_WIDE_MAX_BYTES = 8 * 1024 * 1024   # L3 / 4
cdef Py_ssize_t INTERLEAVE_MIN_BYTES = 96 * 1024          # 3 x L1d
cdef Py_ssize_t WIDE_FUSED_MAX_BYTES = 4 * 1024 * 1024    # 4 x L2 (never reached on Zen 4: batches
                                                          # of 9+ go wide from 8 MB of W_hh alone)


def _set_kernel(int isa, dict params):
    """Sets the kernel path (0 generic, 1 AVX2, 2 AVX-512; capped at what the CPU has) and the
    derived parameters (lstm_fast._cpu.derive); called at import and by lstm_fast._cpu._set_isa.
    Not thread-safe: no call may be running."""
    global FUSED_MAX_BYTES, WIDE_MIN_BYTES, WIDE_GEMV_BYTES, PACKED_WIDE_BYTES
    global PACKED_WIDE_MAX_BYTES, INTERLEAVE_MIN_BYTES, WIDE_FUSED_MAX_BYTES
    FUSED_MAX_BYTES = params["fused_max_bytes"]
    WIDE_MIN_BYTES = params["wide_min_bytes"]
    WIDE_GEMV_BYTES = params["wide_gemv_bytes"]
    PACKED_WIDE_BYTES = params["packed_wide_bytes"]
    PACKED_WIDE_MAX_BYTES = params["packed_wide_max_bytes"]
    INTERLEAVE_MIN_BYTES = params["interleave_min_bytes"]
    WIDE_FUSED_MAX_BYTES = params["wide_fused_max_bytes"]
    return lf_set_kernel(isa, params["tile_rows"], params["kc"], params["kc_narrow"])


def workspace_max_bytes():
    """Bytes a work-buffer slot keeps per thread between calls (LSTM_FAST_WORKSPACE_MB, read
    once; 256 MB by default): larger buffers are allocated and freed by every call."""
    return lf_ws_max()


def kernel_settings():
    """The path and parameters this module runs with (for show_config and tests)."""
    return dict(isa=("generic", "avx2", "avx512")[lf_isa()], fused_max_bytes=FUSED_MAX_BYTES,
                wide_min_bytes=WIDE_MIN_BYTES, wide_gemv_bytes=WIDE_GEMV_BYTES,
                packed_wide_bytes=PACKED_WIDE_BYTES, packed_wide_max_bytes=PACKED_WIDE_MAX_BYTES,
                interleave_min_bytes=INTERLEAVE_MIN_BYTES, wide_fused_max_bytes=WIDE_FUSED_MAX_BYTES)


cdef enum:
    # work-buffer slots (lf_ws_get): kept per thread from call to call
    WS_PACKED = 0
    WS_GX = 1

cdef enum:
    MODE_AUTO = 0
    MODE_CHUNKED = 1
    MODE_WIDE = 2
    MODE_SPLIT = 3


ctypedef struct Layer:
    Py_ssize_t seq_len, batch, input_size, hidden, proj, hidden_out, four_h, n_dirs, y_stride
    Py_ssize_t chunk, n_chunks                 # chunked mode
    Py_ssize_t col_block, n_col_blocks         # wide mode: gate columns per GEMM item
    Py_ssize_t proj_block, n_proj_blocks       # wide mode: projection columns per item
    Py_ssize_t proj_rows                       # input rows per projection item
    int keep_cache
    CellSpec spec
    # arrays, typed by the caller's `floating`
    const void* gx               # (D, T*B, 4H) projected inputs, or NULL when fused (below)
    const void* x                # (T, B, I) layer input
    int fused                    # packed, chunked or wide: each step projects its own rows' inputs
    int interleave               # packed, batch 1: steps project later steps' inputs
    const void* w_ih
    const void* w_hh
    const void* w_hh_t           # (D, H_out, 4H) transposed W_hh for batch-1 steps, or NULL
    # float32 weights packed for lf_pgemm (one block of pk_*_len floats per direction), or NULL;
    # in split mode each thread packs its own units' panels of W_hh (and W_ih when interleaved)
    int split_packs
    const float* pk_ih
    const float* pk_hh
    const float* pk_hr
    size_t pk_ih_len, pk_hh_len, pk_hr_len
    Py_ssize_t gx_itemsize
    const void* bias
    const void* w_hr
    const void* peephole
    const Py_ssize_t* order
    const Py_ssize_t* lengths
    const int* reverse
    void* h
    void* c
    void* y
    void* cache_gates
    void* cache_c


# 1: float32 products run through lf_pgemm where the CPU has it; 0: BLAS only (tests, benchmarks)
cdef int _packed_enabled = 1


def set_packed_gemm(bint enabled):
    """Turn the packed float32 GEMM kernel on or off (for tests and A/B benchmarks; not thread-safe)."""
    global _packed_enabled
    _packed_enabled = 1 if enabled else 0


cdef int _interleave_enabled = 1


def set_interleaved_projection(bint enabled):
    """Turn the batch-1 interleaved input projection (_gates_interleaved) on or off; off projects
    every input up front (same bits; for tests and A/B benchmarks; not thread-safe)."""
    global _interleave_enabled
    _interleave_enabled = 1 if enabled else 0


cdef long _split_budget_forced = 0
cdef long _split_alone_forced = 0


def set_split_alone(long steps):
    """Make every split-mode call run its first `steps` steps on the calling thread alone, as
    when the other threads are slow to wake (0: until they have all arrived; for tests; not
    thread-safe)."""
    global _split_alone_forced
    _split_alone_forced = steps


def set_split_budget(long ticks):
    """Give every split-mode call a budget of `ticks` a step (0: the measured one; for tests:
    1 stops split mode after its first step; not thread-safe)."""
    global _split_budget_forced
    _split_budget_forced = ticks


def packed_gemm_active():
    """True when float32 forward products run through the packed kernels (lf_pgemm.h: AVX-512,
    or AVX2 + FMA; lstm_fast._cpu.isa() says which)."""
    return bool(_packed_enabled and lf_pgemm_available())


cdef inline int threads_for(int n_threads, Py_ssize_t items, double flops) noexcept nogil:
    # as many threads as there are items and enough work for, at most n_threads
    cdef double by_work = flops / MIN_FLOPS_PER_THREAD
    cdef Py_ssize_t n = n_threads
    if items < n:
        n = items
    if by_work < n:
        n = <Py_ssize_t> by_work
    return <int> (n if n > 1 else 1)


cpdef Py_ssize_t batch_chunk(Py_ssize_t batch) noexcept nogil:
    """Rows per work item of the chunked recurrence: a function of the batch size only.

    Large enough for an efficient GEMM (M >= 8), small enough that batches of 16 and more give at
    least two items to share between threads.
    """
    return _chunk_rows((batch + 3) // 4, batch)


cdef inline Py_ssize_t _chunk_rows(Py_ssize_t chunk, Py_ssize_t batch) noexcept nogil:
    # a chunk of 8 to 64 rows, never more than the batch
    if chunk < 8:
        chunk = 8
    if chunk > 64:
        chunk = 64
    return batch if chunk > batch else chunk


cpdef Py_ssize_t packed_chunk(Py_ssize_t batch, int n_threads) noexcept nogil:
    """Rows per work item of the chunked recurrence on the packed kernel, where every row's
    outputs are the same FMA chains in any chunk, so the chunk may follow the thread count: one
    item per thread, at least two (one on the AVX2 path's single thread: (100,16,128,128) 0.895x
    and (100,64,256,256,2) 0.951x the time there, Xeon 6/207), 8 to 64 rows in multiples of 8.
    Fewer, larger chunks than batch_chunk's quarters stream the weights from L2 fewer times a step and leave fewer short
    edge tiles (16 rows are a 12-row tile and a 4-row one). Xeon 6/207, (100,64,256,256,2), min
    of 8 rounds: 1 thread 94.4 -> 90.9 ms, 2 threads 51.8 -> 46.7 ms with 32-row chunks."""
    cdef Py_ssize_t items = n_threads if n_threads > 2 else 2
    if lf_isa() == 1 and n_threads <= 1:
        # AVX2's 6-row tile: half-batches of 8 rows are a 6-row tile and a 2-row one, whose 4
        # FMA chains wait on the FMA latency; one chunk of 16 rows is 6 + 6 + 4 (with two
        # threads the halves run side by side, and 12 + 4 would leave one thread waiting)
        items = 1
    return _chunk_rows(((batch + items - 1) // items + 7) // 8 * 8, batch)


cdef inline Py_ssize_t _n_active(const Layer* L, Py_ssize_t start, Py_ssize_t rows, Py_ssize_t s) noexcept nogil:
    # rows are sorted longest first: those still running at step s are a prefix
    while rows > 0 and L.lengths[L.order[start + rows - 1]] <= s:
        rows -= 1
    return rows


cdef inline void _gates_product(Py_ssize_t rows, Py_ssize_t d, Py_ssize_t col0, Py_ssize_t n_cols,
                                const Layer* L, const floating* h_prev, floating* gh,
                                int backwards=0) noexcept nogil:
    # gh[:, col0:col0+n_cols] = h_prev @ W_hh[d, cols].T, gh (column 0) with leading dimension 4H.
    # One row is a matrix-vector product, where gemv runs several times faster than gemm.
    cdef const floating* w_hh_rows = (<const floating*> L.w_hh) + (d * L.four_h + col0) * L.hidden_out
    if floating is float:
        if L.pk_hh != NULL:
            if rows == 1:
                lf_pgemv_dir(col0, n_cols, L.hidden_out, h_prev, L.pk_hh + d * L.pk_hh_len, gh,
                             backwards)
            else:
                lf_pgemm(rows, col0, n_cols, L.hidden_out, h_prev, L.hidden_out,
                         L.pk_hh + d * L.pk_hh_len, gh, L.four_h, 0)
            return
    gh = gh + col0
    if rows == 1:
        gemv_rm(c'N', <int> n_cols, <int> L.hidden_out, <floating> 1, w_hh_rows,
                <int> L.hidden_out, h_prev, <floating> 0, gh)
    else:
        gemm_rm(c'T', <int> rows, <int> n_cols, <int> L.hidden_out, <floating> 1, h_prev,
                <int> L.hidden_out, w_hh_rows, <int> L.hidden_out, <floating> 0, gh,
                <int> L.four_h)


cdef inline void _proj_product(Py_ssize_t rows, Py_ssize_t d, Py_ssize_t col0, Py_ssize_t n_cols,
                               const Layer* L, const floating* h_raw, floating* h_out) noexcept nogil:
    # h[:, col0:col0+n_cols] = h_raw @ W_hr[d, cols].T  (LSTMP), h (column 0) with leading dimension P
    cdef const floating* w_hr_rows = (<const floating*> L.w_hr) + (d * L.proj + col0) * L.hidden
    if floating is float:
        if L.pk_hr != NULL:
            if rows == 1:
                lf_pgemv(col0, n_cols, L.hidden, h_raw, L.pk_hr + d * L.pk_hr_len, h_out)
            else:
                lf_pgemm(rows, col0, n_cols, L.hidden, h_raw, L.hidden,
                         L.pk_hr + d * L.pk_hr_len, h_out, L.proj, 0)
            return
    h_out = h_out + col0
    if rows == 1:
        gemv_rm(c'N', <int> n_cols, <int> L.hidden, <floating> 1, w_hr_rows, <int> L.hidden,
                h_raw, <floating> 0, h_out)
    else:
        gemm_rm(c'T', <int> rows, <int> n_cols, <int> L.hidden, <floating> 1, h_raw,
                <int> L.hidden, w_hr_rows, <int> L.hidden, <floating> 0, h_out, <int> L.proj)


cdef inline Py_ssize_t _time_of(const Layer* L, Py_ssize_t d, Py_ssize_t b, Py_ssize_t s) noexcept nogil:
    # the real time index of step s of row b: backwards from its own last step when reversed
    return L.lengths[b] - 1 - s if L.reverse[d] else s


cdef void _cell_rows(const Layer* L, Py_ssize_t d, Py_ssize_t s, const Py_ssize_t* order,
                     Py_ssize_t r0, Py_ssize_t r1, const floating* gh, const floating* gx_rows,
                     floating* cs, floating* h_dst) noexcept nogil:
    """Cell update of rows r0..r1 (positions in `order`) at step s of direction d.

    gh (rows, 4H), cs (rows, H) and h_dst (rows, H, or H_out without projection) are indexed by
    position; h_dst receives o*tanh(c), which is also the output row when there is no projection.
    gx_rows (rows, 4H) holds the step's projected inputs by position, or is NULL: read L.gx.
    """
    cdef Py_ssize_t H = L.hidden, four_h = L.four_h, B = L.batch, T = L.seq_len
    cdef const floating* gx_all = <const floating*> L.gx
    cdef const floating* bias = (<const floating*> L.bias) + d * four_h
    cdef const floating* peep = <const floating*> L.peephole
    cdef floating* y = <floating*> L.y
    cdef Py_ssize_t h_ld = H if L.proj > 0 else L.hidden_out
    cdef Py_ssize_t r, b, t, at
    cdef floating* h_row
    cdef const floating* gx_row
    if L.spec.has_peephole:
        peep = peep + d * 3 * H
    for r in range(r0, r1):
        b = order[r]
        t = _time_of(L, d, b, s)
        at = (d * T + t) * B + b
        h_row = h_dst + r * h_ld
        gx_row = gx_rows + r * four_h if gx_rows != NULL else gx_all + at * four_h
        if L.spec.standard:
            if L.keep_cache:
                cell_row_cached(H, gh + r * four_h, gx_row, bias, cs + r * H, h_row,
                                (<floating*> L.cache_gates) + at * four_h,
                                (<floating*> L.cache_c) + at * H)
            else:
                cell_row_standard(H, gh + r * four_h, gx_row, bias, cs + r * H, h_row)
        else:
            cell_row_general(&L.spec, H, gh + r * four_h, gx_row, bias, peep,
                             cs + r * H, h_row)
        if L.proj == 0:
            memcpy(y + (t * B + b) * L.y_stride + d * L.hidden_out, h_row, H * sizeof(floating))


cdef void _copy_out_cols(const Layer* L, Py_ssize_t d, Py_ssize_t s, const Py_ssize_t* order,
                         Py_ssize_t rows, Py_ssize_t col0, Py_ssize_t n_cols,
                         const floating* hs) noexcept nogil:
    # y[t_b, b, d*H_out + cols] = h[r, cols] for the running rows (after a projection)
    cdef floating* y = <floating*> L.y
    cdef Py_ssize_t r, b
    for r in range(rows):
        b = order[r]
        memcpy(y + (_time_of(L, d, b, s) * L.batch + b) * L.y_stride + d * L.hidden_out + col0,
               hs + r * L.hidden_out + col0, n_cols * sizeof(floating))


cdef void _gather_state(const Layer* L, Py_ssize_t d, const Py_ssize_t* order, Py_ssize_t rows,
                        floating* hs, floating* cs, bint back) noexcept nogil:
    # state rows in `order` <-> the (D, B, .) state arrays (back: scatter the final state)
    cdef floating* h = <floating*> L.h
    cdef floating* c = <floating*> L.c
    cdef Py_ssize_t r, b, H = L.hidden, H_out = L.hidden_out
    for r in range(rows):
        b = order[r]
        if back:
            memcpy(h + (d * L.batch + b) * H_out, hs + r * H_out, H_out * sizeof(floating))
            memcpy(c + (d * L.batch + b) * H, cs + r * H, H * sizeof(floating))
        else:
            memcpy(hs + r * H_out, h + (d * L.batch + b) * H_out, H_out * sizeof(floating))
            memcpy(cs + r * H, c + (d * L.batch + b) * H, H * sizeof(floating))


cdef inline Py_ssize_t H_out_of(const Layer* L) noexcept nogil:
    return L.hidden_out


cdef inline void _prefetch_gx(const Layer* L, Py_ssize_t d, Py_ssize_t s, const Py_ssize_t* order,
                              Py_ssize_t rows) noexcept nogil:
    # the cell update reads each row's projected input (4H values of a T*B*4H buffer that is
    # far larger than the caches): ask for them now, while the step's product runs
    cdef Py_ssize_t r, b
    for r in range(rows):
        b = order[r]
        lf_prefetch((<const char*> L.gx) + ((d * L.seq_len + _time_of(L, d, b, s)) * L.batch + b)
                    * L.four_h * L.gx_itemsize, L.four_h * L.gx_itemsize)


cdef bint _x_in_place(const Layer* L, const Py_ssize_t* order, Py_ssize_t rows) noexcept nogil:
    # rows of consecutive batch indices and one length: their inputs of a step are one block of x
    cdef Py_ssize_t r
    for r in range(1, rows):
        if order[r] != order[0] + r or L.lengths[order[r]] != L.lengths[order[0]]:
            return False
    return True


cdef void _gather_x(const Layer* L, Py_ssize_t d, Py_ssize_t s, const Py_ssize_t* order,
                    Py_ssize_t r0, Py_ssize_t r1, float* xs) noexcept nogil:
    # x[t_r, b_r] of positions r0..r1 still running at step s, into xs (rows of I) by position
    cdef const float* x = <const float*> L.x
    cdef Py_ssize_t r, b, I = L.input_size
    for r in range(r0, r1):
        b = order[r]
        if L.lengths[b] > s:
            memcpy(xs + r * I, x + (_time_of(L, d, b, s) * L.batch + b) * I, I * sizeof(float))


cdef void _step_inputs(const Layer* L, Py_ssize_t d, Py_ssize_t s, const Py_ssize_t* order,
                       Py_ssize_t rows, bint x_contiguous, float* xs, float* gxs) noexcept nogil:
    # fused mode: gxs = x[t_r, b_r] @ W_ih[d].T for the running rows of a chunk at step s. The
    # products are the same FMA chains as the up-front projection's (same bits); they run while
    # the chunk's inputs and gates are in L1/L2 instead of a (T*B, 4H) buffer in memory.
    cdef const float* src
    cdef Py_ssize_t I = L.input_size
    if x_contiguous:
        src = (<const float*> L.x) + (_time_of(L, d, order[0], s) * L.batch + order[0]) * I
    else:
        _gather_x(L, d, s, order, 0, rows, xs)
        src = xs
    if rows == 1:
        lf_pgemv(0, L.four_h, I, src, L.pk_ih + d * L.pk_ih_len, gxs)
    else:
        lf_pgemm(rows, 0, L.four_h, I, src, I, L.pk_ih + d * L.pk_ih_len, gxs, L.four_h, 0)


cdef inline Py_ssize_t _block_time(const Layer* L, Py_ssize_t d, Py_ssize_t length, Py_ssize_t block,
                                    Py_ssize_t n) noexcept nogil:
    # first time index of the n steps block*INTERLEAVE_ROWS.. of a batch-1 sequence (times ascend
    # in memory either way; a reversed direction visits them from the top)
    return length - block * INTERLEAVE_ROWS - n if L.reverse[d] else block * INTERLEAVE_ROWS


cdef inline Py_ssize_t _tiles_from_group(Py_ssize_t units, Py_ssize_t k,
                                         Py_ssize_t input_size) noexcept nogil:
    # 1 when a step's tile k-steps (its largest share of the 4*units/32 gate panels, input_size
    # each) fit into every second row k-step of the groups after the first, whose products stream
    # W_hh from L2 (lf_pgemv_gates_tiles: the first is FMA-bound, partly in L1); else 0
    cdef Py_ssize_t n_groups = units // 32
    cdef Py_ssize_t per_step = (4 * n_groups + INTERLEAVE_ROWS - 1) // INTERLEAVE_ROWS * input_size
    return 1 if n_groups >= 2 and per_step <= (n_groups - 1) * (k // 2) else 0


cdef inline Py_ssize_t _next_block_time(const Layer* L, Py_ssize_t d, Py_ssize_t length,
                                        Py_ssize_t block) noexcept nogil:
    # the first time of the INTERLEAVE_ROWS rows whose inputs the steps of `block` project, or -1
    # when it is the last block
    if (block + 1) * INTERLEAVE_ROWS >= length:
        return -1
    if (block + 2) * INTERLEAVE_ROWS <= length:
        return _block_time(L, d, length, block + 1, INTERLEAVE_ROWS)
    # the next block is the short last one: the 8 steps that end with it (begin with it when
    # reversed), the others this block's own, projected again to the same bits
    return 0 if L.reverse[d] else length - INTERLEAVE_ROWS


cdef void _project_next_block(const Layer* L, Py_ssize_t d, Py_ssize_t s,
                              Py_ssize_t length) noexcept nogil:
    # Split mode changing hands at step s in the middle of a block (the team joining the first
    # thread, or the first thread going on alone past the budget): each way's steps project
    # their own panels of the next block's inputs (_gates_interleaved: an eighth of the thread's
    # panels a step, counted over its own units), so the steps before s in one way and from s in
    # the other leave some panels out, which then kept the last call's values (a wrong result:
    # (21,1,20,128), max error 0.04). Here the thread that goes on projects the whole next block
    # first: the same sums as the tiles (lf_pgemm), so the same bits, a few us once a call.
    cdef Py_ssize_t I = L.input_size, H = L.hidden, four_h = L.four_h, g
    cdef Py_ssize_t t0
    if not L.interleave or s % INTERLEAVE_ROWS == 0 or s >= length:
        return
    t0 = _next_block_time(L, d, length, s // INTERLEAVE_ROWS)
    if t0 < 0:
        return
    for g in range(4):
        lf_pgemm(INTERLEAVE_ROWS, g * H, H, I, (<const float*> L.x) + t0 * I, I,
                 L.pk_ih + d * L.pk_ih_len, (<float*> L.gx) + d * L.seq_len * four_h + t0 * four_h,
                 four_h, 0)


cdef void _gates_interleaved(const Layer* L, Py_ssize_t d, Py_ssize_t s, Py_ssize_t length,
                             Py_ssize_t u0, Py_ssize_t u1, const float* h_prev,
                             float* gh) noexcept nogil:
    # Batch 1 (L.interleave), units u0..u1 of step s: their four gate columns of gh = h_prev @ W_hh.T,
    # with the input projection of the same columns for the next block of INTERLEAVE_ROWS steps
    # done inside the same loop (lf_pgemv_gates_tiles), an eighth of its panels per step. The
    # first block is projected on its own at its start. Same sums, so same bits, as the up-front
    # projection.
    cdef Py_ssize_t I = L.input_size, H = L.hidden, four_h = L.four_h
    cdef float* gx = (<float*> L.gx) + d * L.seq_len * four_h
    cdef const float* x = <const float*> L.x
    cdef const float* pk_ih = L.pk_ih + d * L.pk_ih_len
    cdef const float* pk_hh = L.pk_hh + d * L.pk_hh_len
    cdef Py_ssize_t block = s // INTERLEAVE_ROWS, part = s % INTERLEAVE_ROWS
    cdef Py_ssize_t n = length - block * INTERLEAVE_ROWS
    cdef Py_ssize_t n_panels = 4 * (u1 - u0) // 32
    cdef Py_ssize_t t0, g
    if n > INTERLEAVE_ROWS:
        n = INTERLEAVE_ROWS
    if part == 0 and block == 0:
        t0 = _block_time(L, d, length, block, n)
        for g in range(4):
            lf_pgemm(n, g * H + u0, u1 - u0, I, x + t0 * I, I, pk_ih, gx + t0 * four_h, four_h, 0)
    t0 = _next_block_time(L, d, length, block)
    if t0 >= 0:
        lf_pgemv_gates_tiles(H, u0, u1, L.hidden_out, h_prev, pk_hh, gh, s & 1, I, x + t0 * I, I,
                             pk_ih, part * n_panels // INTERLEAVE_ROWS,
                             (part + 1) * n_panels // INTERLEAVE_ROWS, gx + t0 * four_h, four_h,
                             _tiles_from_group(u1 - u0, L.hidden_out, I), 0, I)
    else:
        lf_pgemv_gates(H, u0, u1, L.hidden_out, h_prev, pk_hh, gh, s & 1)


cdef void _run_row_interleaved(const Layer* L, Py_ssize_t d, float* scratch) noexcept nogil:
    # _run_chunk's loop for its commonest batch-1 case (interleaved projection, standard cell, no
    # projection, float32 on AVX-512): the same kernels on the same operands, so the same bits,
    # without the per-row bookkeeping of the general loop ((100,1,32,64): 88.4 -> 86.7 us, with
    # 64-byte aligned buffers)
    cdef Py_ssize_t H = L.hidden, four_h = L.four_h, T = L.seq_len
    cdef Py_ssize_t length = L.lengths[0], s, t
    cdef float* gh = scratch
    cdef float* hs = gh + four_h
    cdef float* cs = hs + H
    cdef const float* gx = (<const float*> L.gx) + d * T * four_h
    cdef const float* bias = (<const float*> L.bias) + d * four_h
    cdef float* y = (<float*> L.y) + d * H
    cdef float* cache_gates = (<float*> L.cache_gates) + d * T * four_h if L.keep_cache else NULL
    cdef float* cache_c = (<float*> L.cache_c) + d * T * H if L.keep_cache else NULL
    _gather_state(L, d, L.order, 1, hs, cs, False)
    for s in range(length):
        _gates_interleaved(L, d, s, length, 0, H, hs, gh)
        t = length - 1 - s if L.reverse[d] else s
        lf_cell_units_simd(H, 0, H, gh, gx + t * four_h, bias, cs, hs,
                             (cache_gates + t * four_h) if cache_gates != NULL else NULL,
                             (cache_c + t * H) if cache_c != NULL else NULL)
        memcpy(y + t * L.y_stride, hs, H * sizeof(float))
    _gather_state(L, d, L.order, 1, hs, cs, True)


cdef void _run_chunk(Py_ssize_t item, const Layer* L, floating* scratch) noexcept nogil:
    """Chunked mode: one (chunk, direction) item through all of its time steps."""
    if floating is float:
        if L.interleave and L.proj == 0 and L.spec.standard:    # interleave: packed, batch 1
            _run_row_interleaved(L, item % L.n_dirs, scratch)
            return
    cdef Py_ssize_t d = item % L.n_dirs
    cdef Py_ssize_t start = (item // L.n_dirs) * L.chunk
    cdef Py_ssize_t rows = L.chunk if start + L.chunk <= L.batch else L.batch - start
    cdef const Py_ssize_t* order = L.order + start
    # thread scratch: gh (chunk, 4H) | h (chunk, H_out) | c (chunk, H) | h_raw (chunk, H)
    #                 [fused: | gx (chunk, 4H) | x (chunk, I)]
    cdef floating* gh = scratch
    cdef floating* hs = gh + L.chunk * L.four_h
    cdef floating* cs = hs + L.chunk * L.hidden_out
    cdef floating* hraw = cs + L.chunk * L.hidden
    cdef floating* gxs = NULL
    cdef floating* xs = NULL
    cdef Py_ssize_t s, n_active, max_len = L.lengths[order[0]]
    cdef bint x_contiguous = True
    if L.fused:
        gxs = hraw + L.chunk * L.hidden
        xs = gxs + L.chunk * L.four_h
        x_contiguous = _x_in_place(L, order, rows)     # else gathered step by step

    _gather_state(L, d, order, rows, hs, cs, False)
    for s in range(max_len):
        n_active = _n_active(L, start, rows, s)
        if L.fused:
            if floating is float:
                _step_inputs(L, d, s, order, n_active, x_contiguous, xs, gxs)
        elif not L.interleave:
            _prefetch_gx(L, d, s, order, n_active)
        if L.interleave:
            if floating is float:
                _gates_interleaved(L, d, s, max_len, 0, L.hidden, hs, gh)
        elif n_active == 1 and L.w_hh_t != NULL and L.pk_hh == NULL:                      # gh = W_hh @ h_prev, own axpys
            if floating is float:
                lf_matvec_t_f32(H_out_of(L), L.four_h,
                                (<const float*> L.w_hh_t) + d * L.four_h * L.hidden_out, hs, gh)
            else:
                lf_matvec_t_f64(H_out_of(L), L.four_h,
                                (<const double*> L.w_hh_t) + d * L.four_h * L.hidden_out, hs, gh)
        else:
            # gh = h_prev @ W_hh.T, panels in alternating order (lf_pgemv_dir: L1 reuse)
            _gates_product(n_active, d, 0, L.four_h, L, hs, gh, s & 1)
        if L.proj > 0:
            _cell_rows(L, d, s, order, 0, n_active, gh, gxs, cs, hraw)
            _proj_product(n_active, d, 0, L.proj, L, hraw, hs)      # h = (o*tanh(c)) @ W_hr.T
            _copy_out_cols(L, d, s, order, n_active, 0, L.proj, hs)
        else:
            _cell_rows(L, d, s, order, 0, n_active, gh, gxs, cs, hs)
    _gather_state(L, d, order, rows, hs, cs, True)


cdef void _wide_gemm_item(Py_ssize_t item, Py_ssize_t s, Py_ssize_t n_active, const Layer* L,
                          floating* hs, floating* gh, float* gxs, const float* xs,
                          bint x_contiguous) noexcept nogil:
    # wide mode, phase 1: one block of gate columns of one direction; fused: first the same
    # columns of the step's input projection, gxs = x[t_r, b_r] @ W_ih[d, cols].T (the up-front
    # projection's FMA chains: same bits)
    cdef Py_ssize_t d = item // L.n_col_blocks
    cdef Py_ssize_t col0 = (item % L.n_col_blocks) * L.col_block
    cdef Py_ssize_t n_cols = L.col_block if col0 + L.col_block <= L.four_h else L.four_h - col0
    cdef Py_ssize_t I = L.input_size, B = L.batch
    cdef const float* src
    if floating is float:
        if L.fused:
            src = ((<const float*> L.x) + (_time_of(L, d, L.order[0], s) * B + L.order[0]) * I
                   if x_contiguous else xs + d * B * I)
            if n_active == 1:
                lf_pgemv(col0, n_cols, I, src, L.pk_ih + d * L.pk_ih_len, gxs + d * B * L.four_h)
            else:
                lf_pgemm(n_active, col0, n_cols, I, src, I, L.pk_ih + d * L.pk_ih_len,
                         gxs + d * B * L.four_h, L.four_h, 0)
    _gates_product(n_active, d, col0, n_cols, L, hs + d * L.batch * L.hidden_out,
                   gh + d * L.batch * L.four_h)


cdef void _wide_cell_item(Py_ssize_t item, Py_ssize_t s, Py_ssize_t n_active, Py_ssize_t n_row_blocks,
                          const Layer* L, floating* hs, floating* cs, floating* gh,
                          floating* hraw, floating* gxs, float* xs) noexcept nogil:
    # wide mode, phase 2: the cell update of one block of rows of one direction; fused, rows
    # not in place: their inputs of the next step gathered too (its GEMM phase reads them)
    cdef Py_ssize_t d = item // n_row_blocks
    cdef Py_ssize_t r0 = (item % n_row_blocks) * WIDE_ROWS
    cdef Py_ssize_t r1 = r0 + WIDE_ROWS if r0 + WIDE_ROWS <= n_active else n_active
    cdef floating* dst = (hraw + d * L.batch * L.hidden) if L.proj > 0 else (hs + d * L.batch * L.hidden_out)
    _cell_rows(L, d, s, L.order, r0, r1, gh + d * L.batch * L.four_h,
               (gxs + d * L.batch * L.four_h) if L.fused else NULL,
               cs + d * L.batch * L.hidden, dst)
    if floating is float:
        if xs != NULL:
            _gather_x(L, d, s + 1, L.order, r0, r1, xs + d * L.batch * L.input_size)


cdef void _wide_proj_item(Py_ssize_t item, Py_ssize_t s, Py_ssize_t n_active, const Layer* L,
                          floating* hs, floating* hraw) noexcept nogil:
    # wide mode, phase 3 (projection): one block of output columns of one direction
    cdef Py_ssize_t d = item // L.n_proj_blocks
    cdef Py_ssize_t col0 = (item % L.n_proj_blocks) * L.proj_block
    cdef Py_ssize_t n_cols = L.proj_block if col0 + L.proj_block <= L.proj else L.proj - col0
    cdef floating* h_d = hs + d * L.batch * L.hidden_out
    _proj_product(n_active, d, col0, n_cols, L, hraw + d * L.batch * L.hidden, h_d)
    _copy_out_cols(L, d, s, L.order, n_active, col0, n_cols, h_d)


cdef int _run_wide(const Layer* L, floating* state, int n_threads) noexcept nogil:
    """Wide mode: all rows and directions step by step, each step's work split over the threads.

    `state` is the shared buffer hs (D, B, H_out) | cs (D, B, H) | gh (D, B, 4H) | hraw (D, B, H)
    [fused: | gxs (D, B, 4H) | xs (D, B, I)], rows in `order`.
    """
    cdef Py_ssize_t D = L.n_dirs, B = L.batch
    cdef floating* hs = state
    cdef floating* cs = hs + D * B * L.hidden_out
    cdef floating* gh = cs + D * B * L.hidden
    cdef floating* hraw = gh + D * B * L.four_h
    cdef floating* gxs = hraw + D * B * L.hidden
    cdef float* xs = NULL
    cdef Py_ssize_t d, s, item, n_active, n_row_blocks
    cdef Py_ssize_t max_len = L.lengths[L.order[0]]
    # fused: the inputs read in place, or gathered step by step (the next step's by the cell items)
    cdef bint x_contiguous = L.fused and _x_in_place(L, L.order, B)
    if floating is float:
        if L.fused and not x_contiguous:
            xs = <float*> (gxs + D * B * L.four_h)
            for d in range(D):
                _gather_x(L, d, 0, L.order, 0, B, xs + d * B * L.input_size)
    for d in range(D):
        _gather_state(L, d, L.order, B, hs + d * B * L.hidden_out, cs + d * B * L.hidden, False)
    if n_threads <= 1:
        for s in range(max_len):
            n_active = _n_active(L, 0, B, s)
            n_row_blocks = (n_active + WIDE_ROWS - 1) // WIDE_ROWS
            for item in range(D * L.n_col_blocks):
                _wide_gemm_item(item, s, n_active, L, hs, gh, <float*> gxs, xs, x_contiguous)
            for item in range(D * n_row_blocks):
                _wide_cell_item(item, s, n_active, n_row_blocks, L, hs, cs, gh, hraw, gxs, xs)
            if L.proj > 0:
                for item in range(D * L.n_proj_blocks):
                    _wide_proj_item(item, s, n_active, L, hs, hraw)
    else:
        with parallel(num_threads=n_threads):
            # every thread walks the steps; each prange ends with a barrier, which orders the
            # phases: all of gh before any cell update, all of h before the next step's GEMM
            for s in range(max_len):
                n_active = _n_active(L, 0, B, s)
                n_row_blocks = (n_active + WIDE_ROWS - 1) // WIDE_ROWS
                for item in prange(D * L.n_col_blocks, schedule='static'):
                    _wide_gemm_item(item, s, n_active, L, hs, gh, <float*> gxs, xs, x_contiguous)
                for item in prange(D * n_row_blocks, schedule='static'):
                    _wide_cell_item(item, s, n_active, n_row_blocks, L, hs, cs, gh, hraw, gxs, xs)
                if L.proj > 0:
                    for item in prange(D * L.n_proj_blocks, schedule='static'):
                        _wide_proj_item(item, s, n_active, L, hs, hraw)
    for d in range(D):
        _gather_state(L, d, L.order, B, hs + d * B * L.hidden_out, cs + d * B * L.hidden, True)
    return 0


cdef void _split_step(const Layer* L, Py_ssize_t s, Py_ssize_t rows, Py_ssize_t u0, Py_ssize_t u1,
                      const float* h_cur, float* h_next, float* cs, float* gh) noexcept nogil:
    # split mode, one thread's share of step s: units u0..u1 of every running row
    cdef Py_ssize_t H = L.hidden, four_h = L.four_h, B = L.batch, T = L.seq_len
    cdef Py_ssize_t n_active = _n_active(L, 0, rows, s)
    cdef Py_ssize_t g, r, b, t, at
    cdef const float* gx_all = <const float*> L.gx
    cdef float* y = <float*> L.y
    if L.interleave:
        _gates_interleaved(L, 0, s, L.lengths[0], u0, u1, h_cur, gh)
    elif n_active == 1:
        lf_pgemv_gates(H, u0, u1, H, h_cur, L.pk_hh, gh, s & 1)
    else:
        for g in range(4):
            lf_pgemm(n_active, g * H + u0, u1 - u0, H, h_cur, H, L.pk_hh, gh, four_h, 0)
    for r in range(n_active):
        b = L.order[r]
        t = _time_of(L, 0, b, s)
        at = t * B + b
        lf_cell_units_simd(H, u0, u1, gh + r * four_h, gx_all + at * four_h,
                             <const float*> L.bias, cs + r * H, h_next + r * H,
                             ((<float*> L.cache_gates) + at * four_h) if L.keep_cache else NULL,
                             ((<float*> L.cache_c) + at * H) if L.keep_cache else NULL)
        memcpy(y + (t * B + b) * L.y_stride + u0, h_next + r * H + u0, (u1 - u0) * sizeof(float))
    for r in range(n_active, rows):          # finished rows carry their final state along
        memcpy(h_next + r * H + u0, h_cur + r * H + u0, (u1 - u0) * sizeof(float))


cdef void _split_pack(const Layer* L, Py_ssize_t u0, Py_ssize_t u1) noexcept nogil:
    # split mode: the W_hh panels of units u0..u1 (and their W_ih panels when the steps project
    # the inputs), packed by the thread that reads them every step, so they start in its own L2
    # rather than in the core that packed them ((100,1,128,128) on 2 threads: 13 us a call)
    cdef Py_ssize_t g, row, I = L.input_size, H = L.hidden
    for g in range(4):
        row = g * H + u0
        lf_pack_w((<const float*> L.w_hh) + row * H, H, u1 - u0, H, L.pk_hh + row * H)
        if L.interleave:
            lf_pack_w((<const float*> L.w_ih) + row * I, I, u1 - u0, I, L.pk_ih + row * I)


cdef long _run_split(const Layer* L, float* state, int n_threads, long budget,
                     long start) noexcept nogil:
    """Split mode (float32, packed kernel, one direction, one batch chunk, no projection, standard
    cell): each step's hidden units are shared by the threads, 32-unit panels each; a thread
    computes its units' four gate columns and their cell update, then all meet at a spin barrier
    before the next step reads h. Every output is the same FMA chain and lane-wise cell as in
    chunked mode: the bits do not depend on the thread count.

    With a budget (lf_split_budget: ticks a step, 0 for none), the first thread checks the ticks
    since `start` after each step; past budget * (steps + LF_SPLIT_ABORT_LAG) it sets the step to
    stop at before the barrier, every thread reads it after the barrier, and the calling thread
    runs the remaining steps on all units (the same products and cells). Returns the steps run
    split.

    The first thread does not wait for the others to wake: it runs whole steps alone (packing
    every panel first) until they have all arrived, then the team shares the units from the next
    step on (lf_team_open in lf_split.h).

    `state` is h (2 buffers of B x H, alternating by step) | c (B x H) | gh (B x 4H)."""
    cdef Py_ssize_t H = L.hidden, B = L.batch
    cdef float* h_bufs = state
    cdef float* cs = state + 2 * B * H
    cdef float* gh = cs + B * H
    cdef Py_ssize_t max_len = L.lengths[L.order[0]]
    cdef lf_barrier barrier
    cdef int team
    cdef Py_ssize_t u0, u1, s
    cdef long stop_at = max_len          # shared, written by the first thread only
    cdef long* stop_ptr = &stop_at       # through a pointer: the parallel block would privatise it
    cdef long join_at = -1               # the step from which the team shares the units
    cdef long* join_ptr = &join_at
    cdef long arrived = 0                # threads past the first that have started
    cdef long* arrived_ptr = &arrived
    cdef long packed_all = 0             # the first thread packed every panel (it ran alone)
    cdef long* packed_ptr = &packed_all
    cdef long alone = _split_alone_forced
    _gather_state(L, 0, L.order, B, h_bufs, cs, False)
    lf_barrier_init(&barrier)
    with parallel(num_threads=n_threads):
        team = lf_team_size()
        u0 = lf_team_unit_begin(H)
        u1 = lf_team_unit_end(H)
        s = 0
        if lf_team_rank() == 0:
            if alone > 0 or lf_team_arrived(arrived_ptr) < team - 1:
                if L.split_packs:
                    _split_pack(L, 0, H)
                    lf_store_long(packed_ptr, 1)
                while s < max_len and (s < alone or lf_team_arrived(arrived_ptr) < team - 1):
                    _split_step(L, s, B, 0, H, h_bufs + (s % 2) * B * H,
                                h_bufs + ((s + 1) % 2) * B * H, cs, gh)
                    s = s + 1
                _project_next_block(L, 0, s, max_len)
            lf_team_open(join_ptr, s)
        else:
            lf_team_arrive(arrived_ptr)
            s = lf_team_wait_open(join_ptr)
        if L.split_packs and u1 > u0 and not lf_load_long(packed_ptr):
            _split_pack(L, u0, u1)
        while s < lf_load_long(stop_ptr):
            if u1 > u0:
                _split_step(L, s, B, u0, u1, h_bufs + (s % 2) * B * H, h_bufs + ((s + 1) % 2) * B * H,
                            cs, gh)
            if (budget > 0 and lf_team_rank() == 0 and s + 1 < max_len
                    and lf_ticks() - start > budget * (s + 1 + LF_SPLIT_ABORT_LAG)):
                lf_store_long(stop_ptr, s + 1)
            lf_barrier_wait(&barrier, team)
            s = s + 1
    _project_next_block(L, 0, stop_at, max_len)
    for s in range(stop_at, max_len):
        _split_step(L, s, B, 0, H, h_bufs + (s % 2) * B * H, h_bufs + ((s + 1) % 2) * B * H, cs, gh)
    _gather_state(L, 0, L.order, B, h_bufs + (max_len % 2) * B * H, cs, True)
    return stop_at


cdef void _project_block(Py_ssize_t item, Py_ssize_t n_blocks, Py_ssize_t n_col_groups,
                         Py_ssize_t total_rows, const Layer* L, const floating* x,
                         const floating* w_ih, floating* gx_all) noexcept nogil:
    # gx[d, rows, cols] = x[rows] @ W_ih[d, cols].T for one block of L.proj_rows rows of the
    # (T*B, I) input and one group of PROJ_COLS gate columns (packed kernel; BLAS: all 4H at once)
    cdef Py_ssize_t d = item // (n_blocks * n_col_groups)
    cdef Py_ssize_t rest = item % (n_blocks * n_col_groups)
    cdef Py_ssize_t row0 = (rest // n_col_groups) * L.proj_rows
    cdef Py_ssize_t col0 = (rest % n_col_groups) * PROJ_COLS
    cdef Py_ssize_t rows = L.proj_rows if row0 + L.proj_rows <= total_rows else total_rows - row0
    if floating is float:
        if L.pk_ih != NULL:
            lf_pgemm(rows, col0, PROJ_COLS if col0 + PROJ_COLS <= L.four_h else L.four_h - col0,
                     L.input_size, x + row0 * L.input_size, L.input_size,
                     L.pk_ih + d * L.pk_ih_len, gx_all + (d * total_rows + row0) * L.four_h,
                     L.four_h, 0)
            return
    gemm_rm(c'T', <int> rows, <int> L.four_h, <int> L.input_size, <floating> 1,
            x + row0 * L.input_size, <int> L.input_size,
            w_ih + d * L.four_h * L.input_size, <int> L.input_size, <floating> 0,
            gx_all + (d * total_rows + row0) * L.four_h, <int> L.four_h)


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


cpdef bint split_mode_ok(Py_ssize_t batch, Py_ssize_t hidden, Py_ssize_t n_dirs, Py_ssize_t proj,
                        bint standard, bint packed) noexcept:
    """Whether split mode can run these shapes, forward and backward: the packed kernel and the
    AVX-512 cell, one direction, no projection, the standard cell, whole 32-unit panels (at
    least SPLIT_MIN_HIDDEN units) and one batch chunk (batch < 8)."""
    return (packed and n_dirs == 1 and proj == 0 and standard and hidden % 32 == 0
            and hidden >= SPLIT_MIN_HIDDEN and batch < 8)


def recurrence_mode(Py_ssize_t batch, Py_ssize_t hidden, Py_ssize_t hidden_out, Py_ssize_t itemsize,
                    bint packed=False, Py_ssize_t n_dirs=1):
    """The recurrence mode the shapes pick (never the thread count, so the bits stay the same).

    BLAS products (float64, or no AVX-512), measured on a 2-core Zen 4 with OpenBLAS (README,
    Design): wide wins from H=128 at batch 16 (5.1 vs 8.8 ms on one thread, 2.9 vs 4.7 ms on two)
    up to H=1024 at batch 128 (678 vs 909, 365 vs 477 ms), as OpenBLAS repacks W_hh per call;
    chunked wins for small W_hh and single rows.
    Packed float32 kernel (W_hh packed once per call): chunked is as fast or faster wherever there
    are two work items (tools/measure_modes.py: (100,16,128,128) 2 threads 2.51 vs 2.71 ms,
    (100,256,64,64) 12.6 vs 13.7 ms); wide only pays where the batch is one chunk of one direction
    and W_hh is large enough to split ((100,1,512,512) 2 threads 6.2 vs 8.5 ms, (100,8,256,256)
    6.6 vs 7.6 ms; but (100,1,128,128) 0.47 vs 0.43 ms), or where W_hh is beyond 8 MB and a
    pass over it per chunk costs more than a pass per step ((25,128,1024,1024) 553 vs 568 ms).
    """
    return "wide" if _wide_mode(batch, hidden, hidden_out, itemsize, packed, n_dirs) else "chunked"


cdef bint _wide_mode(Py_ssize_t batch, Py_ssize_t hidden, Py_ssize_t hidden_out,
                     Py_ssize_t itemsize, bint packed, Py_ssize_t n_dirs) noexcept nogil:
    # recurrence_mode's choice without a Python call (every layer call of the auto mode asks)
    cdef Py_ssize_t w_hh_bytes = 4 * hidden * hidden_out * itemsize
    cdef bint single_item
    if packed:
        single_item = batch_chunk(batch) >= batch and n_dirs == 1
        return w_hh_bytes >= PACKED_WIDE_MAX_BYTES or (single_item and w_hh_bytes >= PACKED_WIDE_BYTES)
    return w_hh_bytes >= WIDE_GEMV_BYTES or (batch > 1 and w_hh_bytes >= WIDE_MIN_BYTES)


cdef Py_ssize_t _packed_lens(Layer* L) noexcept nogil:
    # sets the floats of one direction's packed W_ih, W_hh and W_hr; returns the floats of all:
    # [W_ih of each direction | W_hh ... | W_hr ...] (_pack_part's layout)
    L.pk_ih_len = lf_pack_len(L.four_h, L.input_size)
    L.pk_hh_len = lf_pack_len(L.four_h, L.hidden_out)
    L.pk_hr_len = lf_pack_len(L.proj, L.hidden) if L.proj > 0 else 0
    return L.n_dirs * (L.pk_ih_len + L.pk_hh_len + L.pk_hr_len)


cdef void _pack_part(const Layer* L, float* pk, Py_ssize_t item, Py_ssize_t n_parts,
                     bint shared) noexcept nogil:
    # part item % n_parts (whole panels) of weight matrix (item // n_parts) % 3 (W_ih, W_hh, W_hr)
    # of direction item // (3 * n_parts), packed where lf_pack_w of the whole matrix puts it;
    # shared: other threads read the packed copy too (lf_pack_w_for)
    cdef Py_ssize_t part = item % n_parts, which = (item // n_parts) % 3
    cdef Py_ssize_t dd = item // (3 * n_parts), rows, k, n_panels, p0, p1, end
    cdef const float* w
    cdef float* dst
    if which == 0:
        if L.split_packs and L.interleave:        # the threads pack their own (_split_pack)
            return
        rows, k = L.four_h, L.input_size
        w = (<const float*> L.w_ih) + dd * rows * k
        dst = pk + dd * L.pk_ih_len
    elif which == 1:
        if L.split_packs:
            return
        rows, k = L.four_h, L.hidden_out
        w = (<const float*> L.w_hh) + dd * rows * k
        dst = pk + L.n_dirs * L.pk_ih_len + dd * L.pk_hh_len
    else:
        if L.proj == 0:
            return
        rows, k = L.proj, L.hidden
        w = (<const float*> L.w_hr) + dd * rows * k
        dst = pk + L.n_dirs * (L.pk_ih_len + L.pk_hh_len) + dd * L.pk_hr_len
    n_panels = (rows + 31) // 32
    p0 = n_panels * part // n_parts
    p1 = n_panels * (part + 1) // n_parts
    end = p1 * 32 if p1 * 32 < rows else rows
    if p1 > p0:
        lf_pack_w_for(w + p0 * 32 * k, k, end - p0 * 32, k, dst + p0 * 32 * k, shared)


cdef int _forward_run(const Layer* layer, const floating* x_ptr, int n_threads,
                      int mode, const float* prepacked=NULL) except -1:
    """The layer `layer` describes (shapes, spec and the arrays' pointers set; seq_len, batch > 0)
    with x_ptr its input (typing the call); see the module docstring. prepacked: the layer's
    float32 weights as pack_weights lays them out (checked by the caller), or NULL: packed here."""
    cdef Layer L = layer[0]
    cdef const floating* w_hh_all = <const floating*> L.w_hh
    L.chunk = batch_chunk(L.batch)
    L.n_chunks = (L.batch + L.chunk - 1) // L.chunk
    # gate columns in WIDE_COL_BLOCKS blocks, each a multiple of 32 (one lf_pgemm panel)
    L.col_block = ((L.four_h + WIDE_COL_BLOCKS - 1) // WIDE_COL_BLOCKS + 31) // 32 * 32
    L.n_col_blocks = (L.four_h + L.col_block - 1) // L.col_block
    L.proj_block = ((L.proj + WIDE_COL_BLOCKS - 1) // WIDE_COL_BLOCKS + 31) // 32 * 32 if L.proj else 1
    L.n_proj_blocks = (L.proj + L.proj_block - 1) // L.proj_block if L.proj else 0
    cdef bint use_packed = False
    if floating is float:
        use_packed = _packed_enabled and lf_pgemm_available()
    cdef bint split_ok = split_mode_ok(L.batch, L.hidden, L.n_dirs, L.proj, L.spec.standard,
                                       use_packed)
    # split or one thread, by the measured speed of each for this shape (lf_split_choose); a
    # small call (SMALL_CALL_FLOPS) that split mode cannot take chooses the same way between all
    # its threads and one
    cdef bint pack_shared = n_threads > 1      # the last calls' packed copy may be in other caches
    cdef bint small_call = (2.0 * L.n_dirs * L.seq_len * L.batch * L.four_h
                            * (L.input_size + L.hidden_out) < SMALL_CALL_FLOPS)
    cdef long choice_key = 0
    cdef int choice = 0
    if mode == MODE_AUTO and (split_ok or small_call) and n_threads > 1:
        choice_key = lf_split_key(L.batch, L.hidden, L.input_size, n_threads,
                                  L.keep_cache + (4 if sizeof(floating) == 8 else 0))
        choice = lf_split_choose(choice_key)
        if not split_ok and not (choice & 1):
            n_threads = 1
    if mode == MODE_AUTO:
        if split_ok and choice & 1:
            mode = MODE_SPLIT    # same bits as chunked: the choice may follow the thread count
        else:
            mode = MODE_WIDE if _wide_mode(L.batch, L.hidden, L.hidden_out, sizeof(floating),
                                           use_packed, L.n_dirs) else MODE_CHUNKED
    elif mode == MODE_SPLIT and not split_ok:
        mode = MODE_CHUNKED
    if use_packed and mode == MODE_CHUNKED:
        L.chunk = packed_chunk(L.batch, n_threads)
        L.n_chunks = (L.batch + L.chunk - 1) // L.chunk
    cdef long ticks = lf_ticks()          # the call's time from here, for lf_split_record
    cdef long split_steps                 # steps split mode ran before its budget stopped it

    cdef Py_ssize_t total_rows = L.seq_len * L.batch
    cdef Py_ssize_t n_blocks = (total_rows + PROJ_ROWS - 1) // PROJ_ROWS
    # blocks of equal size (a multiple of the kernel's 8-row tile) rather than a short last one
    L.proj_rows = ((total_rows + n_blocks - 1) // n_blocks + 7) // 8 * 8
    n_blocks = (total_rows + L.proj_rows - 1) // L.proj_rows
    cdef Py_ssize_t n_col_groups = 1
    cdef Py_ssize_t n_proj_items
    cdef Py_ssize_t n_items = L.n_chunks * L.n_dirs
    cdef Py_ssize_t scratch_len
    cdef Py_ssize_t wide_len = L.n_dirs * L.batch * (L.hidden_out + 2 * L.hidden + L.four_h)
    # packed chunked rows of at least one full kernel tile project their inputs step by step
    # (fused), unless W_ih and W_hh together would crowd the L3 cache that every step reads them from
    # Wide mode (W_hh past what a chunk per pass can stream well), more than one chunk of rows,
    # W_ih + W_hh up to WIDE_FUSED_MAX_BYTES: fused too, its one pass a step over W_hh carrying
    # W_ih, instead of a (T*B, I) GEMM up front (~150 GF/s against ~175 for a step's rows in a C
    # benchmark) and its T*B*4H buffer from memory. Xeon 6/207, 1 thread, min of 12 alternating
    # rounds: (50,64,512,512) (8 MB) 93.7 -> 89.0 ms; but (25,128,1024,1024) (32 MB) 373 -> 398.
    cdef Py_ssize_t w_bytes = L.four_h * (L.input_size + L.hidden_out) * sizeof(floating)
    L.fused = use_packed and ((mode == MODE_CHUNKED and L.chunk >= 8 and w_bytes <= FUSED_MAX_BYTES)
                              or (mode == MODE_WIDE and L.batch > 8
                                  and w_bytes <= WIDE_FUSED_MAX_BYTES))
    # batch 1, gate columns in whole groups of 4 panels, W_hh (a thread's share of it) well beyond
    # L1: the input projection runs inside the steps' row products (_gates_interleaved)
    L.interleave = (use_packed and _interleave_enabled and L.batch == 1 and L.four_h % 128 == 0
                    and (mode == MODE_CHUNKED or mode == MODE_SPLIT)
                    and L.seq_len >= 2 * INTERLEAVE_ROWS
                    and (L.four_h * L.hidden_out * sizeof(floating)
                         >= INTERLEAVE_MIN_BYTES * (n_threads if mode == MODE_SPLIT else 1)
                         or _tiles_from_group(L.hidden // (n_threads if mode == MODE_SPLIT else 1),
                                              L.hidden_out, L.input_size)))
    scratch_len = L.chunk * (L.four_h + L.hidden_out + 2 * L.hidden)
    if L.fused:
        scratch_len += L.chunk * (L.four_h + L.input_size)
        wide_len += L.n_dirs * L.batch * (L.four_h + L.input_size)
    cdef floating* gx_all = NULL
    if not L.fused:
        gx_all = <floating*> lf_ws_get(WS_GX, L.n_dirs * total_rows * L.four_h * sizeof(floating))
        if gx_all == NULL:
            raise MemoryError(f"cannot allocate the input projection buffer "
                              f"({L.n_dirs} x {total_rows} x {L.four_h} values)")
    L.gx = gx_all
    L.gx_itemsize = sizeof(floating)
    L.w_hh_t = NULL
    cdef const floating* w_ih_ptr = <const floating*> L.w_ih
    cdef floating* scratch = NULL
    cdef Py_ssize_t item
    cdef int failed = 0
    cdef int* failed_ptr = &failed   # written through a pointer: prange would privatise `failed`
    cdef double proj_flops = 2.0 * L.n_dirs * total_rows * L.four_h * L.input_size
    cdef double step_flops = 2.0 * L.n_dirs * L.batch * L.four_h * (L.hidden_out + 4)
    # the projection is the call's first parallel region: its threads may be asleep (tens of
    # microseconds to wake), so it asks ten times the work per thread of the per-step phases
    cdef int threads_proj
    cdef int threads_pack
    cdef Py_ssize_t pk_floats = 0
    cdef int threads_rec = threads_for(n_threads, n_items,
                                       step_flops * L.seq_len + (proj_flops if L.fused else 0))
    cdef int threads_wide = threads_for(n_threads, L.n_dirs * L.n_col_blocks, step_flops)

    cdef floating* w_hh_t = NULL
    cdef Py_ssize_t dd, q, p
    if not use_packed and L.batch == 1 and mode == MODE_CHUNKED and L.seq_len > 1 and L.four_h * L.hidden_out <= 16384:
        # batch 1, small W_hh: the steps' matrix-vector products run as axpys over W_hh's
        # transpose, without BLAS's per-call overhead. Measured (tools/measure_modes.py, 1 thread):
        # (1000,1,16,32) 0.48 -> 0.33 ms; no gain at H=64; slower than gemv at H=128 (0.49 -> 0.66)
        w_hh_t = <floating*> malloc(L.n_dirs * L.four_h * L.hidden_out * sizeof(floating))
        if w_hh_t != NULL:
            for dd in range(L.n_dirs):
                for q in range(L.four_h):
                    for p in range(L.hidden_out):
                        w_hh_t[(dd * L.hidden_out + p) * L.four_h + q] = \
                            w_hh_all[(dd * L.four_h + q) * L.hidden_out + p]
            L.w_hh_t = w_hh_t
    # float32: pack the weights once per call for lf_pgemm (cost ~ one step's product per matrix)
    cdef void* pk_raw = NULL
    cdef float* pk = NULL
    L.pk_ih = NULL
    L.pk_hh = NULL
    L.pk_hr = NULL
    L.pk_ih_len = L.pk_hh_len = L.pk_hr_len = 0
    L.split_packs = 0
    if floating is float:
        if use_packed:
            pk_floats = _packed_lens(&L)
            n_col_groups = (L.four_h + PROJ_COLS - 1) // PROJ_COLS
        if use_packed and prepacked != NULL:
            # a frozen model's weights, packed once when it was frozen (pack_weights): no packing
            # per call, which is most of a short batch-1 call's fixed cost
            pk = <float*> prepacked
        elif use_packed:
            pk = lf_ws_aligned(WS_PACKED, pk_floats, &pk_raw)
            if pk == NULL:
                lf_ws_release(WS_GX, gx_all)
                free(w_hh_t)
                raise MemoryError("cannot allocate the packed weights")
            # split mode: the threads pack their own panels into their own caches (_split_pack)
            L.split_packs = mode == MODE_SPLIT
            # weights of PACK_PARALLEL_FLOATS and more are packed by every thread, a share of
            # the panels each (the same panels: the same packed copy)
            threads_pack = n_threads if pk_floats >= PACK_PARALLEL_FLOATS else 1
            # with more threads the last call's copy is in their caches too: compare, then write
            # only what changed ((16,128,128) on two threads: 62 -> 15 us of packing a call)
            with nogil:
                if threads_pack <= 1:
                    for item in range(3 * L.n_dirs):
                        _pack_part(&L, pk, item, 1, pack_shared)
                else:
                    for item in prange(3 * L.n_dirs * threads_pack, num_threads=threads_pack,
                                       schedule='static'):
                        _pack_part(&L, pk, item, threads_pack, True)
        if use_packed:
            L.pk_ih = pk
            L.pk_hh = pk + L.n_dirs * L.pk_ih_len
            L.pk_hr = (pk + L.n_dirs * (L.pk_ih_len + L.pk_hh_len)) if L.proj > 0 else NULL
    n_proj_items = 0 if (L.fused or L.interleave) else n_blocks * n_col_groups * L.n_dirs
    # How much more work per thread than a step phase the projection asks for: split mode wakes
    # every thread right after anyway (1); a recurrence on one thread would wake the workers for
    # the projection alone ((1000,1,16,32), 4 MFLOP: 0.30 ms on two threads against 0.26 on one
    # in the bench) (20); otherwise 10 (see above).
    threads_proj = threads_for(n_threads, n_proj_items, proj_flops / (
        1 if mode == MODE_SPLIT else 20 if (mode == MODE_CHUNKED and threads_rec <= 1) else 10))
    with nogil:
        if threads_proj <= 1:
            for item in range(n_proj_items):
                _project_block(item, n_blocks, n_col_groups, total_rows, &L, x_ptr, w_ih_ptr, gx_all)
        else:
            for item in prange(n_proj_items, num_threads=threads_proj, schedule='static'):
                _project_block(item, n_blocks, n_col_groups, total_rows, &L, x_ptr, w_ih_ptr, gx_all)

        if mode == MODE_SPLIT:
            if floating is float:
                scratch = <floating*> lf_malloc64(7 * L.batch * L.hidden * sizeof(floating))
                if scratch == NULL:
                    failed = 1
                else:
                    # the budget counts from the recurrence's start: the projection before it
                    # may have started the team's threads (hundreds of us the first time)
                    split_steps = _run_split(&L, scratch, n_threads, _split_budget_forced
                                             or lf_split_budget(choice_key, choice), lf_ticks())
                    if split_steps < L.lengths[L.order[0]]:
                        # stopped past its budget: measured (below) whether or not its call was
                        # to be, as the whole call over all its steps. Split mode's pace over its
                        # few steps, the threads' start in them, once recorded a first call at
                        # 1.2 M ticks a step, 150x the pace, and kept split mode out for
                        # thousands of calls (AMD EPYC Zen 4 guest, (100,1,128,128), 2026-12-07)
                        choice = choice | 2
                    free(scratch)
        elif mode == MODE_WIDE:
            scratch = <floating*> lf_malloc64(wide_len * sizeof(floating))
            if scratch == NULL:
                failed = 1
            else:
                _run_wide(&L, scratch, threads_wide)
                free(scratch)
        elif threads_rec <= 1:
            scratch = <floating*> lf_malloc64(scratch_len * sizeof(floating))
            if scratch == NULL:
                failed = 1
            else:
                for item in range(n_items):
                    _run_chunk(item, &L, scratch)
                free(scratch)
        else:
            with parallel(num_threads=threads_rec):
                scratch = <floating*> lf_malloc64(scratch_len * sizeof(floating))   # one per thread
                for item in prange(n_items, schedule='dynamic'):
                    if scratch == NULL:
                        failed_ptr[0] = 1
                    else:
                        _run_chunk(item, &L, scratch)
                free(scratch)
        if choice & 2:
            lf_split_record(choice_key, choice, lf_ticks() - ticks, L.seq_len)
        if choice_key != 0:
            # the next call's pause counts from here: a call slowed past the chooser's 1 ms idle
            # threshold (a busy core) must still be measured, or the choice never changes
            lf_split_ended(choice_key)
        lf_ws_release(WS_GX, gx_all)
        free(w_hh_t)
        lf_ws_release(WS_PACKED, pk_raw)
    if failed:
        raise MemoryError("cannot allocate the workspace of the LSTM recurrence")
    return 0


cdef void _layer_shapes(Layer* L, Py_ssize_t seq_len, Py_ssize_t batch, Py_ssize_t input_size,
                        Py_ssize_t n_dirs, Py_ssize_t four_h, Py_ssize_t proj,
                        Py_ssize_t y_stride) noexcept nogil:
    # the shapes a Layer derives everything else from
    L.seq_len = seq_len
    L.batch = batch
    L.input_size = input_size
    L.n_dirs = n_dirs
    L.four_h = four_h
    L.hidden = four_h // 4
    L.proj = proj
    L.hidden_out = proj if proj > 0 else L.hidden
    L.y_stride = y_stride


cdef Py_ssize_t _packed_floats(const Layer* L) noexcept nogil:
    # floats of a layer's packed weights, its own lengths left as they are
    cdef Layer shapes = L[0]
    return _packed_lens(&shapes)


cdef int _prepacked_pointer(object prepacked, const Layer* L, const float** out) except -1:
    # out = the data of pack_weights' array for this layer, or NULL for None (checked as an
    # ndarray: a memoryview's set-up is a tenth of a small step)
    out[0] = NULL
    if prepacked is None:
        return 0
    if not cnp.PyArray_CheckExact(prepacked):
        raise TypeError(f"prepacked weights: expected pack_weights' ndarray, got {type(prepacked).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray> prepacked
    cdef size_t address = <size_t> cnp.PyArray_DATA(a)
    if (cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32
            or not cnp.PyArray_IS_C_CONTIGUOUS(a) or a.shape[0] != _packed_floats(L)
            or address % 64 != 0):
        raise ValueError(f"prepacked weights: expected the 64-byte aligned array of "
                         f"{_packed_floats(L)} floats (1-D float32) that pack_weights makes for this "
                         f"layer, got shape {prepacked.shape} of {prepacked.dtype} at address "
                         f"{address:#x}")
    out[0] = <const float*> address
    return 0


def pack_weights(const float[:, :, ::1] w_ih,         # IN  (D, 4H, I)
                 const float[:, :, ::1] w_hh,         # IN  (D, 4H, H_out)
                 const float[:, :, ::1] w_hr):        # IN  (D, P, H); (D, 0, H) without projection
    """One float32 layer's weights packed as every call would pack them for lf_pgemm, for the
    `prepacked` argument of forward_layer and forward_plain (a frozen model's calls then skip
    that packing): a read-only 64-byte aligned 1-D float32 array. None where the packed kernel
    is off or missing (the calls then run BLAS, which takes the weights as they are)."""
    cdef Layer L
    cdef Py_ssize_t D = w_ih.shape[0], four_h = w_ih.shape[1], P = w_hr.shape[1], n, item
    if (four_h % 4 or w_hh.shape[0] != D or w_hh.shape[1] != four_h
            or w_hh.shape[2] != (P if P > 0 else four_h // 4)
            or (P > 0 and (w_hr.shape[0] != D or w_hr.shape[2] != four_h // 4))):
        raise ValueError(f"pack_weights: W_ih {tuple(w_ih.shape)[:3]}, W_hh {tuple(w_hh.shape)[:3]} "
                         f"and W_hr {tuple(w_hr.shape)[:3]} are not one layer's (D, 4H, I), "
                         f"(D, 4H, H_out) and (D, P, H)")
    if not (_packed_enabled and lf_pgemm_available()):
        return None
    _layer_shapes(&L, 1, 1, w_ih.shape[2], D, four_h, P, D * (P if P > 0 else four_h // 4))
    L.w_ih = &w_ih[0, 0, 0]
    L.w_hh = &w_hh[0, 0, 0]
    L.w_hr = &w_hr[0, 0, 0] if P > 0 else NULL
    L.split_packs = 0
    L.interleave = 0
    n = _packed_lens(&L)
    out = aligned_zeros(n, np.float32)
    cdef float* pk = <float*> cnp.PyArray_DATA(out)
    with nogil:
        for item in range(3 * D):          # what a call's packing writes (_forward_run)
            _pack_part(&L, pk, item, 1, False)
    out.flags.writeable = False
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
                  int n_threads,
                  int mode=MODE_AUTO,                   # 1: chunked, 2: wide, 3: split (tests, benchmarks)
                  object prepacked=None):               # IN  pack_weights(w_ih, w_hh, w_hr), float32
    """Run one layer (all directions) over a batch of sequences; see the module docstring."""
    cdef Layer L
    _layer_shapes(&L, x.shape[0], x.shape[1], x.shape[2], w_ih.shape[0], w_ih.shape[1],
                  w_hr.shape[1], y.shape[2])
    L.spec = _make_spec(spec)
    L.keep_cache = cache_gates.shape[1] > 0 and cache_c.shape[1] > 0
    L.spec.has_peephole = peephole.shape[1] > 0
    if L.spec.has_peephole:
        L.spec.standard = 0          # peepholes run in the general cell
    if L.seq_len == 0 or L.batch == 0:
        return
    L.x = &x[0, 0, 0]
    L.w_ih = &w_ih[0, 0, 0]
    L.w_hh = &w_hh[0, 0, 0]
    L.bias = &bias[0, 0]
    L.w_hr = &w_hr[0, 0, 0] if L.proj > 0 else NULL
    L.peephole = &peephole[0, 0] if L.spec.has_peephole else NULL
    L.cache_gates = &cache_gates[0, 0, 0, 0] if L.keep_cache else NULL
    L.cache_c = &cache_c[0, 0, 0, 0] if L.keep_cache else NULL
    L.h = &h[0, 0, 0]
    L.c = &c[0, 0, 0]
    L.y = &y[0, 0, 0]
    L.order = &order[0]
    L.lengths = &lengths[0]
    L.reverse = &reverse[0]
    cdef const float* pk = NULL
    if floating is float:
        _prepacked_pointer(prepacked, &L, &pk)
    elif prepacked is not None:
        raise TypeError("prepacked weights are float32; this layer is float64")
    _forward_run(&L, &x[0, 0, 0], n_threads, mode, pk)


cdef object _forward_plain(const floating* tag, cnp.ndarray x, list w_ih, list w_hh, object b_ih,
                          object b_hh, object w_hr, int n_threads, int mode, list packed,
                          object h_n, object c_n):
    # forward_plain for one dtype (tag types the call and is not read)
    cdef int typenum = cnp.PyArray_TYPE(x)
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], n_layers = len(w_ih), k, j
    cdef cnp.ndarray w_ih_k = w_ih[0], w_hh_k = w_hh[0], w_hr_k = None, b_ih_k, b_hh_k
    cdef Py_ssize_t D = w_ih_k.shape[0], four_h = w_ih_k.shape[1], H_out = w_hh_k.shape[2]
    cdef Py_ssize_t P = (<cnp.ndarray> w_hr[0]).shape[1] if w_hr is not None else 0
    cdef cnp.npy_intp dims[3]
    dims[0] = n_layers * D
    dims[1] = B
    if h_n is None:
        dims[2] = H_out
        h_n = cnp.PyArray_ZEROS(3, dims, typenum, 0)
        dims[2] = four_h // 4
        c_n = cnp.PyArray_ZEROS(3, dims, typenum, 0)
    dims[0] = T
    dims[2] = D * H_out
    cdef Py_ssize_t* rows = <Py_ssize_t*> malloc(2 * B * sizeof(Py_ssize_t))
    cdef floating* bias = <floating*> lf_malloc64(D * four_h * sizeof(floating))
    cdef int reverse[2]
    cdef const floating* b1
    cdef const floating* b2
    cdef Layer L
    cdef CellSpec standard = _make_spec(None)
    cdef const float* pk = NULL
    reverse[0] = 0
    reverse[1] = 1
    if rows == NULL or bias == NULL:
        free(rows)
        free(bias)
        raise MemoryError("cannot allocate the call's lengths and biases")
    try:
        for j in range(B):
            rows[j] = j           # order: no padding, rows as they come
            rows[B + j] = T       # lengths
        y = x
        for k in range(n_layers):
            w_ih_k = w_ih[k]
            w_hh_k = w_hh[k]
            if b_ih is not None:
                b_ih_k = b_ih[k]
                b_hh_k = b_hh[k]
                b1 = <const floating*> cnp.PyArray_DATA(b_ih_k)
                b2 = <const floating*> cnp.PyArray_DATA(b_hh_k)
                for j in range(D * four_h):
                    bias[j] = b1[j] + b2[j]
            else:
                for j in range(D * four_h):
                    bias[j] = 0
            _layer_shapes(&L, T, B, w_ih_k.shape[2], D, four_h, P, D * H_out)
            L.spec = standard
            L.keep_cache = 0
            layer_input = y       # held until the layer has run
            L.x = cnp.PyArray_DATA(<cnp.ndarray> layer_input)
            y = cnp.PyArray_EMPTY(3, dims, typenum, 0)
            L.w_ih = cnp.PyArray_DATA(w_ih_k)
            L.w_hh = cnp.PyArray_DATA(w_hh_k)
            L.bias = bias
            if P > 0:
                w_hr_k = w_hr[k]
                L.w_hr = cnp.PyArray_DATA(w_hr_k)
            else:
                L.w_hr = NULL
            L.peephole = NULL
            L.cache_gates = NULL
            L.cache_c = NULL
            L.h = (<floating*> cnp.PyArray_DATA(<cnp.ndarray> h_n)) + k * D * B * H_out
            L.c = (<floating*> cnp.PyArray_DATA(<cnp.ndarray> c_n)) + k * D * B * L.hidden
            L.y = cnp.PyArray_DATA(<cnp.ndarray> y)
            L.order = rows
            L.lengths = rows + B
            L.reverse = reverse
            if floating is float:
                if packed is not None:
                    _prepacked_pointer(packed[k], &L, &pk)
            _forward_run(&L, <const floating*> L.x, n_threads, mode, pk)
    finally:
        free(rows)
        free(bias)
    return y, h_n, c_n


cdef bint _state_fits(object s, Py_ssize_t n_states, Py_ssize_t batch, Py_ssize_t width,
                      cnp.ndarray x):
    # an initial state forward_plain may update in place
    if not cnp.PyArray_CheckExact(s):
        return False
    cdef cnp.ndarray a = <cnp.ndarray> s
    return (cnp.PyArray_NDIM(a) == 3 and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_ISWRITEABLE(a) and cnp.PyArray_TYPE(a) == cnp.PyArray_TYPE(x)
            and a.shape[0] == n_states and a.shape[1] == batch and a.shape[2] == width)


def forward_plain(object x, list w_ih, list w_hh, object b_ih, object b_hh, object w_hr,
                  int n_threads, int mode=MODE_AUTO, list packed=None, object h_n=None,
                  object c_n=None):
    """LSTM.__call__ without states or lengths, for a C-contiguous (T, B, I) ndarray of the
    parameters' dtype: (y, h_n, c_n) of all layers in one call, zero initial states. The general
    path (validation, allocations, one forward_layer call per layer through typed memoryviews)
    costs several microseconds a call, a tenth of a (100,1,32,64) call. Returns None for any other
    x: the caller then takes the general path, which converts or explains. The parameters are the
    model's own lists (per layer: (D, 4H, in), (D, 4H, H_out), biases (D, 4H) or None, W_hr or
    None), C-contiguous arrays of one dtype; `packed` None or, per layer, pack_weights' array of
    it (or None). h_n and c_n, given together: the initial states, (L*D, B, H_out) and
    (L*D, B, H) C-contiguous arrays of x's dtype, updated in place (else None is returned)."""
    if not cnp.PyArray_CheckExact(x):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray> x
    cdef cnp.ndarray w0 = w_ih[0]
    if (cnp.PyArray_NDIM(xa) != 3 or not cnp.PyArray_IS_C_CONTIGUOUS(xa)
            or not cnp.PyArray_ISALIGNED(xa) or cnp.PyArray_TYPE(xa) != cnp.PyArray_TYPE(w0)
            or xa.shape[2] != w0.shape[2] or xa.shape[0] == 0 or xa.shape[1] == 0):
        return None
    # the general path explains sizes beyond the index type (check_size_product)
    if xa.shape[0] * xa.shape[1] > (PY_SSIZE_T_MAX // 8) // (w0.shape[0] * w0.shape[1]):
        return None
    if (h_n is None) != (c_n is None) or (h_n is not None and not (
            _state_fits(h_n, len(w_ih) * w0.shape[0], xa.shape[1], (<cnp.ndarray> w_hh[0]).shape[2], xa)
            and _state_fits(c_n, len(w_ih) * w0.shape[0], xa.shape[1], w0.shape[1] // 4, xa))):
        return None
    if cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT32:
        return _forward_plain(<const float*> NULL, xa, w_ih, w_hh, b_ih, b_hh, w_hr, n_threads, mode,
                              packed, h_n, c_n)
    if cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT64:
        return _forward_plain(<const double*> NULL, xa, w_ih, w_hh, b_ih, b_hh, w_hr, n_threads, mode,
                              None, h_n, c_n)
    return None


def split_choice_trace(long key, list ticks_split, list ticks_one, double hold=0.0,
                       double pause=0.0):
    """Test twin of the split/one-thread choice (lf_split_choose, lf_split_record,
    lf_split_ended): one choice per entry of the lists for shape `key`, each measured call
    recorded as taking ticks_split[i] (split) or ticks_one[i] (one thread) ticks for its one step;
    each call lasts `hold` seconds (spent waiting) before it ends and follows a sleep of `pause`
    seconds. Returns the choices, 1 for split."""
    import time
    cdef list ways = []
    cdef Py_ssize_t i
    cdef int choice
    for i in range(len(ticks_split)):
        if pause > 0:
            time.sleep(pause)
        choice = lf_split_choose(key)
        if hold > 0:
            end = time.perf_counter() + hold
            while time.perf_counter() < end:
                pass
        if choice & 2:
            lf_split_record(key, choice, ticks_split[i] if choice & 1 else ticks_one[i], 1)
        lf_split_ended(key)
        ways.append(choice & 1)
    return ways


def split_budget_of(long key, int choice):
    """Test twin of lf_split_budget: the ticks a step a split call of `choice` (lf_split_choose's
    bits) may take before it finishes on one thread; 0 for none."""
    return lf_split_budget(key, choice)


def gate_math_py(const floating[::1] values, str function):   # IN values
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


def cell_gates_py(const floating[:, ::1] z, floating[::1] c):
    """Test twin of the sequence kernels' cell (AVX-512 for float32 where the CPU has it): gate
    pre-activations z (4, H) in [i|f|g|o] order and c (H,) updated in place; returns the
    activated gates (4, H) and h_raw (H,)."""
    cdef Py_ssize_t H = z.shape[1]
    if z.shape[0] != 4 or c.shape[0] != H:
        raise ValueError(f"cell_gates_py: z must be (4, H) and c (H,), got ({z.shape[0]}, {z.shape[1]}) and ({c.shape[0]},)")
    dt = np.float32 if floating is float else np.float64
    zeros = np.zeros(4 * H, dtype=dt)
    gates = np.empty((4, H), dtype=dt)
    h = np.empty(H, dtype=dt)
    c_out = np.empty(H, dtype=dt)
    cdef floating[::1] zero_v = zeros
    cdef floating[:, ::1] g_v = gates
    cdef floating[::1] h_v = h
    cdef floating[::1] c_out_v = c_out
    if H > 0:
        with nogil:
            cell_row_cached(H, &z[0, 0], &zero_v[0], &zero_v[0], &c[0], &h_v[0], &g_v[0, 0],
                            &c_out_v[0])
    return gates, h


def gemm_repeat_py(const floating[:, ::1] a, const floating[:, ::1] b, floating[:, ::1] c,
                   Py_ssize_t repeats):
    """Benchmark twin: c = a @ b.T, `repeats` times through the kernels' own BLAS wrapper without
    the GIL (no Python overhead per product), for the GEMM-limit column of `bench`."""
    cdef Py_ssize_t r
    if a.shape[1] != b.shape[1] or c.shape[0] != a.shape[0] or c.shape[1] != b.shape[0]:
        raise ValueError("gemm_repeat_py: a (m, k), b (n, k) and c (m, n) do not match")
    with nogil:
        for r in range(repeats):
            gemm_rm(c'T', <int> a.shape[0], <int> b.shape[0], <int> a.shape[1], <floating> 1,
                    &a[0, 0], <int> a.shape[1], &b[0, 0], <int> b.shape[1], <floating> 0,
                    &c[0, 0], <int> c.shape[1])


from lstm_fast import _cpu as _cpu_module
_set_kernel(*_cpu_module.kernel_settings())
