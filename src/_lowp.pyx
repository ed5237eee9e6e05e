"""Reduced-precision inference kernels (bfloat16, int8): packing at freeze, one layer per call.

The numerics and the packed layout are described in lf_lowp.h and docs/precision.md. IN/OUT rules
as _forward.pyx: C-contiguous float32 arrays whose shapes the Python layer (lstm_fast/_lstm.py)
has checked; h, c and y are written in place.
"""
from libc.stdint cimport int32_t, uint16_t, int8_t, uint8_t
from libc.stdlib cimport calloc, free, malloc

import numpy as np

from lstm_fast._aligned import zeros as aligned_zeros
cimport numpy as cnp

from _gates cimport cell_row_standard, lf_cell_units_simd, lf_pgemm_available
from _pgemm cimport lf_set_kernel, lf_isa
from _shapes cimport step_shapes_match

cnp.import_array()

cdef extern from "lf_lowp.h" nogil:
    enum:
        LF_LP_BF16
        LF_LP_INT8
        LF_PATH_GENERIC
        LF_PATH_AVX512
        LF_PATH_AMX
        LF_PATH_AMX_EMU
        LF_PATH_AVX512_FMA
        LF_PATH_AVX2_FMA
    ctypedef struct lf_lp_mat:
        int kind, n, k, kp, nb, bs
        const void* w
        const float* scale
        const int32_t* corr
        const void* w_row
    ctypedef void (*lf_cell_fn)(Py_ssize_t hidden, const float* gh, const float* gx,
                                const float* bias, float* c, float* h_raw) noexcept nogil
    ctypedef void (*lf_cell_units_fn)(Py_ssize_t hidden, Py_ssize_t u0, Py_ssize_t u1,
                                      const float* gh, const float* gx, const float* bias,
                                      float* c, float* h_raw) noexcept nogil
    ctypedef struct lf_lp_layer:
        int kind, path
        int T, B, n_in, H, P, Hout, D
        const lf_lp_mat* ih[2]
        const lf_lp_mat* hh[2]
        const lf_lp_mat* hr[2]
        const float* bias
        const float* x
        const Py_ssize_t* order
        const Py_ssize_t* lengths
        float* h
        float* c
        float* y
        int threads_proj, threads_rec, threads_split, threads_dirs
        size_t rows_max_bytes
        lf_cell_fn cell
        lf_cell_units_fn cell_units
    int lf_lp_kp(int kind, int k)
    int lf_lp_bs(int kind, int kp)
    void lf_lp_pack(int kind, int n, int k, const float* w, size_t ldw, void* packed, float* scale,
                    int32_t* corr)
    void lf_lp_pack_row_order(const lf_lp_mat* W, uint16_t* dst)
    int lf_lp_rows_amx_order(const lf_lp_mat* W, int rows, const void* A, float* out, size_t ldo)
    void lf_lp_quant_row(int kind, int k, int kp, const float* x, void* dst, float* sx)
    void lf_lp_quant_row_fast(int path, int kind, int k, int kp, const float* x, void* dst, float* sx)
    void lf_lp_gemm(int path, const lf_lp_mat* W, int rows, const void* A, const float* sx,
                    int b0, int b1, float* out, size_t ldo)
    int lf_lp_path_ok(int kind, int path)
    int lf_lp_cpu_bf16()
    int lf_lp_cpu_vnni()
    int lf_lp_cpu_amx()
    int lf_lp_cpu_fma512()
    int lf_lp_cpu_fma2()
    int lf_lp_cpu_avx2()
    int lf_lp_amx_granted()
    int lf_lp_layer_forward(const lf_lp_layer* L)
    long lf_lp_split_alone_forced
    int lf_lp_split_way_forced
    long lf_lp_split_runs
    long lf_lp_dir_runs
    long lf_lp_fused_runs
    long lf_lp_fused_blocks

