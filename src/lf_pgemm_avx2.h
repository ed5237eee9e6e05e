/* The packed-panel kernels of lf_pgemm.h in AVX2 + FMA (256-bit), for CPUs without AVX-512
   (AMD Zen 2/3, Intel client and older server cores) and for LSTM_FAST_ISA=avx2.

   Same panels (lf_pack_w's layout, 32 columns, k-major), so the packing, the callers and the
   block sizes are shared. The register tile is 6 rows x 16 columns, half a panel at a time:
   12 ymm accumulators, 2 panel loads and 6 broadcasts a k-step, in the 16 registers AVX2 has
   (a 32-column tile would need 4 loads and 4 accumulators a row: no room for more than 3 rows).
   Every output element is still one float32 FMA chain over k = 0..k-1 in order, whatever the
   tile, the half, the k block or the thread: the bits do not depend on the split (they differ
   from the AVX-512 path's only where the cell's approximations differ: the products are the
   same chains). Included from lf_pgemm.h inside its x86 section. */
#ifndef LF_PGEMM_AVX2_H
#define LF_PGEMM_AVX2_H

#define LF_AVX2_MR 6
#define LF_AVX2_ATTR __attribute__((target("avx2,fma"), always_inline)) static inline

/* lanes i < n of an 8-float vector (n may be <= 0 or > 8) as a maskload/maskstore mask */
LF_AVX2_ATTR __m256i lf_mask8(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int) (n < 0 ? 0 : n > 8 ? 8 : n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 x 8 transpose of rows r[0..7] in registers */
LF_AVX2_ATTR void lf_transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* a packed vector; shared: stored only where p does not already hold the same bits
   (lf_store_packed's reason: lines other cores read stay shared) */
LF_AVX2_ATTR void lf_store_packed8(float* p, __m256 x, const int shared) {
    if (shared) {
        __m256i old = _mm256_loadu_si256((const __m256i*) p);
        __m256i eq = _mm256_cmpeq_epi32(old, _mm256_castps_si256(x));
        if (_mm256_movemask_epi8(eq) == -1)
            return;
    }
    _mm256_storeu_ps(p, x);
}

/* lf_pack_w_scalar's panels in 8 x 8 register transposes (missing rows read as zero) */
LF_AVX2_ATTR void lf_pack_w_avx2_impl(const float* w, size_t ldw, size_t n, size_t k,
                                      float* packed, const int shared) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR;
    for (size_t p = 0; p < n_panels; p++) {
        float* dst = packed + p * k * LF_NR;
        size_t width = n - p * LF_NR < LF_NR ? n - p * LF_NR : LF_NR;
        for (size_t g = 0; g < 4; g++) {
            size_t rows = width > g * 8 ? (width - g * 8 < 8 ? width - g * 8 : 8) : 0;
            const float* src = w + (p * LF_NR + g * 8) * ldw;
            for (size_t kk = 0; kk < k; kk += 8) {
                size_t cols = k - kk < 8 ? k - kk : 8;
                __m256i load = lf_mask8((long) cols);
                __m256 r[8];
                for (size_t i = 0; i < 8; i++)
                    r[i] = i < rows ? _mm256_maskload_ps(src + i * ldw + kk, load) : _mm256_setzero_ps();
                lf_transpose8(r);
                for (size_t i = 0; i < cols; i++)
                    lf_store_packed8(dst + (kk + i) * LF_NR + g * 8, r[i], shared);
            }
        }
    }
}
__attribute__((target("avx2,fma"))) static void
lf_pack_w_avx2(const float* w, size_t ldw, size_t n, size_t k, float* packed) {
    lf_pack_w_avx2_impl(w, ldw, n, k, packed, 0);
}
__attribute__((target("avx2,fma"))) static void
lf_pack_w_shared_avx2(const float* w, size_t ldw, size_t n, size_t k, float* packed) {
    lf_pack_w_avx2_impl(w, ldw, n, k, packed, 1);
}
/* lf_pack_w_for below AVX-512: AVX2 transposes on the AVX2 path, the scalar loop otherwise */
static void lf_pack_w_avx2_or_scalar(const float* w, size_t ldw, size_t n, size_t k,
                                     float* packed, int shared) {
    if (lf_isa() == 1) {
        if (shared)
            lf_pack_w_shared_avx2(w, ldw, n, k, packed);
        else
            lf_pack_w_avx2(w, ldw, n, k, packed);
    } else {
        lf_pack_w_scalar(w, ldw, n, k, packed);
    }
}

/* One tile: mr (<= 6) rows of A times 16 columns of a panel (bp at the half's first column),
   over k values. a_trans: A read from its transpose (k, m). b_rows: B's rows in place (row-major
   (k, n), leading dimension ldb, masked to the half's width) instead of packed (stride LF_NR).
   cols: columns of C kept (1..16); continue_c: start from C's partial sums; accumulate: add C.
   LF_UNROLL_ROWS: see lf_pgemm.h. */
LF_AVX2_ATTR void
lf_tile_avx2(const int mr, const int a_trans, const int b_rows, size_t k, const float* a,
             size_t lda, const float* bp, size_t ldb, float* c, size_t ldc, size_t cols,
             int accumulate, int continue_c) {
    __m256 acc0[LF_AVX2_MR], acc1[LF_AVX2_MR];
    __m256i m0 = lf_mask8((long) cols), m1 = lf_mask8((long) cols - 8);
    int full = cols >= 16;
    LF_UNROLL_ROWS for (int r = 0; r < mr; r++) {
        if (continue_c) {
            acc0[r] = _mm256_maskload_ps(c + r * ldc, m0);
            acc1[r] = _mm256_maskload_ps(c + r * ldc + 8, m1);
        } else {
            acc0[r] = _mm256_setzero_ps();
            acc1[r] = _mm256_setzero_ps();
        }
    }
#pragma GCC unroll 2
    for (size_t kk = 0; kk < k; kk++) {
        __m256 b0 = b_rows ? _mm256_maskload_ps(bp, m0) : _mm256_load_ps(bp);
        __m256 b1 = b_rows ? _mm256_maskload_ps(bp + 8, m1) : _mm256_load_ps(bp + 8);
        bp += b_rows ? ldb : LF_NR;
        LF_UNROLL_ROWS for (int r = 0; r < mr; r++) {
            __m256 av = _mm256_broadcast_ss(a_trans ? a + kk * lda + r : a + r * lda + kk);
            acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
        }
    }
    LF_UNROLL_ROWS for (int r = 0; r < mr; r++) {
        float* cr = c + r * ldc;
        if (accumulate) {
            acc0[r] = _mm256_add_ps(acc0[r], _mm256_maskload_ps(cr, m0));
            acc1[r] = _mm256_add_ps(acc1[r], _mm256_maskload_ps(cr + 8, m1));
        }
        if (full) {
            _mm256_storeu_ps(cr, acc0[r]);
            _mm256_storeu_ps(cr + 8, acc1[r]);
        } else {
            _mm256_maskstore_ps(cr, m0, acc0[r]);
            _mm256_maskstore_ps(cr + 8, m1, acc1[r]);
        }
    }
}

#define LF_TILE2_CASE(R) case R: \
    if (a_trans) { if (b_rows) lf_tile_avx2(R, 1, 1, k, a, lda, bp, ldb, c, ldc, cols, accumulate, continue_c); \
                   else lf_tile_avx2(R, 1, 0, k, a, lda, bp, ldb, c, ldc, cols, accumulate, continue_c); } \
    else { if (b_rows) lf_tile_avx2(R, 0, 1, k, a, lda, bp, ldb, c, ldc, cols, accumulate, continue_c); \
           else lf_tile_avx2(R, 0, 0, k, a, lda, bp, ldb, c, ldc, cols, accumulate, continue_c); } \
    break;

__attribute__((target("avx2,fma"))) static void
lf_tile_avx2_any(int mr, int a_trans, int b_rows, size_t k, const float* a, size_t lda,
                 const float* bp, size_t ldb, float* c, size_t ldc, size_t cols, int accumulate,
                 int continue_c) {
    switch (mr) {
        LF_TILE2_CASE(1) LF_TILE2_CASE(2) LF_TILE2_CASE(3)
        LF_TILE2_CASE(4) LF_TILE2_CASE(5) LF_TILE2_CASE(6)
        default: break;
    }
}

/* rows 0..m of A (a_trans: at (k, m), row r at a + r; else a + r * lda) over one half panel */
LF_AVX2_ATTR void
lf_rows_half_avx2(const int a_trans, const int b_rows, size_t m, size_t k, const float* a,
                  size_t lda, const float* bp, size_t ldb, float* c, size_t ldc, size_t cols,
                  int accumulate, int continue_c) {
    size_t r = 0;
    for (; r + LF_AVX2_MR <= m; r += LF_AVX2_MR)
        lf_tile_avx2(LF_AVX2_MR, a_trans, b_rows, k, a_trans ? a + r : a + r * lda, lda, bp, ldb,
                     c + r * ldc, ldc, cols, accumulate, continue_c);
    if (r < m)
        lf_tile_avx2_any((int) (m - r), a_trans, b_rows, k, a_trans ? a + r : a + r * lda, lda, bp,
                         ldb, c + r * ldc, ldc, cols, accumulate, continue_c);
}

/* lf_pgemm: C[:, col0:col0+n_cols] (+)= A(m, k) @ W[col0:col0+n_cols].T, W packed */
__attribute__((target("avx2,fma"))) static void
lf_pgemm_avx2(size_t m, size_t col0, size_t n_cols, size_t k, const float* a, size_t lda,
              const float* packed, float* c, size_t ldc, int accumulate) {
    size_t p0 = col0 / LF_NR, p1 = (col0 + n_cols + LF_NR - 1) / LF_NR;
    size_t end = col0 + n_cols;
    for (size_t p = p0; p < p1; p++) {
        size_t j0 = p * LF_NR;
        size_t width = end - j0 < LF_NR ? end - j0 : LF_NR;
        const float* bp = packed + p * k * LF_NR;
        for (size_t h = 0; h < 2 && 16 * h < width; h++)
            lf_rows_half_avx2(0, 0, m, k, a, lda, bp + 16 * h, LF_NR, c + j0 + 16 * h, ldc,
                              width - 16 * h, accumulate, 0);
    }
}

/* one k-block (k0, kb) of lf_pgemm_at, every panel (ldb 0: W packed; else W.T's rows in place) */
__attribute__((target("avx2,fma"))) static void
lf_pgemm_at_block_avx2(size_t m, size_t n, size_t k, size_t k0, size_t kc, const float* at,
                       size_t ldat, const float* packed, size_t ldb, float* c, size_t ldc) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR;
    size_t kb = k - k0 < kc ? k - k0 : kc;
    int cont = k0 > 0;
    const float* a = at + k0 * ldat;
    for (size_t p = 0; p < n_panels; p++) {
        size_t j0 = p * LF_NR;
        size_t width = n - j0 < LF_NR ? n - j0 : LF_NR;
        const float* bp = ldb ? packed + k0 * ldb + j0 : packed + (p * k + k0) * LF_NR;
        for (size_t h = 0; h < 2 && 16 * h < width; h++) {
            if (ldb)
                lf_rows_half_avx2(1, 1, m, kb, a, ldat, bp + 16 * h, ldb, c + j0 + 16 * h, ldc,
                                  width - 16 * h, 0, cont);
            else
                lf_rows_half_avx2(1, 0, m, kb, a, ldat, bp + 16 * h, LF_NR, c + j0 + 16 * h, ldc,
                                  width - 16 * h, 0, cont);
        }
        if (kb < k - k0 && !ldb)
            lf_prefetch(bp + kc * LF_NR, (k - k0 - kb < kc ? k - k0 - kb : kc) * LF_NR * sizeof(float));
    }
}

