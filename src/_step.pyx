"""One time step through every layer of a unidirectional LSTM, for streaming: the low-latency path.

A StepPlan holds pointers to the model's parameter arrays (and references keeping them alive), so
a call parses only x, h, c and does no per-layer Python work. The parameters are read at every
call, so in-place updates of `parameters()` are seen. IN/OUT: x (B, I), h (L, B, H_out) and
c (L, B, H) C-contiguous of the plan's dtype; h and c are updated in place (the caller copies).
Layer k's new h is layer k+1's input, so no output buffers are needed: the output is h[L-1].
"""
from cython cimport floating
from cython.parallel cimport parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from _blas cimport gemm_rm, gemv_rm
from _pgemm cimport lf_gemv_rows, lf_pack_len, lf_pgemm, lf_pgemm_available, lf_set_kernel
from _gates cimport cell_row_standard, lf_cell_units_simd
from _shapes cimport step_shapes_match
from _split cimport (lf_barrier, lf_barrier_init, lf_barrier_wait, lf_team_size, lf_team_rank,
                     lf_ticks, lf_split_choose, lf_split_record, lf_split_ended, lf_split_key)


# float32 steps of at most this many rows run lf_gemv_rows (W read once a step, no packing);
# more take sgemm, whose packing pays off from about there (measured on the Xeon 6/207, H 64-512:
# 32 rows 0.68x-0.86x sgemm's time, 48 rows 0.81x-1.01x, 64 rows 0.86x-1.08x; on Zen 4, one FMA
# port, 32 rows on one thread are 1.09x-1.16x sgemm's time, but split over two threads from 1 MB
# of weights 0.57x-0.62x: docs/performance.md)
cdef Py_ssize_t STEP_GEMV_MAX_ROWS = 32
GEMV_MAX_ROWS = STEP_GEMV_MAX_ROWS
# float32 steps (lf_gemv_rows) whose weights reach this many bytes may split their hidden units
# over the threads, where measured faster than one thread (lf_split_choose); below, waking the
# other thread costs more than its half of the weights saves
cdef Py_ssize_t STEP_SPLIT_MIN_BYTES = 1 << 20


