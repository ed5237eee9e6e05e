# Gate math of one LSTM cell, inline and nogil, for float and double.
# Internal gate order along the 4H axis is torch's: [i | f | g | o].
# Arithmetic stays in the array's own precision (typed constants: a bare 1.0 would promote
# float math to double and change both speed and bits).
from cython cimport floating
from libc.math cimport exp, expf, tanh, tanhf, log1p, log1pf, fabs, fabsf

# Activation codes, shared with lstm_fast/_activations.py (ONNX names).
cdef enum:
    ACT_SIGMOID = 0
    ACT_TANH = 1
    ACT_RELU = 2
    ACT_AFFINE = 3
    ACT_LEAKY_RELU = 4
    ACT_THRESHOLDED_RELU = 5
    ACT_SCALED_TANH = 6
    ACT_HARD_SIGMOID = 7
    ACT_ELU = 8
    ACT_SOFTSIGN = 9
    ACT_SOFTPLUS = 10


ctypedef struct CellSpec:
    # Everything beyond the standard cell: ONNX's activations (f for i/f/o, g for the candidate,
    # h for the output), pre-activation clip, coupled input-forget gate, peepholes.
    int standard            # 1: sigmoid/tanh/tanh, no clip, no peephole, no coupling (the fast path)
    int act[3]
    double alpha[3]
    double beta[3]
    double clip             # > 0: clamp every gate pre-activation to [-clip, clip]
    int input_forget        # 1: f = 1 - i
    int has_peephole        # 1: peephole weights [p_i | p_f | p_o], each (H,)