__attribute__((target("avx2,fma"))) static void
lf_pgemm_at_avx2(size_t m, size_t n, size_t k, const float* at, size_t ldat, const float* packed,
                 float* c, size_t ldc) {
    if (k == 0)
        for (size_t r = 0; r < m; r++)
            memset(c + r * ldc, 0, n * sizeof(float));
    for (size_t k0 = 0; k0 < k; k0 += lf_kc)
        lf_pgemm_at_block_avx2(m, n, k, k0, lf_kc, at, ldat, packed, 0, c, ldc);
}

/* lf_pgemm_at2: two products of one A and its column sums, block by block over k */
__attribute__((target("avx2,fma"))) static void
lf_pgemm_at2_avx2(size_t m, size_t k, const float* at, size_t ldat, size_t n1, const float* b1,
                  size_t ldb1, float* c1, size_t ldc1, size_t n2, const float* b2, size_t ldb2,
                  float* c2, size_t ldc2, float* colsum) {
    if (k == 0) {
        for (size_t r = 0; r < m; r++) {
            memset(c1 + r * ldc1, 0, n1 * sizeof(float));
            memset(c2 + r * ldc2, 0, n2 * sizeof(float));
        }
    }
    if (colsum != NULL)
        memset(colsum, 0, m * sizeof(float));
    size_t kc = n1 <= 64 && n2 <= 64 ? lf_kc_narrow : lf_kc;
    for (size_t k0 = 0; k0 < k; k0 += kc) {
        lf_pgemm_at_block_avx2(m, n1, k, k0, kc, at, ldat, b1, ldb1, c1, ldc1);
        lf_pgemm_at_block_avx2(m, n2, k, k0, kc, at, ldat, b2, ldb2, c2, ldc2);
        if (colsum != NULL) {
            size_t kb = k - k0 < kc ? k - k0 : kc;
            for (size_t i = 0; i < m; i += 8) {
                __m256i lanes = lf_mask8((long) (m - i));
                __m256 acc = _mm256_maskload_ps(colsum + i, lanes);
                for (size_t q = k0; q < k0 + kb; q++)
                    acc = _mm256_add_ps(acc, _mm256_maskload_ps(at + q * ldat + i, lanes));
                _mm256_maskstore_ps(colsum + i, lanes, acc);
            }
        }
    }
}