cdef class StepPlan:
    cdef int n_layers
    cdef int is_double
    cdef Py_ssize_t input_size, hidden, proj, hidden_out, weight_bytes
    cdef readonly bint may_split   # float32 weights of STEP_SPLIT_MIN_BYTES: threads may help
    cdef list _keep
    cdef void** w_ih
    cdef void** w_hh
    cdef void** b_ih
    cdef void** b_hh
    cdef void** w_hr
    cdef const float** packed     # per layer: _forward.pack_weights' copy (a frozen model's), or NULL

    def __cinit__(self, list w_ih, list w_hh, list b_ih, list b_hh, list w_hr, list packed=None):
        """Per layer: W_ih (4H, in_k), W_hh (4H, H_out), b_ih, b_hh (4H,) or None, W_hr (P, H) or
        None; packed: None, or per layer the float32 weights as _forward.pack_weights packs them
        (a frozen model's), which the steps then multiply with the sequence kernel's products."""
        import numpy as np

        self.n_layers = len(w_ih)
        self._keep = []
        self.w_ih = <void**> malloc(5 * self.n_layers * sizeof(void*))
        if self.w_ih == NULL:
            raise MemoryError()
        self.w_hh = self.w_ih + self.n_layers
        self.b_ih = self.w_hh + self.n_layers
        self.b_hh = self.b_ih + self.n_layers
        self.w_hr = self.b_hh + self.n_layers
        dtype = w_ih[0].dtype
        self.is_double = dtype == np.float64
        self.input_size = w_ih[0].shape[1]
        self.hidden = w_ih[0].shape[0] // 4
        self.proj = 0 if w_hr[0] is None else w_hr[0].shape[0]
        self.hidden_out = self.proj if self.proj else self.hidden
        self.weight_bytes = sum(a.nbytes for group in (w_ih, w_hh, w_hr) for a in group if a is not None)
        self.may_split = not self.is_double and self.weight_bytes >= STEP_SPLIT_MIN_BYTES
        cdef Py_ssize_t k, slot
        cdef void** table
        for k in range(self.n_layers):
            for slot, arr in enumerate((w_ih[k], w_hh[k], b_ih[k], b_hh[k], w_hr[k])):
                table = self.w_ih + slot * self.n_layers    # the five tables lie back to back
                if arr is None:
                    table[k] = NULL
                else:
                    if arr.dtype != dtype or not arr.flags.c_contiguous:
                        raise ValueError("StepPlan needs C-contiguous parameters of one dtype")
                    self._keep.append(arr)
                    table[k] = <void*> <size_t> arr.ctypes.data
        if packed is not None:
            self._set_packed(packed)

    cdef _set_packed(self, list packed):
        import numpy as np

        if self.is_double or len(packed) != self.n_layers:
            raise ValueError("packed weights are float32, one array per layer")
        self.packed = <const float**> malloc(self.n_layers * sizeof(float*))
        if self.packed == NULL:
            raise MemoryError()
        cdef Py_ssize_t k, in_k, want
        for k in range(self.n_layers):
            arr = packed[k]
            in_k = self.input_size if k == 0 else self.hidden_out
            want = (lf_pack_len(4 * self.hidden, in_k) + lf_pack_len(4 * self.hidden, self.hidden_out)
                    + (lf_pack_len(self.proj, self.hidden) if self.proj else 0))
            if (type(arr) is not np.ndarray or arr.dtype != np.float32 or arr.ndim != 1
                    or arr.shape[0] != want or not arr.flags.c_contiguous
                    or arr.ctypes.data % 64 != 0):
                free(self.packed)
                self.packed = NULL
                raise ValueError(f"packed weights of layer {k}: expected pack_weights' 64-byte "
                                 f"aligned array of {want} float32 values")
            self._keep.append(arr)
            self.packed[k] = <const float*> <size_t> arr.ctypes.data

    def __dealloc__(self):
        free(self.w_ih)
        free(self.packed)

    cpdef bint panel_team_ok(self, int n_threads):
        """Whether a team of n_threads may split this plan's steps in whole packed panels: a
        frozen model's float32 weights of STEP_SPLIT_MIN_BYTES or more, H a multiple of 32 with a
        panel for every thread (the packed kernel on is the caller's to check)."""
        return (self.packed != NULL and self.may_split and self.hidden % 32 == 0
                and self.hidden >= 32 * n_threads)

    @property
    def gemv_rows(self):
        """Steps of up to this many rows call no BLAS (lf_gemv_rows); 0 on the paths that do."""
        return STEP_GEMV_MAX_ROWS if not self.is_double and lf_pgemm_available() else 0

    def run(self, const floating[:, ::1] x,     # IN     (B, I) this step's input
            floating[:, :, ::1] h,              # IN/OUT (L, B, H_out)
            floating[:, :, ::1] c,              # IN/OUT (L, B, H)
            int n_threads=1, bint use_packed=True):
        """One step: h, c updated in place; returns nothing (the output is h[-1]). Same bits for
        any n_threads. With packed weights (and use_packed, the packed kernel on), one thread
        and the bits of the sequence kernel."""
        cdef bint is_double
        if floating is double:
            is_double = True
        else:
            is_double = False
        if is_double != bool(self.is_double):
            raise TypeError("x, h and c must have the plan's dtype")
        cdef Py_ssize_t batch = x.shape[0]
        if not step_shapes_match(x.shape, h.shape, c.shape, self.input_size, self.n_layers,
                                 self.hidden_out, self.hidden):
            raise ValueError("x, h or c does not match the model's shapes")
        if batch == 0:
            return
        cdef Py_ssize_t four_h = 4 * self.hidden
        cdef floating* work = <floating*> malloc((2 * batch * four_h + four_h + batch * self.hidden)
                                                 * sizeof(floating))
        if work == NULL:
            raise MemoryError("cannot allocate the step workspace")
        cdef long key = 0
        cdef int choice = 0
        cdef long ticks = 0
        cdef lf_barrier bar
        lf_barrier_init(&bar)
        cdef bint gemv = False
        cdef bint packed = False
        cdef bint team_ok = False
        if floating is float:
            packed = self.packed != NULL and use_packed and lf_pgemm_available()
            gemv = lf_pgemm_available() and batch <= STEP_GEMV_MAX_ROWS
            # a team splits the hidden units: in groups of 16 over lf_gemv_rows, or of whole
            # packed panels (32 columns, so H a multiple of 32) over the frozen weights
            team_ok = (self.panel_team_ok(n_threads) if packed
                       else self.may_split and gemv and self.hidden >= 16 * n_threads)
            if n_threads > 1 and team_ok and batch <= STEP_GEMV_MAX_ROWS:
                key = lf_split_key(batch, self.hidden, self.input_size, n_threads,
                                   self.n_layers % 4 + 4 * packed)
                choice = lf_split_choose(key)
                ticks = lf_ticks()
        with nogil:
            if floating is float and choice & 1:
                with parallel(num_threads=n_threads):
                    _step_layers_team(self.n_layers, self.input_size, self.hidden, self.proj,
                                      self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr,
                                      self.packed if packed else NULL, &x[0, 0], &h[0, 0, 0],
                                      &c[0, 0, 0], batch, work, &bar)
            elif floating is float and packed:
                _step_layers_one(self.n_layers, self.input_size, self.hidden, self.proj, self.w_ih,
                                 self.w_hh, self.b_ih, self.b_hh, self.w_hr, self.packed,
                                 &x[0, 0], &h[0, 0, 0], &c[0, 0, 0], batch, work)
            elif floating is float and gemv:   # a team of one
                _step_layers_team(self.n_layers, self.input_size, self.hidden, self.proj,
                                  self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr, NULL,
                                  &x[0, 0], &h[0, 0, 0], &c[0, 0, 0], batch, work, &bar)
            else:
                _step_layers_one(self.n_layers, self.input_size, self.hidden, self.proj, self.w_ih,
                                 self.w_hh, self.b_ih, self.b_hh, self.w_hr, NULL, &x[0, 0],
                                 &h[0, 0, 0], &c[0, 0, 0], batch, work)
        if key != 0:
            if choice & 2:
                lf_split_record(key, choice, lf_ticks() - ticks, 1)
            lf_split_ended(key)
        free(work)


