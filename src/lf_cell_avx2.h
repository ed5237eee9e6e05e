/* The standard LSTM cell row of lf_cell_avx512.h in AVX2 + FMA, 8 units a vector, two vectors
   at a time: the same formulas (exp's Cody-Waite reduction and Taylor polynomial, tanh as
   sign(x) m/(m+2)), with 2^n built in the exponent bits (no scalef) and a 12-bit reciprocal
   estimate refined by two Newton steps (one leaves up to 2^-22 relative error, two stay within
   the quotient's rounding). The end of a range runs masked (maskload/maskstore), so every unit
   takes the same lane-wise instructions whichever range holds it. Included from
   lf_cell_avx512.h inside its x86 section. */
#ifndef LF_CELL_AVX2_H
#define LF_CELL_AVX2_H

#define LF_AVX2C __attribute__((target("avx2,fma"), always_inline)) static inline

LF_AVX2C __m256 lf_recip256(__m256 d) {
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 r = _mm256_rcp_ps(d);
    r = _mm256_fmadd_ps(_mm256_fnmadd_ps(d, r, one), r, r);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(d, r, one), r, r);
}

/* 2^n for whole n in [-126, 127] */
LF_AVX2C __m256 lf_pow2_256(__m256 n) {
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}

/* lf_exp_reduced512_n in 256 bits: e^x's reduction and polynomial for cnt vectors, stage by
   stage across them */
LF_AVX2C void lf_exp_reduced256_n(const __m256* x, __m256* n, __m256* r, __m256* p, int cnt) {
    const __m256 shifter = _mm256_set1_ps(LF_EXP_SHIFTER);
    for (int i = 0; i < cnt; i++)
        n[i] = _mm256_sub_ps(_mm256_fmadd_ps(x[i], _mm256_set1_ps(LF_EXP_LOG2E), shifter), shifter);
    for (int i = 0; i < cnt; i++)
        r[i] = _mm256_fnmadd_ps(n[i], _mm256_set1_ps(LF_EXP_LN2_HI), x[i]);
    for (int i = 0; i < cnt; i++)
        r[i] = _mm256_fnmadd_ps(n[i], _mm256_set1_ps(LF_EXP_LN2_LO), r[i]);
    for (int i = 0; i < cnt; i++)
        p[i] = _mm256_fmadd_ps(_mm256_set1_ps(LF_EXP_P0), r[i], _mm256_set1_ps(LF_EXP_P1));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(LF_EXP_P2));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(LF_EXP_P3));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(LF_EXP_P4));
    for (int i = 0; i < cnt; i++)
        p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(LF_EXP_P5));
}

/* sigmoid(x) = 1 / (1 + e^-x): e's argument -x clamped to [-87, 88] (min/max with the constant
   first return x when x is NaN) */
LF_AVX2C __m256 lf_sigmoid256_arg(__m256 x) {
    __m256 t = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_sub_ps(_mm256_setzero_ps(), x));
    return _mm256_max_ps(_mm256_set1_ps(-87.0f), t);
}
LF_AVX2C __m256 lf_sigmoid256_end(__m256 n, __m256 r, __m256 p) {
    __m256 e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    e = _mm256_mul_ps(e, lf_pow2_256(n));
    return lf_recip256(_mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

LF_AVX2C __m256 lf_tanh256_arg(__m256 x, __m256* sign) {
    __m256 signbit = _mm256_castsi256_ps(_mm256_set1_epi32((int) 0x80000000u));
    *sign = _mm256_and_ps(x, signbit);
    __m256 ax = _mm256_andnot_ps(signbit, x);
    return _mm256_min_ps(_mm256_set1_ps(20.0f), _mm256_add_ps(ax, ax));
}
LF_AVX2C __m256 lf_tanh256_end(__m256 n, __m256 r, __m256 p, __m256 sign) {
    __m256 em_r = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r);
    __m256 two_n = lf_pow2_256(n);
    __m256 m = _mm256_fmadd_ps(em_r, two_n, _mm256_sub_ps(two_n, _mm256_set1_ps(1.0f)));
    __m256 t = _mm256_mul_ps(m, lf_recip256(_mm256_add_ps(m, _mm256_set1_ps(2.0f))));
    return _mm256_or_ps(t, sign);
}

#define LF_LOAD8(v, p) (masked ? _mm256_maskload_ps((p), m[v]) : _mm256_loadu_ps(p))
#define LF_STORE8(v, p, x) do { if (masked) _mm256_maskstore_ps((p), m[v], (x)); \
                                else _mm256_storeu_ps((p), (x)); } while (0)