/* np (<= 2) panels of one row: 4 * np independent chains */
LF_AVX2_ATTR void
lf_row_panels_avx2(const int np, size_t k, const float* a, const float* bp, float* c, size_t end,
                   size_t j0) {
    __m256 acc[8];
    LF_UNROLL_ROWS for (int q = 0; q < 4 * np; q++)
        acc[q] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (size_t kk = 0; kk < k; kk++) {
        __m256 av = _mm256_broadcast_ss(a + kk);
        LF_UNROLL_ROWS for (int q = 0; q < np; q++) {
            const float* b = bp + (q * k + kk) * LF_NR;
            LF_UNROLL_ROWS for (int v = 0; v < 4; v++)
                acc[4 * q + v] = _mm256_fmadd_ps(av, _mm256_load_ps(b + 8 * v), acc[4 * q + v]);
        }
    }
    LF_UNROLL_ROWS for (int q = 0; q < np; q++) {
        size_t j = j0 + q * LF_NR;
        size_t width = end - j < LF_NR ? end - j : LF_NR;
        LF_UNROLL_ROWS for (int v = 0; v < 4; v++) {
            if (width >= 8 * (size_t) v + 8)
                _mm256_storeu_ps(c + j + 8 * v, acc[4 * q + v]);
            else
                _mm256_maskstore_ps(c + j + 8 * v, lf_mask8((long) width - 8 * v), acc[4 * q + v]);
        }
    }
}