cdef void _step_layers_one(int n_layers, Py_ssize_t input_size, Py_ssize_t H, Py_ssize_t P,
                           void** w_ih_k, void** w_hh_k, void** b_ih_k, void** b_hh_k,
                           void** w_hr_k, const float** packed, const floating* x, floating* h,
                           floating* c, Py_ssize_t batch, floating* work) noexcept nogil:
    # one thread. packed (float32: a frozen model's weights as pack_weights lays them out): the
    # sequence kernel's products (one FMA chain over k per output) and cell, so the bits of m(x)
    # for this step, and of each row alone. Else BLAS products: float64, the portable path, and
    # more than STEP_GEMV_MAX_ROWS rows of a live model
    cdef Py_ssize_t H_out = P if P > 0 else H, four_h = 4 * H
    cdef floating* gx = work                       # (B, 4H) x @ W_ih.T
    cdef floating* gh = gx + batch * four_h        # (B, 4H) h @ W_hh.T
    cdef floating* bias = gh + batch * four_h      # (4H,)  b_ih + b_hh
    cdef floating* hraw = bias + four_h            # (B, H) o*tanh(c), before the projection
    cdef const floating* inp = x
    cdef Py_ssize_t k, r, in_size
    cdef floating* h_k
    cdef floating* c_k
    cdef const floating* w_ih
    cdef const floating* w_hh
    cdef const float* pk_hh = NULL
    for k in range(n_layers):
        in_size = input_size if k == 0 else H_out
        h_k = h + k * batch * H_out
        c_k = c + k * batch * H
        w_ih = <const floating*> w_ih_k[k]
        w_hh = <const floating*> w_hh_k[k]
        _bias_sum(<const floating*> b_ih_k[k], <const floating*> b_hh_k[k], 0, four_h, bias)
        if floating is float and packed != NULL:
            pk_hh = packed[k] + lf_pack_len(four_h, in_size)
            lf_pgemm(batch, 0, four_h, in_size, inp, in_size, packed[k], gx, four_h, 0)
            lf_pgemm(batch, 0, four_h, H_out, h_k, H_out, pk_hh, gh, four_h, 0)
        elif batch == 1:
            gemv_rm(c'N', <int> four_h, <int> in_size, <floating> 1, w_ih, <int> in_size, inp,
                    <floating> 0, gx)
            gemv_rm(c'N', <int> four_h, <int> H_out, <floating> 1, w_hh, <int> H_out, h_k,
                    <floating> 0, gh)
        else:
            gemm_rm(c'T', <int> batch, <int> four_h, <int> in_size, <floating> 1, inp, <int> in_size,
                    w_ih, <int> in_size, <floating> 0, gx, <int> four_h)
            gemm_rm(c'T', <int> batch, <int> four_h, <int> H_out, <floating> 1, h_k, <int> H_out,
                    w_hh, <int> H_out, <floating> 0, gh, <int> four_h)
        for r in range(batch):
            cell_row_standard(H, gh + r * four_h, gx + r * four_h, bias, c_k + r * H,
                              (hraw + r * H) if P > 0 else (h_k + r * H_out))
        if P > 0:
            if floating is float and packed != NULL:
                lf_pgemm(batch, 0, P, H, hraw, H, pk_hh + lf_pack_len(four_h, H_out), h_k, P, 0)
            elif batch == 1:
                gemv_rm(c'N', <int> P, <int> H, <floating> 1, <const floating*> w_hr_k[k],
                        <int> H, hraw, <floating> 0, h_k)
            else:
                gemm_rm(c'T', <int> batch, <int> P, <int> H, <floating> 1, hraw, <int> H,
                        <const floating*> w_hr_k[k], <int> H, <floating> 0, h_k, <int> P)
        inp = h_k