/* lf_cell_gates_pair in 256 bits: units j..j+16 as two vectors of 8, the eight gate chains
   side by side; h_raw keeps o until lf_cell_out256_n. masked: only the lanes of m[v]. */
LF_AVX2C void lf_cell_gates_pair256(const int masked, const __m256i* m, size_t hidden, size_t j,
                                    const float* gh, const float* gx, const float* bias, float* c,
                                    float* h_raw, float* gates_out, float* c_out) {
    /* slot s: gate q = s % 4 ([i|f|g|o]) of vector v = s / 4; g (q == 2) is a tanh */
    __m256 z[8], a[8], n[8], r[8], p[8], g[8], sign[8];
    for (int s = 0; s < 8; s++) {
        size_t o = (s % 4) * hidden + j + 8 * (s / 4);
        z[s] = _mm256_add_ps(_mm256_add_ps(LF_LOAD8(s / 4, gh + o), LF_LOAD8(s / 4, gx + o)),
                             LF_LOAD8(s / 4, bias + o));
    }
    for (int s = 0; s < 8; s++)
        a[s] = s % 4 == 2 ? lf_tanh256_arg(z[s], &sign[s]) : lf_sigmoid256_arg(z[s]);
    lf_exp_reduced256_n(a, n, r, p, 8);
    for (int s = 0; s < 8; s++)
        g[s] = s % 4 == 2 ? lf_tanh256_end(n[s], r[s], p[s], sign[s]) : lf_sigmoid256_end(n[s], r[s], p[s]);
    for (int v = 0; v < 2; v++) {
        const size_t u = j + 8 * v;
        const __m256 cn = _mm256_fmadd_ps(g[4 * v + 1], LF_LOAD8(v, c + u), _mm256_mul_ps(g[4 * v], g[4 * v + 2]));
        LF_STORE8(v, c + u, cn);
        LF_STORE8(v, h_raw + u, g[4 * v + 3]);
        if (gates_out != NULL) {
            for (int q = 0; q < 4; q++)
                LF_STORE8(v, gates_out + q * hidden + u, g[4 * v + q]);
            LF_STORE8(v, c_out + u, cn);
        }
    }
}

/* h_raw = o * tanh(c) for two vectors from unit j, side by side */
LF_AVX2C void lf_cell_out256_2(const int masked, const __m256i* m, size_t j, const float* c,
                               float* h_raw) {
    __m256 a[2], n[2], r[2], p[2], sign[2];
    for (int v = 0; v < 2; v++)
        a[v] = lf_tanh256_arg(LF_LOAD8(v, c + j + 8 * v), &sign[v]);
    lf_exp_reduced256_n(a, n, r, p, 2);
    for (int v = 0; v < 2; v++)
        LF_STORE8(v, h_raw + j + 8 * v,
                  _mm256_mul_ps(LF_LOAD8(v, h_raw + j + 8 * v), lf_tanh256_end(n[v], r[v], p[v], sign[v])));
}
#undef LF_LOAD8
#undef LF_STORE8

/* lf_cell_units_avx512's contract and two passes, 256-bit */
__attribute__((target("avx2,fma"))) static void
lf_cell_units_avx2(size_t hidden, size_t u0, size_t u1, const float* gh, const float* gx,
                   const float* bias, float* c, float* h_raw, float* gates_out, float* c_out) {
    __m256i full[2], m[2];
    full[0] = full[1] = m[0] = m[1] = _mm256_set1_epi32(-1);
    size_t j = u0;
    for (; j + 16 <= u1; j += 16)
        lf_cell_gates_pair256(0, full, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    if (j < u1) {
        for (int v = 0; v < 2; v++) {
            long left = (long) (u1 - j) - 8 * v;
            m[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int) (left < 0 ? 0 : left > 8 ? 8 : left)),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        }
        lf_cell_gates_pair256(1, m, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    }
    for (j = u0; j + 16 <= u1; j += 16)
        lf_cell_out256_2(0, full, j, c, h_raw);
    if (j < u1)     /* m as above: the same j */
        lf_cell_out256_2(1, m, j, c, h_raw);
}

#endif