/* the panels p .. p + np - 1 of one row (np <= 4), two at a time */
__attribute__((target("avx2,fma"))) static void
lf_row_group_avx2(size_t np, size_t p, size_t k, const float* a, const float* packed, float* c,
                  size_t end) {
    for (size_t q = 0; q < np; q += 2) {
        if (np - q >= 2)
            lf_row_panels_avx2(2, k, a, packed + (p + q) * k * LF_NR, c, end, (p + q) * LF_NR);
        else
            lf_row_panels_avx2(1, k, a, packed + (p + q) * k * LF_NR, c, end, (p + q) * LF_NR);
    }
}

/* lf_pgemv_dir: groups of 4 panels, in reverse order when backwards (L1 reuse, see there) */
__attribute__((target("avx2,fma"))) static void
lf_pgemv_dir_avx2(size_t col0, size_t n_cols, size_t k, const float* a, const float* packed,
                  float* c, int backwards) {
    size_t p0 = col0 / LF_NR, p1 = (col0 + n_cols + LF_NR - 1) / LF_NR;
    size_t end = col0 + n_cols;
    size_t n_full = (p1 - p0) / 4, rest = (p1 - p0) % 4;
    if (!backwards) {
        for (size_t g = 0; g < n_full; g++)
            lf_row_group_avx2(4, p0 + 4 * g, k, a, packed, c, end);
        lf_row_group_avx2(rest, p0 + 4 * n_full, k, a, packed, c, end);
    } else {
        lf_row_group_avx2(rest, p0 + 4 * n_full, k, a, packed, c, end);
        for (size_t g = n_full; g-- > 0;)
            lf_row_group_avx2(4, p0 + 4 * g, k, a, packed, c, end);
    }
}

/* lf_pgemv_gates_tiles: the four gate panels of each 32-unit group, two gates at a time (8
   chains), each reading its panel's rows whole: two sequential streams. (By halves of 16 units,
   each pass read every other 64-byte line at a stride of 128 bytes: (100,1,128,128) spent 3.9 us
   a step in it, Xeon 6/207.) Then the tile work of the later steps' projection (panels
   tv0..tv1, k-steps tk0..tk1, continuing C_t's partial sums from tk0 > 0) as 8-row tiles of its
   own, after the row. The AVX-512 version folds these into the row's idle FMA slots; the sums
   are the same chains. */