KINDS = {"bfloat16": LF_LP_BF16, "int8": LF_LP_INT8}
PATHS = {"generic": LF_PATH_GENERIC, "avx512": LF_PATH_AVX512, "amx": LF_PATH_AMX,
         "amx_emulated": LF_PATH_AMX_EMU, "avx512_fma": LF_PATH_AVX512_FMA,
         "avx2_fma": LF_PATH_AVX2_FMA, "avx2": LF_PATH_AVX2_FMA}
# int8 sums stay exact in int32 up to this many inputs (255 * 127 * k < 2**31)
MAX_INT8_INPUTS = 65536
# Products per thread below which a second thread costs more than it saves, for the input
# projection (one parallel region: waking the team costs tens of microseconds under lstm_fast's
# GOMP_SPINCOUNT default, docs/threads.md) and for one recurrent step (three spin barriers a step,
# lf_split.h). Measured on the Intel Xeon family 6 model 207 of 2026-12-06 (1 and 2 threads,
# the bench grid): with 0.2 MFLOP a thread and OpenMP's barriers, 2 threads ran batch 16 2.5x
# slower than 1; with these, 2 threads are 0.95x-2.5x one thread on every grid row (batch 1:
# one thread throughout).
DEF MIN_PROJ_FLOPS_PER_THREAD = 16000000
DEF MIN_STEP_FLOPS_PER_THREAD = 1000000


cdef size_t ROWS_MAX_BYTES = 768 * 1024      # until _set_kernel gives lstm_fast._cpu.derive's


def _set_kernel(int isa, dict params):
    """This module's share of the derived parameters (lstm_fast._cpu.derive): the weights up to
    which a layer runs split by rows (lowp_rows_max_bytes), and its copy of the float32 path,
    which picks the cell after the products (AVX-512, AVX2 or scalar, as the float32 model's
    under the same LSTM_FAST_ISA). The products' path is chosen per call."""
    global ROWS_MAX_BYTES
    ROWS_MAX_BYTES = params["lowp_rows_max_bytes"]
    return lf_set_kernel(isa, params["tile_rows"], params["kc"], params["kc_narrow"])


def cpu_features():
    """What this CPU (and OS) offers the reduced-precision kernels."""
    return {"avx512_bf16": bool(lf_lp_cpu_bf16()), "avx512_vnni": bool(lf_lp_cpu_vnni()),
            "amx": bool(lf_lp_cpu_amx()), "avx512_fma": bool(lf_lp_cpu_fma512()),
            "avx2_fma": bool(lf_lp_cpu_fma2()), "avx2": bool(lf_lp_cpu_avx2()),
            "amx_granted": bool(lf_lp_amx_granted()) if lf_lp_cpu_amx() else False}


def cell_isa():
    """The float32 path of the cell after the products: 0 scalar, 1 AVX2, 2 AVX-512 (the float32
    model's, as capped by LSTM_FAST_ISA)."""
    return lf_isa()


def path_ok(str precision, str path):
    return bool(lf_lp_path_ok(KINDS[precision], PATHS[path]))


