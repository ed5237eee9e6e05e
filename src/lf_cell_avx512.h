/* The standard LSTM cell row (torch's gate order [i|f|g|o]) in AVX-512, chosen at run time like
   lf_pgemm.h. Same formulas as lf_expf/lf_sigmoidf/lf_tanhf in _gates.pxd, 16 units at a time,
   except the divisions: a 14-bit reciprocal estimate refined by one Newton step (relative error
   below 2^-27, within a float ulp of the quotient) instead of vdivps, the slowest instruction of
   the cell (five divisions a unit). */
#ifndef LF_CELL_AVX512_H
#define LF_CELL_AVX512_H

#include "lf_pgemm.h"

/* e^x = 2^n e^r: x = n ln2 + r with ln2 split in two (Cody-Waite: n * LN2_HI is exact), e^r =
   1 + r + r^2 p(r) with p's Taylor coefficients 1/5040 ... 1/2 (e^r to r^7); the shifter rounds
   x log2(e) to a whole n. The AVX-512 and AVX2 cells' constants, those of _gates.pxd's lf_expf. */
#define LF_EXP_SHIFTER 12582912.0f
#define LF_EXP_LOG2E 1.44269504088896341f
#define LF_EXP_LN2_HI 0.693359375f
#define LF_EXP_LN2_LO -2.12194440e-4f
#define LF_EXP_P0 1.98412698e-4f
#define LF_EXP_P1 1.38888889e-3f
#define LF_EXP_P2 8.33333333e-3f
#define LF_EXP_P3 4.16666667e-2f
#define LF_EXP_P4 1.66666667e-1f
#define LF_EXP_P5 0.5f

#if LF_PGEMM_X86
#define LF_AVX512 __attribute__((target("avx512f"), always_inline)) static inline

LF_AVX512 __m512 lf_recip512(__m512 d) {
    __m512 r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r, r);
}

/* x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2); p(r) with e^r = 1 + r + p(r) r^2 (Taylor
   to r^7), for cnt vectors stage by stage: the cell's chains side by side in the instruction
   stream, where the out-of-order window sees them (chain after chain, a dozen long dependent
   chains a pair left the FMA pipes a third idle: AMD EPYC Zen 4). x must lie in [-87, 88]. */
LF_AVX512 void lf_exp_reduced512_n(const __m512* x, __m512* n, __m512* r, __m512* p, int cnt) {
    const __m512 shifter = _mm512_set1_ps(LF_EXP_SHIFTER);
    for (int i = 0; i < cnt; i++)
        n[i] = _mm512_sub_ps(_mm512_fmadd_ps(x[i], _mm512_set1_ps(LF_EXP_LOG2E), shifter), shifter);
    for (int i = 0; i < cnt; i++)
        r[i] = _mm512_fnmadd_ps(n[i], _mm512_set1_ps(LF_EXP_LN2_HI), x[i]);
    for (int i = 0; i < cnt; i++)
        r[i] = _mm512_fnmadd_ps(n[i], _mm512_set1_ps(LF_EXP_LN2_LO), r[i]);
    for (int i = 0; i < cnt; i++)
        p[i] = _mm512_fmadd_ps(_mm512_set1_ps(LF_EXP_P0), r[i], _mm512_set1_ps(LF_EXP_P1));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(LF_EXP_P2));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(LF_EXP_P3));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(LF_EXP_P4));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(LF_EXP_P5));
}

/* sigmoid(x) = 1 / (1 + e^-x): the argument of e, -x clamped to [-87, 88] (min/max with the
   constant first return x when x is NaN, so NaN passes through) */
LF_AVX512 __m512 lf_sigmoid512_arg(__m512 x) {
    __m512 t = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_sub_ps(_mm512_setzero_ps(), x));
    return _mm512_max_ps(_mm512_set1_ps(-87.0f), t);
}
LF_AVX512 __m512 lf_sigmoid512_end(__m512 n, __m512 r, __m512 p) {
    __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    /* e^r * 2^n in one instruction: n is a whole number in [-126, 127] here, so this is the same
       exact product as multiplying by a float built from n's exponent bits */
    e = _mm512_scalef_ps(e, n);
    return lf_recip512(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* tanh(x) = sign(x) * m / (m + 2) with m = e^(2|x|) - 1 = 2^n (e^r - 1) + (2^n - 1): e^r - 1 keeps
   its relative accuracy near 0, so no second polynomial for small |x| (9.0 -> 5.4 ns per 16
   values, worst error 5.5 -> 2.9 ulp over every 7th float in [1e-30, 30]). 2|x| is clamped to
   20, where tanh is 1.0f; NaN passes the min. */
LF_AVX512 __m512 lf_tanh512_arg(__m512 x, __m512* sign) {
    *sign = _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(x), _mm512_set1_epi32((int) 0x80000000u)));
    __m512 ax = _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
    return _mm512_min_ps(_mm512_set1_ps(20.0f), _mm512_add_ps(ax, ax));
}
LF_AVX512 __m512 lf_tanh512_end(__m512 n, __m512 r, __m512 p, __m512 sign) {
    __m512 em_r = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r);
    __m512 two_n = _mm512_scalef_ps(_mm512_set1_ps(1.0f), n);
    __m512 m = _mm512_fmadd_ps(em_r, two_n, _mm512_sub_ps(two_n, _mm512_set1_ps(1.0f)));
    __m512 t = _mm512_mul_ps(m, lf_recip512(_mm512_add_ps(m, _mm512_set1_ps(2.0f))));
    return _mm512_castsi512_ps(_mm512_or_epi32(_mm512_castps_si512(t), _mm512_castps_si512(sign)));
}