cdef extern from *:
    """
    /* float32 exp/sigmoid/tanh written so that gcc -O3 vectorises the gate loops (libm's expf and
       tanhf are scalar calls). exp: x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by
       its Taylor series to r^7 (truncation < 6e-9 relative), 2^n built in the exponent bits.
       Clamping x to [-87, 88] keeps 2^n a normal float; comparisons are written so NaN passes through. */
    #include <stdint.h>
    #include <math.h>
    /* x = n*ln2 + r; returns p(r) with e^r = 1 + r + p(r) r^2 */
    static inline float lf_exp_reduced(float x, float* n_out, float* r_out) {
        /* round to nearest by adding and removing 1.5 * 2^23 (vectorises, unlike floorf's libm call) */
        float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
        float r = x - n * 0.693359375f;
        r = r - n * -2.12194440e-4f;
        float p = 1.98412698e-4f;             /* 1/5040 */
        p = p * r + 1.38888889e-3f;           /* 1/720 */
        p = p * r + 8.33333333e-3f;           /* 1/120 */
        p = p * r + 4.16666667e-2f;           /* 1/24 */
        p = p * r + 1.66666667e-1f;           /* 1/6 */
        *n_out = n;
        *r_out = r;
        return p * r + 0.5f;
    }
    static inline float lf_pow2f(float n) {   /* 2^n for a whole n in [-126, 127] */
        union { int32_t i; float f; } scale;
        scale.i = ((int32_t) n + 127) << 23;
        return scale.f;
    }
    static inline float lf_expf(float x) {
        x = x > 88.0f ? 88.0f : x;
        x = x < -87.0f ? -87.0f : x;
        float n, r;
        float p = lf_exp_reduced(x, &n, &r);
        return (p * r * r + r + 1.0f) * lf_pow2f(n);
    }
    static inline float lf_sigmoidf(float x) {
        return 1.0f / (1.0f + lf_expf(-x));
    }
    static inline float lf_tanhf(float x) {
        /* sign(x) * m / (m + 2), m = e^(2|x|) - 1 = 2^n (e^r - 1) + (2^n - 1): e^r - 1 keeps its
           relative accuracy near 0 (no cancellation, no second formula for small |x|).
           2|x| is clamped to 20, where tanh is 1.0f; NaN fails the comparison and passes. */
        float a = 2.0f * fabsf(x);
        a = a > 20.0f ? 20.0f : a;
        float n, r;
        float p = lf_exp_reduced(a, &n, &r);
        float scale = lf_pow2f(n);
        float m = (p * r * r + r) * scale + (scale - 1.0f);
        return copysignf(m / (m + 2.0f), x);
    }
    static inline double lf_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

    /* One row of the cell update, gates = gh + gx + bias in blocks [i|f|g|o] of `hidden` each:
       c = f*c + i*g; h_raw = o*tanh(c). Written in C for `restrict` (Cython has no such
       keyword): without it gcc must assume the rows overlap and does not vectorise the loop.
       When gates_out is not NULL it also keeps the activated gates and c_t for backward. */
    #define LF_CELL_GATES(T, SIG, TANH)                                                         \
        T gi = SIG(gh[j] + gx[j] + bias[j]);                                                   \
        T gf = SIG(gh[hidden + j] + gx[hidden + j] + bias[hidden + j]);                        \
        T gg = TANH(gh[2 * hidden + j] + gx[2 * hidden + j] + bias[2 * hidden + j]);           \
        T go = SIG(gh[3 * hidden + j] + gx[3 * hidden + j] + bias[3 * hidden + j]);            \
        T cn = gf * c[j] + gi * gg;                                                            \
        c[j] = cn;                                                                             \
        h_raw[j] = go * TANH(cn);
    #define LF_CELL_ROW(T, SUFFIX, SIG, TANH)                                                   \
    static inline void lf_cell_row_##SUFFIX(Py_ssize_t hidden, const T* restrict gh,           \
            const T* restrict gx, const T* restrict bias, T* restrict c, T* restrict h_raw) {  \
        for (Py_ssize_t j = 0; j < hidden; j++) {                                              \
            LF_CELL_GATES(T, SIG, TANH)                                                        \
        }                                                                                      \
    }                                                                                          \
    static inline void lf_cell_row_cached_##SUFFIX(Py_ssize_t hidden, const T* restrict gh,    \
            const T* restrict gx, const T* restrict bias, T* restrict c, T* restrict h_raw,    \
            T* restrict gates_out, T* restrict c_out) {                                        \
        for (Py_ssize_t j = 0; j < hidden; j++) {                                              \
            LF_CELL_GATES(T, SIG, TANH)                                                        \
            gates_out[j] = gi;                                                                 \
            gates_out[hidden + j] = gf;                                                        \
            gates_out[2 * hidden + j] = gg;                                                    \
            gates_out[3 * hidden + j] = go;                                                    \
            c_out[j] = cn;                                                                     \
        }                                                                                      \
    }
    /* y = W x for a row-major W given as its transpose wt (k, n): y = sum_p x[p] * wt[p, :], a
       sequence of contiguous axpys that gcc vectorises without reassociating any sum (a dot
       product per output would need -ffast-math). For batch-1 steps, where BLAS's call overhead
       is a large part of a ~1 us step. */
    #define LF_MATVEC_T(T, SUFFIX)                                                              \
    static inline void lf_matvec_t_##SUFFIX(Py_ssize_t k, Py_ssize_t n, const T* restrict wt,  \
            const T* restrict x, T* restrict y) {                                              \
        Py_ssize_t p = 0;                                                                      \
        for (Py_ssize_t j = 0; j < n; j++) y[j] = 0;                                           \
        for (; p + 4 <= k; p += 4) {   /* four rows per pass: a quarter of the y traffic */     \
            const T a0 = x[p], a1 = x[p + 1], a2 = x[p + 2], a3 = x[p + 3];                    \
            const T* restrict r0 = wt + p * n;                                                 \
            const T* restrict r1 = r0 + n;                                                     \
            const T* restrict r2 = r1 + n;                                                     \
            const T* restrict r3 = r2 + n;                                                     \
            for (Py_ssize_t j = 0; j < n; j++)                                                 \
                y[j] += (a0 * r0[j] + a1 * r1[j]) + (a2 * r2[j] + a3 * r3[j]);                 \
        }                                                                                      \
        for (; p < k; p++) {                                                                   \
            const T a = x[p];                                                                  \
            const T* restrict row = wt + p * n;                                                \
            for (Py_ssize_t j = 0; j < n; j++) y[j] += a * row[j];                             \
        }                                                                                      \
    }
    LF_MATVEC_T(float, f32)
    LF_MATVEC_T(double, f64)
    LF_CELL_ROW(float, f32, lf_sigmoidf, lf_tanhf)
    LF_CELL_ROW(double, f64, lf_sigmoid, tanh)
    """
    float lf_expf(float x) noexcept nogil
    float lf_sigmoidf(float x) noexcept nogil
    float lf_tanhf(float x) noexcept nogil
    void lf_matvec_t_f32(Py_ssize_t, Py_ssize_t, const float*, const float*, float*) noexcept nogil
    void lf_matvec_t_f64(Py_ssize_t, Py_ssize_t, const double*, const double*, double*) noexcept nogil
    void lf_cell_row_f32(Py_ssize_t, const float*, const float*, const float*, float*, float*) noexcept nogil
    void lf_cell_row_f64(Py_ssize_t, const double*, const double*, const double*, double*, double*) noexcept nogil
    void lf_cell_row_cached_f32(Py_ssize_t, const float*, const float*, const float*, float*, float*,
                                float*, float*) noexcept nogil
    void lf_cell_row_cached_f64(Py_ssize_t, const double*, const double*, const double*, double*,
                                double*, double*, double*) noexcept nogil


cdef extern from "lf_cell_avx512.h" nogil:
    int lf_pgemm_available()
    void lf_cell_row_simd(size_t hidden, const float* gh, const float* gx, const float* bias,
                          float* c, float* h_raw, float* gates_out, float* c_out)
    void lf_cell_units_simd(size_t hidden, size_t u0, size_t u1, const float* gh,
                            const float* gx, const float* bias, float* c, float* h_raw,
                              float* gates_out, float* c_out)


cdef inline floating sigmoid(floating x) noexcept nogil:
    # 1 / (1 + e^-x): never NaN from finite x (e^-x is clamped for float, inf -> 0 for double)
    cdef floating one = 1
    if floating is float:
        return lf_sigmoidf(x)
    else:
        return one / (one + exp(-x))


