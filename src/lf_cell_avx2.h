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

LF_AVX2C __m256 lf_exp_reduced256(__m256 x, __m256* n, __m256* r) {
    __m256 shifter = _mm256_set1_ps(12582912.0f);
    *n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter), shifter);
    *r = _mm256_fnmadd_ps(*n, _mm256_set1_ps(0.693359375f), x);
    *r = _mm256_fnmadd_ps(*n, _mm256_set1_ps(-2.12194440e-4f), *r);
    __m256 p = _mm256_set1_ps(1.98412698e-4f);
    p = _mm256_fmadd_ps(p, *r, _mm256_set1_ps(1.38888889e-3f));
    p = _mm256_fmadd_ps(p, *r, _mm256_set1_ps(8.33333333e-3f));
    p = _mm256_fmadd_ps(p, *r, _mm256_set1_ps(4.16666667e-2f));
    p = _mm256_fmadd_ps(p, *r, _mm256_set1_ps(1.66666667e-1f));
    return _mm256_fmadd_ps(p, *r, _mm256_set1_ps(0.5f));
}

LF_AVX2C __m256 lf_exp256(__m256 x) {
    /* min/max with the constant first return x when x is NaN */
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    __m256 n, r;
    __m256 p = lf_exp_reduced256(x, &n, &r);
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    return _mm256_mul_ps(p, lf_pow2_256(n));
}

LF_AVX2C __m256 lf_sigmoid256(__m256 x) {
    return lf_recip256(_mm256_add_ps(_mm256_set1_ps(1.0f), lf_exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

LF_AVX2C __m256 lf_tanh256(__m256 x) {
    __m256 signbit = _mm256_castsi256_ps(_mm256_set1_epi32((int) 0x80000000u));
    __m256 sign = _mm256_and_ps(x, signbit);
    __m256 ax = _mm256_andnot_ps(signbit, x);
    __m256 a = _mm256_min_ps(_mm256_set1_ps(20.0f), _mm256_add_ps(ax, ax));
    __m256 n, r;
    __m256 p = lf_exp_reduced256(a, &n, &r);
    __m256 em_r = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r);
    __m256 two_n = lf_pow2_256(n);
    __m256 m = _mm256_fmadd_ps(em_r, two_n, _mm256_sub_ps(two_n, _mm256_set1_ps(1.0f)));
    __m256 t = _mm256_mul_ps(m, lf_recip256(_mm256_add_ps(m, _mm256_set1_ps(2.0f))));
    return _mm256_or_ps(t, sign);
}

/* units j..j+16 of a row as two vectors of 8; masked: only the lanes of m[v] read and written */
LF_AVX2C void lf_cell_pair256(const int masked, const __m256i* m, size_t hidden, size_t j,
                              const float* gh, const float* gx, const float* bias, float* c,
                              float* h_raw, float* gates_out, float* c_out) {
#define LF_LOAD8(v, p) (masked ? _mm256_maskload_ps((p), m[v]) : _mm256_loadu_ps(p))
#define LF_STORE8(v, p, x) do { if (masked) _mm256_maskstore_ps((p), m[v], (x)); \
                                else _mm256_storeu_ps((p), (x)); } while (0)
    __m256 z[8], g[8], cn[2];
    for (int v = 0; v < 2; v++)
        for (int q = 0; q < 4; q++) {
            size_t o = q * hidden + j + 8 * v;
            z[4 * v + q] = _mm256_add_ps(_mm256_add_ps(LF_LOAD8(v, gh + o), LF_LOAD8(v, gx + o)),
                                         LF_LOAD8(v, bias + o));
        }
    for (int q = 0; q < 4; q++)
        for (int v = 0; v < 2; v++)
            g[4 * v + q] = q == 2 ? lf_tanh256(z[4 * v + q]) : lf_sigmoid256(z[4 * v + q]);
    for (int v = 0; v < 2; v++)
        cn[v] = _mm256_fmadd_ps(g[4 * v + 1], LF_LOAD8(v, c + j + 8 * v),
                                _mm256_mul_ps(g[4 * v], g[4 * v + 2]));
    for (int v = 0; v < 2; v++) {
        size_t u = j + 8 * v;
        LF_STORE8(v, c + u, cn[v]);
        LF_STORE8(v, h_raw + u, _mm256_mul_ps(g[4 * v + 3], lf_tanh256(cn[v])));
        if (gates_out != NULL) {
            for (int q = 0; q < 4; q++)
                LF_STORE8(v, gates_out + q * hidden + u, g[4 * v + q]);
            LF_STORE8(v, c_out + u, cn[v]);
        }
    }
#undef LF_LOAD8
#undef LF_STORE8
}

/* lf_cell_units_avx512's contract, 256-bit */
__attribute__((target("avx2,fma"))) static void
lf_cell_units_avx2(size_t hidden, size_t u0, size_t u1, const float* gh, const float* gx,
                   const float* bias, float* c, float* h_raw, float* gates_out, float* c_out) {
    __m256i full[2];
    full[0] = full[1] = _mm256_set1_epi32(-1);
    size_t j = u0;
    for (; j + 16 <= u1; j += 16)
        lf_cell_pair256(0, full, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    if (j < u1) {
        __m256i m[2];
        for (int v = 0; v < 2; v++) {
            long left = (long) (u1 - j) - 8 * v;
            m[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int) (left < 0 ? 0 : left > 8 ? 8 : left)),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        }
        lf_cell_pair256(1, m, hidden, j, gh, gx, bias, c, h_raw, gates_out, c_out);
    }
}

#endif