cdef class Packed:
    """One weight matrix (n, k) converted and packed once (see lf_lowp.h)."""
    cdef lf_lp_mat mat
    cdef readonly object data, scale, corr, row_data
    cdef readonly str precision

    def __cinit__(self, str precision, w, q=None, q_scale=None, bint row_order=False):
        """w (n, k) float32, converted as documented; or, for int8, the integers q (n, k) in
        -128..127 with one float32 scale per row, q_scale (n,), taken as they are (a graph's own
        quantized weights: w is then ignored). row_order (bfloat16): also the layout of the AMX
        path's one-row kernel (lf_lp_pack_row_order), as much memory again."""
        cdef int kind = KINDS[precision]
        cdef cnp.ndarray[float, ndim=2, mode="c"] w2
        if q is not None:
            q = np.asarray(q)
            if kind != LF_LP_INT8 or q.ndim != 2 or q.dtype.kind not in "iu":
                raise ValueError("q takes an (n, k) matrix of integers, for int8 only")
            w2 = np.zeros((1, 1), np.float32)
            n_, k_ = q.shape
        else:
            w2 = np.ascontiguousarray(w, dtype=np.float32)
            n_, k_ = w2.shape[0], w2.shape[1]
        cdef int n = n_, k = k_
        cdef int kp = lf_lp_kp(kind, k)
        cdef int nb = (n + 15) // 16
        cdef int bs = lf_lp_bs(kind, kp)
        self.precision = precision
        self.data = aligned_zeros(nb * bs, np.uint16 if kind == LF_LP_BF16 else np.int8)
        self.scale = np.zeros(nb * 16, np.float32)
        self.corr = np.zeros(nb * 16, np.int32)
        cdef cnp.ndarray data = self.data
        cdef float[::1] sc = self.scale
        cdef int32_t[::1] co = self.corr
        if q is not None:
            qi = q.astype(np.int64)
            if qi.size and (qi.min() < -128 or qi.max() > 127):
                raise ValueError("quantized weights must lie in -128..127 after their zero point")
            sw = np.asarray(q_scale, np.float32).reshape(-1)
            if sw.shape != (n,) or not np.isfinite(sw).all():
                raise ValueError(f"q_scale must hold {n} finite scales")
            # the packed layout of lf_lp_pack: [block of 16 rows][quad of k][16][4], blocks bs apart
            full = np.zeros((nb * 16, kp), np.int8)
            full[:n, :k] = qi
            self.data.reshape(nb, bs)[:, :16 * kp] = (
                full.reshape(nb, 16, kp // 4, 4).transpose(0, 2, 1, 3).reshape(nb, 16 * kp))
            self.scale[:n] = sw
            self.corr[:n] = (128 * qi.sum(axis=1)).astype(np.int32)
        else:
            with nogil:
                lf_lp_pack(kind, n, k, &w2[0, 0], k, cnp.PyArray_DATA(data), &sc[0], &co[0])
        for a in (self.data, self.scale, self.corr):
            a.flags.writeable = False
        self.mat.kind = kind
        self.mat.n = n
        self.mat.k = k
        self.mat.kp = kp
        self.mat.nb = nb
        self.mat.bs = bs
        self.mat.w = cnp.PyArray_DATA(data)
        self.mat.scale = &sc[0]
        self.mat.corr = &co[0]
        self.mat.w_row = NULL
        self.row_data = None
        cdef cnp.ndarray row_data
        if row_order and kind == LF_LP_BF16:
            row_data = aligned_zeros(nb * bs, np.uint16)
            lf_lp_pack_row_order(&self.mat, <uint16_t*> cnp.PyArray_DATA(row_data))
            row_data.flags.writeable = False
            self.row_data = row_data
            self.mat.w_row = cnp.PyArray_DATA(row_data)

    @property
    def shape(self):
        return (self.mat.n, self.mat.k)

    @property
    def nbytes(self):
        return self.data.nbytes

    def matmul(self, str path, a):
        """dequant(quant(a) . W^T) for rows of a (rows, k): the product the layer runs, for tests.
        path "amx_row": each row alone through the AMX path's one-row bfloat16 kernel (CPUs with
        AVX512-BF16)."""
        cdef bint one_row = path == "amx_row"
        cdef int p = PATHS[path] if not one_row else LF_PATH_AMX
        if one_row and not (self.mat.kind == LF_LP_BF16 and lf_lp_cpu_bf16()):
            raise ValueError("the amx_row kernel runs bfloat16 on CPUs with AVX512-BF16")
        if not one_row and not lf_lp_path_ok(self.mat.kind, p):
            raise ValueError(f"the {path} path cannot run {self.precision} on this CPU")
        cdef cnp.ndarray[float, ndim=2, mode="c"] a2 = np.ascontiguousarray(a, dtype=np.float32)
        if a2.shape[1] != self.mat.k:
            raise ValueError(f"a has {a2.shape[1]} columns, the matrix {self.mat.k}")
        cdef int rows = a2.shape[0], r
        cdef size_t es = 2 if self.mat.kind == LF_LP_BF16 else 1
        cdef cnp.ndarray qa = np.zeros(max(rows, 1) * self.mat.kp * es, np.uint8)
        cdef cnp.ndarray[float, ndim=1] sx = np.zeros(max(rows, 1), np.float32)
        cdef cnp.ndarray[float, ndim=2, mode="c"] out = np.zeros((rows, self.mat.n), np.float32)
        cdef char* qp = <char*> cnp.PyArray_DATA(qa)
        if rows == 0:
            return out
        with nogil:
            for r in range(rows):
                lf_lp_quant_row(self.mat.kind, self.mat.k, self.mat.kp, &a2[r, 0],
                                qp + r * self.mat.kp * es, &sx[r])
            if one_row:
                lf_lp_rows_amx_order(&self.mat, rows, qp, &out[0, 0], self.mat.n)
            else:
                lf_lp_gemm(p, &self.mat, rows, qp, &sx[0], 0, self.mat.nb, &out[0, 0], self.mat.n)
        return out


def quantize_rows(str precision, a, str path="generic"):
    """(quantized rows, scales) as the kernels make them: bf16 bits (uint16), or int8 q + 128
    (uint8) with s_x per row. For tests of the documented quantization; `path`: as the layer on
    that path converts its activations (the AVX-512 or VCVTNEPS2BF16 code where it has them)."""
    cdef int kind = KINDS[precision]
    cdef int p = PATHS[path]
    if not lf_lp_path_ok(kind, p):
        raise ValueError(f"the {path} path cannot run {precision} on this CPU")
    cdef cnp.ndarray[float, ndim=2, mode="c"] a2 = np.ascontiguousarray(a, dtype=np.float32)
    cdef int rows = a2.shape[0], k = a2.shape[1], r
    cdef int kp = lf_lp_kp(kind, k)
    q = np.zeros((rows, kp), np.uint16 if kind == LF_LP_BF16 else np.uint8)
    cdef cnp.ndarray qa = q
    cdef cnp.ndarray[float, ndim=1] sx = np.zeros(rows, np.float32)
    cdef char* qp = <char*> cnp.PyArray_DATA(qa)
    cdef size_t es = 2 if kind == LF_LP_BF16 else 1
    for r in range(rows):
        lf_lp_quant_row_fast(p, kind, k, kp, &a2[r, 0], qp + r * kp * es, &sx[r])
    return q[:, :k], sx


cdef void _cell(Py_ssize_t hidden, const float* gh, const float* gx, const float* bias,
                float* c, float* h_raw) noexcept nogil:
    # the float32 kernels' own cell update (AVX-512 where the CPU has it): gates = gh + gx + bias
    cell_row_standard(hidden, gh, gx, bias, c, h_raw)


cdef void _cell_units(Py_ssize_t hidden, Py_ssize_t u0, Py_ssize_t u1, const float* gh,
                      const float* gx, const float* bias, float* c, float* h_raw) noexcept nogil:
    # units u0..u1 of _cell's update (the same lanes: the same bits)
    lf_cell_units_simd(hidden, u0, u1, gh, gx, bias, c, h_raw, NULL, NULL)


def set_split_alone(long steps):
    """Tests: in split by units, the calling thread runs the first `steps` steps alone before
    the team shares the units (0: until the others have arrived, the default)."""
    global lf_lp_split_alone_forced
    lf_lp_split_alone_forced = steps


def set_split_way(str way):
    """Tests and tools: where the shapes allow split by units or by directions, "split" always
    takes it, "one" never, "measured" (the default) the faster as measured (lf_split_choose)."""
    global lf_lp_split_way_forced
    lf_lp_split_way_forced = {"measured": 0, "split": 1, "one": 2}[way]


def split_runs(str way="units"):
    """Tests: how many layer calls ran split by units ("units"), by directions ("directions") or
    with the fused batch-1 products ("fused", on any thread count) so far; "fused_blocks": the
    blocks of steps (in all threads) whose input projection those products carried."""
    return {"units": lf_lp_split_runs, "directions": lf_lp_dir_runs, "fused": lf_lp_fused_runs,
            "fused_blocks": lf_lp_fused_blocks}[way]


cdef inline int _threads_for(int n_threads, long items, double flops, double min_flops) noexcept nogil:
    cdef double by_work = flops / min_flops
    cdef long n = n_threads
    if items < n:
        n = items
    if by_work < n:
        n = <long> by_work
    return <int> (n if n > 1 else 1)


cdef void _set_weights(lf_lp_layer* L, int kind, int path, list ih, list hh, list hr) except *:
    """The layer's kind, path, direction count and packed matrices (kept alive by the lists)."""
    cdef int d
    cdef Packed pk
    L.kind = kind
    L.path = path
    L.D = len(ih)
    for d in range(L.D):
        pk = ih[d]
        L.ih[d] = &pk.mat
        pk = hh[d]
        L.hh[d] = &pk.mat
        if hr is not None:
            pk = hr[d]
            L.hr[d] = &pk.mat
        else:
            L.hr[d] = NULL
    L.cell = _cell
    # split by units takes the SIMD cell's unit ranges; the scalar cell (no AVX2) never splits
    L.cell_units = NULL
    if lf_pgemm_available():
        L.cell_units = _cell_units
    L.rows_max_bytes = ROWS_MAX_BYTES


cdef inline void _set_threads(lf_lp_layer* L, int n_threads) noexcept nogil:
    """Threads for the projection and the recurrence, from the shapes alone (so the same bits)."""
    cdef double G = 4.0 * L.H
    L.threads_proj = _threads_for(n_threads, L.D * L.T * L.B, 2.0 * L.D * L.T * L.B * G * L.n_in,
                                  MIN_PROJ_FLOPS_PER_THREAD)
    L.threads_rec = _threads_for(n_threads, L.D * ((4 * L.H + 127) // 128),
                                 2.0 * L.D * L.B * (G * L.Hout + L.P * L.H), MIN_STEP_FLOPS_PER_THREAD)
    # split by units (lf_lp_split_ok has the shapes): every thread, each its share of the panels
    L.threads_split = min(n_threads, L.H // 32)
    # two directions on two threads (lf_lp_layer_forward: where the row split is not taken)
    L.threads_dirs = 2 if n_threads == 2 and L.D == 2 else 0


def layer_forward(str precision, str path, const float[:, :, ::1] x, list ih, list hh, list hr,
                  const float[:, ::1] bias, const Py_ssize_t[::1] order, const Py_ssize_t[::1] lengths,
                  float[:, :, ::1] h, float[:, :, ::1] c, float[:, :, ::1] y, int n_threads):
    """One layer, all directions, over x (T, B, I): y (T, B, D*H_out) and (h, c) (D, B, *) in place."""
    cdef lf_lp_layer L
    cdef int kind = KINDS[precision]
    cdef int p = PATHS[path]
    # also asks the OS for the AMX tile state (once): a tile instruction before that is SIGILL
    if not lf_lp_path_ok(kind, p):
        raise ValueError(f"the {path} path cannot run {precision} on this CPU")
    _set_weights(&L, kind, p, ih, hh, hr)
    L.T = x.shape[0]
    L.B = x.shape[1]
    L.n_in = x.shape[2]
    L.H = c.shape[2]
    L.Hout = h.shape[2]
    L.P = L.Hout if hr is not None else 0
    L.bias = &bias[0, 0]
    L.x = &x[0, 0, 0]
    L.order = &order[0]
    L.lengths = &lengths[0]
    L.h = &h[0, 0, 0]
    L.c = &c[0, 0, 0]
    L.y = &y[0, 0, 0]
    _set_threads(&L, n_threads)
    cdef int rc
    with nogil:
        rc = lf_lp_layer_forward(&L)
    if rc != 0:
        raise MemoryError("the reduced-precision layer's work buffers")


cdef class StepPlan:
    """One streaming step through every layer of a one-direction model (FrozenLSTM.step), set up
    once: each layer is the sequence kernel's layer_forward with T = 1, the same bits, without
    its per-call arguments (about 2.5 us of a 6 us step of a small model: AMD EPYC Zen 4)."""
    cdef lf_lp_layer* layers
    cdef int n_layers, kind, path
    cdef readonly Py_ssize_t input_size, hidden, hidden_out
    cdef list keep

    def __cinit__(self, str precision, str path, list layers, Py_ssize_t input_size,
                  Py_ssize_t hidden, Py_ssize_t hidden_out):
        """layers: FrozenLSTM._lowp, (ih, hh, hr, bias) a layer with one direction each."""
        self.kind = KINDS[precision]
        self.path = PATHS[path]
        if not lf_lp_path_ok(self.kind, self.path):
            raise ValueError(f"the {path} path cannot run {precision} on this CPU")
        self.n_layers = len(layers)
        self.input_size, self.hidden, self.hidden_out = input_size, hidden, hidden_out
        self.keep = list(layers)
        self.layers = <lf_lp_layer*> calloc(max(self.n_layers, 1), sizeof(lf_lp_layer))
        if self.layers == NULL:
            raise MemoryError("the step plan")
        cdef const float[:, ::1] bias
        cdef lf_lp_layer* L
        for k, (ih, hh, hr, b) in enumerate(layers):
            if len(ih) != 1:
                raise ValueError("a step plan takes one direction a layer")
            L = &self.layers[k]
            _set_weights(L, self.kind, self.path, ih, hh, hr)
            bias = b
            if bias.shape[0] != 1 or bias.shape[1] != 4 * hidden:
                raise ValueError("the bias must be (1, 4 * hidden)")
            L.bias = &bias[0, 0]
            L.T = 1
            L.n_in = input_size if k == 0 else hidden_out
            L.H = hidden
            L.Hout = hidden_out
            L.P = hidden_out if hr is not None else 0

    def __dealloc__(self):
        free(self.layers)

    def run(self, const float[:, ::1] x,     # IN     (B, I) this step's input
            float[:, :, ::1] h,              # IN/OUT (L, B, H_out)
            float[:, :, ::1] c,              # IN/OUT (L, B, H)
            int n_threads=1):
        """One step: h, c updated in place (the output is h[-1])."""
        cdef Py_ssize_t batch = x.shape[0], r
        if not step_shapes_match(x.shape, h.shape, c.shape, self.input_size, self.n_layers,
                                 self.hidden_out, self.hidden):
            raise ValueError("x, h or c does not match the model's shapes")
        if batch == 0:
            return
        # lengths and order of a full batch, then each layer's output: the next layer's input
        cdef Py_ssize_t* rows = <Py_ssize_t*> malloc(2 * batch * sizeof(Py_ssize_t))
        cdef float* ys = <float*> malloc(2 * batch * self.hidden_out * sizeof(float))
        cdef int rc = 0, k
        cdef lf_lp_layer L
        if rows == NULL or ys == NULL:
            free(rows)
            free(ys)
            raise MemoryError("the step's work buffers")
        with nogil:
            for r in range(batch):
                rows[r] = r
                rows[batch + r] = 1
            for k in range(self.n_layers):
                L = self.layers[k]
                L.B = <int> batch
                L.x = &x[0, 0] if k == 0 else ys + ((k - 1) % 2) * batch * self.hidden_out
                L.y = ys + (k % 2) * batch * self.hidden_out
                L.order = rows
                L.lengths = rows + batch
                L.h = &h[k, 0, 0]
                L.c = &c[k, 0, 0]
                _set_threads(&L, n_threads)
                rc = lf_lp_layer_forward(&L)
                if rc != 0:
                    break
        free(rows)
        free(ys)
        if rc != 0:
            raise MemoryError("the reduced-precision layer's work buffers")


from lstm_fast import _cpu as _cpu_module
_set_kernel(*_cpu_module.kernel_settings())