cdef inline floating tanh_(floating x) noexcept nogil:
    if floating is float:
        return lf_tanhf(x)
    else:
        return tanh(x)


cdef inline floating activate(int code, floating x, double alpha, double beta) noexcept nogil:
    # ONNX activation functions with their alpha/beta (operator spec, LSTM section)
    cdef floating zero = 0
    cdef floating one = 1
    cdef floating a = <floating> alpha
    cdef floating b = <floating> beta
    cdef floating r
    if code == ACT_SIGMOID:
        return sigmoid(x)
    if code == ACT_TANH:
        return tanh_(x)
    if code == ACT_RELU:
        return x if x > zero else zero
    if code == ACT_AFFINE:
        return a * x + b
    if code == ACT_LEAKY_RELU:
        return x if x >= zero else a * x
    if code == ACT_THRESHOLDED_RELU:
        return x if x > a else zero
    if code == ACT_SCALED_TANH:
        return a * tanh_(b * x)
    if code == ACT_HARD_SIGMOID:
        r = a * x + b
        return zero if r < zero else (one if r > one else r)
    if code == ACT_ELU:
        if x >= zero:
            return x
        if floating is float:
            return a * (expf(x) - one)
        else:
            return a * (exp(x) - one)
    if code == ACT_SOFTSIGN:
        if floating is float:
            return x / (one + fabsf(x))
        else:
            return x / (one + fabs(x))
    # ACT_SOFTPLUS: log(1 + e^x), written so that large x does not overflow
    if floating is float:
        return (x if x > zero else zero) + log1pf(expf(-fabsf(x)))
    else:
        return (x if x > zero else zero) + log1p(exp(-fabs(x)))


cdef inline void cell_row_standard(Py_ssize_t hidden, const floating* gh, const floating* gx,
                                   const floating* bias, floating* c, floating* h_raw) noexcept nogil:
    # gates = gh + gx + bias; c = f*c + i*g; h_raw = o*tanh(c). One pass over the row's 4H gates.
    if floating is float:
        if lf_pgemm_available():
            lf_cell_row_simd(hidden, gh, gx, bias, c, h_raw, NULL, NULL)
        else:
            lf_cell_row_f32(hidden, gh, gx, bias, c, h_raw)
    else:
        lf_cell_row_f64(hidden, gh, gx, bias, c, h_raw)


cdef inline void cell_row_cached(Py_ssize_t hidden, const floating* gh, const floating* gx,
                                 const floating* bias, floating* c, floating* h_raw,
                                 floating* gates_out, floating* c_out) noexcept nogil:
    # The standard cell, also keeping what backward needs: activated gates [i|f|g|o] and c_t.
    if floating is float:
        if lf_pgemm_available():
            lf_cell_row_simd(hidden, gh, gx, bias, c, h_raw, gates_out, c_out)
        else:
            lf_cell_row_cached_f32(hidden, gh, gx, bias, c, h_raw, gates_out, c_out)
    else:
        lf_cell_row_cached_f64(hidden, gh, gx, bias, c, h_raw, gates_out, c_out)


cdef inline floating _clip(floating x, double clip) noexcept nogil:
    cdef floating lim = <floating> clip
    if clip > 0:
        if x > lim:
            return lim
        if x < -lim:
            return -lim
    return x


cdef inline void cell_row_general(const CellSpec* spec, Py_ssize_t hidden, const floating* gh,
                                  const floating* gx, const floating* bias, const floating* peephole,
                                  floating* c, floating* h_raw) noexcept nogil:
    # ONNX's cell: peepholes i += p_i*c_prev, f += p_f*c_prev, o += p_o*c_new; clip before each
    # activation; f = 1 - i when input_forget.
    cdef Py_ssize_t j
    cdef floating zi, zf, zg, zo, gi, gf, gg, go, cp, cn
    cdef floating one = 1
    for j in range(hidden):
        cp = c[j]
        zi = gh[j] + gx[j] + bias[j]
        zf = gh[hidden + j] + gx[hidden + j] + bias[hidden + j]
        zg = gh[2 * hidden + j] + gx[2 * hidden + j] + bias[2 * hidden + j]
        zo = gh[3 * hidden + j] + gx[3 * hidden + j] + bias[3 * hidden + j]
        if spec.has_peephole:
            zi = zi + peephole[j] * cp
            zf = zf + peephole[hidden + j] * cp
        gi = activate(spec.act[0], _clip(zi, spec.clip), spec.alpha[0], spec.beta[0])
        if spec.input_forget:
            gf = one - gi
        else:
            gf = activate(spec.act[0], _clip(zf, spec.clip), spec.alpha[0], spec.beta[0])
        gg = activate(spec.act[1], _clip(zg, spec.clip), spec.alpha[1], spec.beta[1])
        cn = gf * cp + gi * gg
        if spec.has_peephole:
            zo = zo + peephole[2 * hidden + j] * cn
        go = activate(spec.act[0], _clip(zo, spec.clip), spec.alpha[0], spec.beta[0])
        c[j] = cn
        h_raw[j] = go * activate(spec.act[2], cn, spec.alpha[2], spec.beta[2])