__attribute__((target("avx2,fma"))) static void
lf_pgemv_gates_tiles_avx2(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                          const float* packed, float* c, int backwards, size_t tk,
                          const float* ta, size_t tlda, const float* t_packed, size_t tv0,
                          size_t tv1, float* tc, size_t tldc, size_t tk0, size_t tk1) {
    size_t n_groups = (u1 - u0) / LF_NR;
    for (size_t q = 0; q < n_groups; q++) {
        size_t u = u0 + (backwards ? n_groups - 1 - q : q) * LF_NR;
        for (int pair = 0; pair < 2; pair++) {
            const float* bp[2];
            __m256 acc[8];
            for (int g = 0; g < 2; g++) {
                bp[g] = packed + ((2 * pair + g) * hidden + u) / LF_NR * k * LF_NR;
                for (int v = 0; v < 4; v++)
                    acc[4 * g + v] = _mm256_setzero_ps();
            }
            for (size_t kk = 0; kk < k; kk++) {
                __m256 av = _mm256_broadcast_ss(a + kk);
                for (int g = 0; g < 2; g++) {
                    const float* b = bp[g] + kk * LF_NR;
                    for (int v = 0; v < 4; v++)
                        acc[4 * g + v] = _mm256_fmadd_ps(av, _mm256_load_ps(b + 8 * v), acc[4 * g + v]);
                }
            }
            for (int g = 0; g < 2; g++)
                for (int v = 0; v < 4; v++)
                    _mm256_storeu_ps(c + (2 * pair + g) * hidden + u + 8 * v, acc[4 * g + v]);
        }
    }
    if (!(tv0 < tv1 && n_groups > 0 && tk0 < tk1))
        return;
    for (size_t tv = tv0; tv < tv1; tv++) {
        size_t panel = tv / n_groups * (hidden / LF_NR) + u0 / LF_NR + tv % n_groups;
        const float* bp = t_packed + (panel * tk + tk0) * LF_NR;
        float* cp = tc + panel * LF_NR;
        for (size_t h = 0; h < 2; h++)
            lf_rows_half_avx2(0, 0, LF_MR, tk1 - tk0, ta + tk0, tlda, bp + 16 * h, LF_NR,
                              cp + 16 * h, tldc, 16, 0, tk0 > 0);
    }
}

/* lf_gemv_rows' tile (lf_pgemm.h) in 8 lanes: the same order of sums per output */
#define LF_HSUM8(v) ({ __m128 s_ = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); \
                       s_ = _mm_add_ps(s_, _mm_movehl_ps(s_, s_));                                     \
                       s_ = _mm_add_ss(s_, _mm_shuffle_ps(s_, s_, 1)); _mm_cvtss_f32(s_); })
static inline __attribute__((always_inline, target("avx2,fma"))) void
lf_gemv_tile_avx2(int WR, int XR, size_t k, const float* w, size_t ldw, const float* x,
                  size_t ldx, float* y, size_t ldy) {
    const size_t tail = k % 8;
    const __m256i mask = lf_mask8((long) tail);
    __m256 acc[4][LF_GEMV_XR_AVX2];
    for (int a = 0; a < WR; a++)
        for (int b = 0; b < XR; b++)
            acc[a][b] = _mm256_setzero_ps();
    size_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 xv[LF_GEMV_XR_AVX2];
        for (int b = 0; b < XR; b++)
            xv[b] = _mm256_loadu_ps(x + b * ldx + kk);
        for (int a = 0; a < WR; a++) {
            const __m256 wv = _mm256_loadu_ps(w + a * ldw + kk);
            for (int b = 0; b < XR; b++)
                acc[a][b] = _mm256_fmadd_ps(wv, xv[b], acc[a][b]);
        }
    }
    if (tail) {
        __m256 xv[LF_GEMV_XR_AVX2];
        for (int b = 0; b < XR; b++)
            xv[b] = _mm256_maskload_ps(x + b * ldx + kk, mask);
        for (int a = 0; a < WR; a++) {
            const __m256 wv = _mm256_maskload_ps(w + a * ldw + kk, mask);
            for (int b = 0; b < XR; b++)
                acc[a][b] = _mm256_fmadd_ps(wv, xv[b], acc[a][b]);
        }
    }
    for (int a = 0; a < WR; a++)
        for (int b = 0; b < XR; b++)
            y[b * ldy + a] = LF_HSUM8(acc[a][b]);
}
#undef LF_HSUM8
LF_GEMV_PASS(avx2, "avx2,fma", 1)
LF_GEMV_PASS(avx2, "avx2,fma", 2)
LF_GEMV_ROWS(avx2, "avx2,fma", LF_GEMV_XR_AVX2, lf_gemv_pass_avx2_1, lf_gemv_pass_avx2_2)

#endif
