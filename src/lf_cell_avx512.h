/* The standard LSTM cell row (torch's gate order [i|f|g|o]) in AVX-512, chosen at run time like
   lf_pgemm.h. Same formulas as lf_expf/lf_sigmoidf/lf_tanhf in _gates.pxd, 16 units at a time,
   except the divisions: a 14-bit reciprocal estimate refined by one Newton step (relative error
   below 2^-27, within a float ulp of the quotient) instead of vdivps, the slowest instruction of
   the cell (five divisions a unit). */
#ifndef LF_CELL_AVX512_H
#define LF_CELL_AVX512_H

#include "lf_pgemm.h"

#if LF_PGEMM_X86
#define LF_AVX512 __attribute__((target("avx512f"), always_inline)) static inline

LF_AVX512 __m512 lf_recip512(__m512 d) {
    __m512 r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r, r);
}

/* x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2); returns the polynomial p(r) with
   e^r = 1 + r + p(r) r^2 (Taylor to r^7). x must lie in [-87, 88]. */
LF_AVX512 __m512 lf_exp_reduced512(__m512 x, __m512* n, __m512* r) {
    __m512 shifter = _mm512_set1_ps(12582912.0f);
    *n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
    *r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(0.693359375f), x);
    *r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(-2.12194440e-4f), *r);
    __m512 p = _mm512_set1_ps(1.98412698e-4f);
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(1.38888889e-3f));
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(8.33333333e-3f));
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(4.16666667e-2f));
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(1.66666667e-1f));
    return _mm512_fmadd_ps(p, *r, _mm512_set1_ps(0.5f));
}

LF_AVX512 __m512 lf_exp512(__m512 x) {
    /* min/max with the constant first return x when x is NaN, so NaN passes through */
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    __m512 n, r;
    __m512 p = lf_exp_reduced512(x, &n, &r);
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    /* p * 2^n in one instruction: n is a whole number in [-126, 127] here, so this is the same
       exact product as multiplying by a float built from n's exponent bits */
    return _mm512_scalef_ps(p, n);
}

LF_AVX512 __m512 lf_sigmoid512(__m512 x) {
    return lf_recip512(_mm512_add_ps(_mm512_set1_ps(1.0f), lf_exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

LF_AVX512 __m512 lf_tanh512(__m512 x) {
    /* sign(x) * m / (m + 2) with m = e^(2|x|) - 1 = 2^n (e^r - 1) + (2^n - 1): e^r - 1 keeps its
       relative accuracy near 0, so no second polynomial for small |x| (9.0 -> 5.4 ns per 16
       values, worst error 5.5 -> 2.9 ulp over every 7th float in [1e-30, 30]). 2|x| is clamped to 20,
       where tanh is 1.0f; NaN passes the min. */
    __m512 sign = _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(x), _mm512_set1_epi32((int) 0x80000000u)));
    __m512 ax = _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
    __m512 a = _mm512_min_ps(_mm512_set1_ps(20.0f), _mm512_add_ps(ax, ax));
    __m512 n, r;
    __m512 p = lf_exp_reduced512(a, &n, &r);
    __m512 em_r = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r);
    __m512 two_n = _mm512_scalef_ps(_mm512_set1_ps(1.0f), n);
    __m512 m = _mm512_fmadd_ps(em_r, two_n, _mm512_sub_ps(two_n, _mm512_set1_ps(1.0f)));
    __m512 t = _mm512_mul_ps(m, lf_recip512(_mm512_add_ps(m, _mm512_set1_ps(2.0f))));
    return _mm512_castsi512_ps(_mm512_or_epi32(_mm512_castps_si512(t), _mm512_castps_si512(sign)));
}

/* units j..j+32 of a row (lf_cell_units_avx512), as two vectors of 16 whose independent chains
   (exp, reciprocal, tanh of c) fill each other's latencies. masked (a constant after inlining):
   only the lanes of m[v] are read and written, for the end of a range. */