cdef inline void _bias_sum(const floating* b_ih, const floating* b_hh, Py_ssize_t j0, Py_ssize_t j1,
                           floating* bias) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(j0, j1):
        bias[j] = (b_ih[j] + b_hh[j]) if b_ih != NULL else 0


cdef inline void _gate_products(Py_ssize_t u0, Py_ssize_t u1, Py_ssize_t H, Py_ssize_t in_size,
                                Py_ssize_t H_out, const float* w_ih, const float* w_hh,
                                const float* inp, const float* h_k, Py_ssize_t batch, float* gx,
                                float* gh) noexcept nogil:
    # units u0..u1 (u0 a multiple of 16) of each gate's rows: lf_gemv_rows tiles them from g*H + u0
    # in fours, the same tiles whichever split of the units asks
    cdef Py_ssize_t g, j0
    if u0 == 0 and u1 == H and H % 4 == 0:   # the same tiles in one call (8 calls: +5 % at H=64)
        lf_gemv_rows(4 * H, in_size, w_ih, in_size, inp, in_size, batch, gx, 4 * H)
        lf_gemv_rows(4 * H, H_out, w_hh, H_out, h_k, H_out, batch, gh, 4 * H)
        return
    for g in range(4):
        j0 = g * H + u0
        lf_gemv_rows(u1 - u0, in_size, w_ih + j0 * in_size, in_size, inp, in_size, batch, gx + j0, 4 * H)
        lf_gemv_rows(u1 - u0, H_out, w_hh + j0 * H_out, H_out, h_k, H_out, batch, gh + j0, 4 * H)


cdef inline Py_ssize_t _team_share(Py_ssize_t n, int rank, int team, Py_ssize_t unit) noexcept nogil:
    # thread `rank`'s first row of n, in whole groups of `unit`: 16 (the cell's vectors; 4 product
    # rows of lf_gemv_rows) or 32 (a packed panel's columns)
    cdef Py_ssize_t groups = (n + unit - 1) // unit
    cdef Py_ssize_t per = (groups + team - 1) // team
    cdef Py_ssize_t start = rank * per * unit
    return start if start < n else n