#define LF_LOAD(v, p) (masked ? _mm512_maskz_loadu_ps(m[v], (p)) : _mm512_loadu_ps(p))
#define LF_STORE(v, p, x) (masked ? _mm512_mask_storeu_ps((p), m[v], (x)) : _mm512_storeu_ps((p), (x)))

/* the first pass over units j..j+32 of a row (two vectors): the eight gate functions side by
   side, c = f*c + i*g; h_raw keeps o until the second pass. masked (a constant after inlining):
   only the lanes of m[v] are read and written, for the end of a range. */
LF_AVX512 void lf_cell_gates_pair(const int masked, const __mmask16* m, size_t hidden, size_t j,
                                  const float* gh, const float* gx, const float* bias, float* c,
                                  float* h_raw, float* gates_out, float* c_out) {
    /* slot s: gate q = s % 4 ([i|f|g|o]) of vector v = s / 4; g (q == 2) is a tanh */
    __m512 z[8], a[8], n[8], r[8], p[8], g[8], sign[8];
    for (int s = 0; s < 8; s++) {
        size_t o = (s % 4) * hidden + j + 16 * (s / 4);
        z[s] = _mm512_add_ps(_mm512_add_ps(LF_LOAD(s / 4, gh + o), LF_LOAD(s / 4, gx + o)),
                             LF_LOAD(s / 4, bias + o));
    }
    for (int s = 0; s < 8; s++)
        a[s] = s % 4 == 2 ? lf_tanh512_arg(z[s], &sign[s]) : lf_sigmoid512_arg(z[s]);
    lf_exp_reduced512_n(a, n, r, p, 8);
    for (int s = 0; s < 8; s++)
        g[s] = s % 4 == 2 ? lf_tanh512_end(n[s], r[s], p[s], sign[s]) : lf_sigmoid512_end(n[s], r[s], p[s]);
    for (int v = 0; v < 2; v++) {
        const size_t u = j + 16 * v;
        const __m512 cn = _mm512_fmadd_ps(g[4 * v + 1], LF_LOAD(v, c + u), _mm512_mul_ps(g[4 * v], g[4 * v + 2]));
        LF_STORE(v, c + u, cn);
        LF_STORE(v, h_raw + u, g[4 * v + 3]);
        if (gates_out != NULL) {
            for (int q = 0; q < 4; q++)
                LF_STORE(v, gates_out + q * hidden + u, g[4 * v + q]);
            LF_STORE(v, c_out + u, cn);
        }
    }
}

/* the second pass: h_raw = o * tanh(c) for cnt vectors from unit j, side by side */
LF_AVX512 void lf_cell_out_n(const int masked, const __mmask16* m, size_t j, const float* c,
                             float* h_raw, int cnt) {
    __m512 a[2], n[2], r[2], p[2], sign[2];
    for (int v = 0; v < cnt; v++)
        a[v] = lf_tanh512_arg(LF_LOAD(v, c + j + 16 * v), &sign[v]);
    lf_exp_reduced512_n(a, n, r, p, cnt);
    for (int v = 0; v < cnt; v++)
        LF_STORE(v, h_raw + j + 16 * v,
                 _mm512_mul_ps(LF_LOAD(v, h_raw + j + 16 * v), lf_tanh512_end(n[v], r[v], p[v], sign[v])));
}
#undef LF_LOAD
#undef LF_STORE

/* c = f*c + i*g, h_raw = o*tanh(c) with gates = gh + gx + bias; gates_out/c_out (or NULL) keep
   the activated gates and c_t for backward, for units u0..u1 of the row (u0 a multiple of 16, or
   0). The end of the range runs masked, so every unit takes the same lane-wise instructions
   whichever range holds it and whatever the hidden size: a split over threads keeps the bits.
   Two passes, gates then tanh(c), each with its chains side by side: the second pass's chains
   no longer wait behind the first's (Zen 4, C benchmark, 256 rows of 64 units: 31.0-34.6 ->
   25.9-30.2 ns per 16 units, the same bits). */
__attribute__((target("avx512f"))) static void
lf_cell_units_avx512(size_t hidden, size_t u0, size_t u1, const float* gh, const float* gx,
                     const float* bias, float* c, float* h_raw, float* gates_out, float* c_out) {
    const __mmask16 full[2] = {(__mmask16) 0xFFFF, (__mmask16) 0xFFFF};
    __mmask16 m[2] = {0, 0};
    size_t j = u0;
    for (; j + 32 <= u1; j += 32)
        lf_cell_gates_pair(0, full, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    if (j < u1) {
        for (int v = 0; v < 2; v++) {
            size_t left = u1 - j > 16 * (size_t) v ? u1 - j - 16 * v : 0;
            m[v] = left >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left) - 1u);
        }
        lf_cell_gates_pair(1, m, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    }
    for (j = u0; j + 32 <= u1; j += 32)
        lf_cell_out_n(0, full, j, c, h_raw, 2);
    if (j < u1)     /* m as above: the same j */
        lf_cell_out_n(1, m, j, c, h_raw, 2);
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