LF_AVX512 void lf_cell_pair(const int masked, const __mmask16* m, size_t hidden, size_t j,
                            const float* gh, const float* gx, const float* bias, float* c,
                            float* h_raw, float* gates_out, float* c_out) {
#define LF_LOAD(v, p) (masked ? _mm512_maskz_loadu_ps(m[v], (p)) : _mm512_loadu_ps(p))
#define LF_STORE(v, p, x) (masked ? _mm512_mask_storeu_ps((p), m[v], (x)) : _mm512_storeu_ps((p), (x)))
    __m512 z[8], g[8], cn[2];
    for (int v = 0; v < 2; v++)
        for (int q = 0; q < 4; q++) {
            size_t o = q * hidden + j + 16 * v;
            z[4 * v + q] = _mm512_add_ps(_mm512_add_ps(LF_LOAD(v, gh + o), LF_LOAD(v, gx + o)),
                                         LF_LOAD(v, bias + o));
        }
    for (int q = 0; q < 4; q++)                  /* the two vectors' chains side by side */
        for (int v = 0; v < 2; v++)
            g[4 * v + q] = q == 2 ? lf_tanh512(z[4 * v + q]) : lf_sigmoid512(z[4 * v + q]);
    for (int v = 0; v < 2; v++)
        cn[v] = _mm512_fmadd_ps(g[4 * v + 1], LF_LOAD(v, c + j + 16 * v),
                                _mm512_mul_ps(g[4 * v], g[4 * v + 2]));
    for (int v = 0; v < 2; v++) {
        size_t u = j + 16 * v;
        LF_STORE(v, c + u, cn[v]);
        LF_STORE(v, h_raw + u, _mm512_mul_ps(g[4 * v + 3], lf_tanh512(cn[v])));
        if (gates_out != NULL) {
            for (int q = 0; q < 4; q++)
                LF_STORE(v, gates_out + q * hidden + u, g[4 * v + q]);
            LF_STORE(v, c_out + u, cn[v]);
        }
    }
#undef LF_LOAD
#undef LF_STORE
}

/* c = f*c + i*g, h_raw = o*tanh(c) with gates = gh + gx + bias; gates_out/c_out (or NULL) keep
   the activated gates and c_t for backward, for units u0..u1 of the row (u0 a multiple of 16, or
   0). The end of the range runs masked, so every unit takes the same lane-wise instructions
   whichever range holds it and whatever the hidden size: a split over threads keeps the bits.
   Two vectors at a time (lf_cell_pair): 37.2 -> 32.3 ns per 16 units here (C benchmark). */
__attribute__((target("avx512f"))) static void
lf_cell_units_avx512(size_t hidden, size_t u0, size_t u1, const float* gh, const float* gx,
                     const float* bias, float* c, float* h_raw, float* gates_out, float* c_out) {
    const __mmask16 full[2] = {(__mmask16) 0xFFFF, (__mmask16) 0xFFFF};
    size_t j = u0;
    for (; j + 32 <= u1; j += 32)
        lf_cell_pair(0, full, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    if (j < u1) {
        __mmask16 m[2];
        for (int v = 0; v < 2; v++) {
            size_t left = u1 - j > 16 * (size_t) v ? u1 - j - 16 * v : 0;
            m[v] = left >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left) - 1u);
        }
        lf_cell_pair(1, m, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    }
}

#include "lf_cell_avx2.h"

/* the cell of the path in use (lf_isa(): AVX-512 or AVX2; callers take the scalar loop on the
   generic path) */
static void lf_cell_units_simd(size_t hidden, size_t u0, size_t u1, const float* gh,
                               const float* gx, const float* bias, float* c, float* h_raw,
                               float* gates_out, float* c_out) {
    if (lf_isa() >= 2)
        lf_cell_units_avx512(hidden, u0, u1, gh, gx, bias, c, h_raw, gates_out, c_out);
    else
        lf_cell_units_avx2(hidden, u0, u1, gh, gx, bias, c, h_raw, gates_out, c_out);
}
static void lf_cell_row_simd(size_t hidden, const float* gh, const float* gx, const float* bias,
                             float* c, float* h_raw, float* gates_out, float* c_out) {
    lf_cell_units_simd(hidden, 0, hidden, gh, gx, bias, c, h_raw, gates_out, c_out);
}
#else
static void lf_cell_units_simd(size_t hidden, size_t u0, size_t u1, const float* gh,
                                 const float* gx, const float* bias, float* c, float* h_raw,
                                 float* gates_out, float* c_out) {
    (void) hidden; (void) u0; (void) u1; (void) gh; (void) gx; (void) bias; (void) c; (void) h_raw;
    (void) gates_out; (void) c_out;
}
static void lf_cell_row_simd(size_t hidden, const float* gh, const float* gx, const float* bias,
                             float* c, float* h_raw, float* gates_out, float* c_out) {
    (void) hidden; (void) gh; (void) gx; (void) bias; (void) c; (void) h_raw; (void) gates_out;
    (void) c_out;
}
#endif

#endif