cdef void _step_layers_team(int n_layers, Py_ssize_t input_size, Py_ssize_t H, Py_ssize_t P,
                            void** w_ih_k, void** w_hh_k, void** b_ih_k, void** b_hh_k,
                            void** w_hr_k, const float** packed, const float* x, float* h,
                            float* c, Py_ssize_t batch, float* work, lf_barrier* bar) noexcept nogil:
    # float32 on lf_gemv_rows (packed NULL: a live model) or on the panels packed at freeze (H a
    # multiple of 32: whole panels per gate), run by one thread of a team (or alone, a team of
    # one): its share of the hidden units (all four gates' rows of them, then their cells) and
    # of the projection's rows; barriers where a thread reads what the others wrote (h of the
    # layer, whole). Each output is summed in the same order whatever the team.
    cdef int team = lf_team_size(), rank = lf_team_rank()
    cdef Py_ssize_t H_out = P if P > 0 else H, four_h = 4 * H
    cdef float* gx = work
    cdef float* gh = gx + batch * four_h
    cdef float* bias = gh + batch * four_h
    cdef float* hraw = bias + four_h
    cdef const float* inp = x
    cdef Py_ssize_t unit = 32 if packed != NULL else 16
    cdef Py_ssize_t u0 = _team_share(H, rank, team, unit), u1 = _team_share(H, rank + 1, team, unit)
    cdef Py_ssize_t p0 = _team_share(P, rank, team, unit), p1 = _team_share(P, rank + 1, team, unit)
    cdef Py_ssize_t k, r, g, in_size
    cdef float* h_k
    cdef float* c_k
    cdef const float* pk_hh = NULL
    for k in range(n_layers):
        in_size = input_size if k == 0 else H_out
        h_k = h + k * batch * H_out
        c_k = c + k * batch * H
        for g in range(4):
            _bias_sum(<const float*> b_ih_k[k], <const float*> b_hh_k[k], g * H + u0, g * H + u1,
                      bias)
        if packed != NULL:
            pk_hh = packed[k] + lf_pack_len(four_h, in_size)
            if u1 > u0:
                for g in range(4):
                    lf_pgemm(batch, g * H + u0, u1 - u0, in_size, inp, in_size, packed[k], gx,
                             four_h, 0)
                    lf_pgemm(batch, g * H + u0, u1 - u0, H_out, h_k, H_out, pk_hh, gh, four_h, 0)
        elif u1 > u0:
            _gate_products(u0, u1, H, in_size, H_out, <const float*> w_ih_k[k],
                           <const float*> w_hh_k[k], inp, h_k, batch, gx, gh)
        lf_barrier_wait(bar, team)       # every unit of h_k read before any is written
        if u1 > u0:
            for r in range(batch):
                lf_cell_units_simd(H, u0, u1, gh + r * four_h, gx + r * four_h, bias, c_k + r * H,
                                   (hraw + r * H) if P > 0 else (h_k + r * H_out), NULL, NULL)
        lf_barrier_wait(bar, team)       # the layer's h (or h_raw) whole
        if P > 0:
            if p1 > p0 and packed != NULL:
                lf_pgemm(batch, p0, p1 - p0, H, hraw, H, pk_hh + lf_pack_len(four_h, H_out), h_k,
                         P, 0)
            elif p1 > p0:
                lf_gemv_rows(p1 - p0, H, <const float*> w_hr_k[k] + p0 * H, H, hraw, H, batch,
                             h_k + p0, P)
            lf_barrier_wait(bar, team)
        inp = h_k


def _set_kernel(int isa, dict params):
    """This module's copy of the kernel path and parameters (see _forward._set_kernel)."""
    return lf_set_kernel(isa, params["tile_rows"], params["kc"], params["kc_narrow"])


from lstm_fast import _cpu as _cpu_module
_set_kernel(*_cpu_module.kernel_settings())
