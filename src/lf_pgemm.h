/* Packed-panel float32 GEMM for the LSTM's weight products: row-major C(m, n) = A(m, k) @ W(n, k).T
   (+ C), with W packed once per call into panels of LF_NR output columns, k-major inside a panel.

   Why our own: OpenBLAS repacks W on every call; an LSTM multiplies the same W_hh at every step
   with few rows (the batch), where that packing and the small-m edge cases keep sgemm well below
   the core's FMA peak. Here a panel (k x 32 floats, 128 KB at k = 1024) is packed once, stays in L2
   while every row tile of A runs over it, and the register tile is 8 rows x 32 columns (16 zmm
   accumulators, enough independent FMAs to cover their latency on both FMA ports).

   Every output element is one float32 FMA chain over k = 0..k-1 in order, whatever the row tile,
   the panel range or the thread that computes it: the bits do not depend on the split.

   The AVX-512 code is compiled with a target attribute and chosen at run time, so a build without
   -march=native (portable wheels) still has it; elsewhere lf_pgemm_available() is 0 and the
   callers keep their BLAS path. */
#ifndef LF_PGEMM_H
#define LF_PGEMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define LF_NR 32
#define LF_MR 8
#define LF_MR_MAX 12
/* Before a loop over a tile's rows: unrolled only by the later passes, gcc 12 kept the register
   tiles' accumulator arrays in memory and stored every FMA's result (the remainder tiles, the
   AVX2 tiles); unrolled by pragma they stay in registers. */
#define LF_UNROLL_ROWS _Pragma("GCC unroll 16")

/* Kernel parameters (lstm_fast/_cpu.py derives them from the CPU and sets them once at import,
   lf_set_kernel): lf_mr rows of the AVX-512 register tile (8 or 12; 2 x lf_mr accumulators),
   lf_kc / lf_kc_narrow k per block of the k-blocked products. None of them changes a bit: every
   output stays one FMA chain over k in order. lf_isa_cap: the path, 0 generic (BLAS), 1 AVX2+FMA,
   2 AVX-512; -1 until set (the best the CPU has). */
static int lf_isa_cap = -1;
static int lf_mr = LF_MR;
static size_t lf_kc = 256, lf_kc_narrow = 64;

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define LF_PGEMM_X86 1
#include <immintrin.h>
#else
#define LF_PGEMM_X86 0
#endif

/* asks for `bytes` from p to be brought into L2 ahead of use (no-op without the GCC builtin) */
static inline void lf_prefetch(const void* p, size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
    for (size_t off = 0; off < bytes; off += 64)
        __builtin_prefetch((const char*) p + off, 0, 2);
#else
    (void) p; (void) bytes;
#endif
}

/* floats in the packed copy of an (n, k) matrix: n rounded up to whole panels */
static inline size_t lf_pack_len(size_t n, size_t k) {
    return (n + LF_NR - 1) / LF_NR * LF_NR * k;
}

/* `bytes` at a 64-byte boundary, released with free(): vectors of a row that starts there never
   straddle two cache lines (gate and state rows, read and written every step with 64-byte
   vectors). Measured with the batch-1 row loop: (100,1,32,64) 89.9 -> 88.4 us. */
static inline void* lf_malloc64(size_t bytes) {
#if defined(__unix__) || defined(__APPLE__)
    void* p = NULL;
    return posix_memalign(&p, 64, bytes > 0 ? bytes : 64) == 0 ? p : NULL;
#else
    return malloc(bytes);
#endif
}

/* `bytes` for a large work buffer, released with free(). From 4 MB on (Linux): 2 MB aligned and
   marked for transparent huge pages, so that its first touch takes one page fault per 2 MB rather
   than per 4 KB (measured here: 52 MB allocated and touched in 5 ms instead of 20 ms). */
static inline void* lf_alloc_big(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= ((size_t) 4 << 20)) {
        void* p = NULL;
        if (posix_memalign(&p, (size_t) 2 << 20, bytes) != 0)
            return NULL;
        madvise(p, bytes, MADV_HUGEPAGE);   /* advice only: ignored where THP is off */
        return p;
    }
#endif
    return lf_malloc64(bytes);
}

/* Per-thread work buffers kept from call to call (up to lf_ws_max() bytes a slot): glibc returns
   freed blocks of a few hundred KB to the system and the next call's first touch of their pages
   faults again. Measured: a (100,1,128,128) training step 1.69 ms with a fresh packed-weight
   buffer per call, 1.09 ms reusing it; int8 (50,64,512,512) on two threads spent 10 % of its
   time zeroing the fresh pages of its 26 MB projection buffer when only 16 MB were kept. A
   thread's buffers are freed when it exits (pthread key destructor); without pthreads every
   call allocates and frees. lf_ws_get(slot, bytes) returns at least `bytes` (NULL on failure);
   hand it back with lf_ws_release(slot, p) when done. */
#define LF_WS_SLOTS 8
#define LF_WS_APACK 7   /* this header's own slot (lf_pgemm_at2's packed A); modules use 0..6 */
#define LF_WS_MAX_MB_DEFAULT 256
/* bytes a slot keeps: LSTM_FAST_WORKSPACE_MB (0: keep none), read once, else 256 MB */
static size_t lf_ws_max(void) {
    static size_t cached = (size_t) -1;
    if (cached == (size_t) -1) {
        const char* env = getenv("LSTM_FAST_WORKSPACE_MB");
        char* end = NULL;
        long mb = env != NULL && *env != '\0' ? strtol(env, &end, 10) : -1;
        if (env == NULL || *env == '\0' || end == NULL || *end != '\0' || mb < 0 || mb > (1L << 20))
            mb = LF_WS_MAX_MB_DEFAULT;    /* unset or not a whole number of MB: the default */
        __atomic_store_n(&cached, (size_t) mb << 20, __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&cached, __ATOMIC_RELAXED);
}
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
typedef struct { void* p; size_t size; } lf_ws_slot;
static pthread_key_t lf_ws_key;
static pthread_once_t lf_ws_once = PTHREAD_ONCE_INIT;
static int lf_ws_key_ok = 0;
static void lf_ws_free_all(void* v) {
    lf_ws_slot* slots = (lf_ws_slot*) v;
    for (int i = 0; i < LF_WS_SLOTS; i++)
        free(slots[i].p);
    free(slots);
}
static void lf_ws_make_key(void) {
    lf_ws_key_ok = pthread_key_create(&lf_ws_key, lf_ws_free_all) == 0;
}
static inline lf_ws_slot* lf_ws_slots(void) {
    pthread_once(&lf_ws_once, lf_ws_make_key);
    if (!lf_ws_key_ok)
        return NULL;
    lf_ws_slot* slots = (lf_ws_slot*) pthread_getspecific(lf_ws_key);
    if (slots == NULL) {
        slots = (lf_ws_slot*) calloc(LF_WS_SLOTS, sizeof(lf_ws_slot));
        if (slots != NULL && pthread_setspecific(lf_ws_key, slots) != 0) {
            free(slots);
            slots = NULL;
        }
    }
    return slots;
}
static inline void* lf_ws_get(int slot, size_t bytes) {
    lf_ws_slot* slots = bytes <= lf_ws_max() ? lf_ws_slots() : NULL;
    if (slots == NULL)
        return lf_alloc_big(bytes);
    if (slots[slot].size < bytes || slots[slot].p == NULL) {
        free(slots[slot].p);
        slots[slot].p = lf_alloc_big(bytes);
        slots[slot].size = slots[slot].p != NULL ? bytes : 0;
    }
    return slots[slot].p;
}
static inline void lf_ws_release(int slot, void* p) {
    lf_ws_slot* slots = lf_ws_slots();
    if (p != NULL && (slots == NULL || slots[slot].p != p))
        free(p);
}
#else
static inline void* lf_ws_get(int slot, size_t bytes) { (void) slot; return lf_alloc_big(bytes); }
static inline void lf_ws_release(int slot, void* p) { (void) slot; free(p); }
#endif

/* n_floats floats at a 64-byte boundary (panels are read with aligned loads) from work-buffer
   slot `slot`: hand *raw back with lf_ws_release(slot, *raw) */
static inline float* lf_ws_aligned(int slot, size_t n_floats, void** raw) {
    *raw = lf_ws_get(slot, n_floats * sizeof(float) + 64);
    if (*raw == NULL)
        return NULL;
    return (float*) (((uintptr_t) *raw + 63) & ~(uintptr_t) 63);
}

/* packed[(p * k + kk) * LF_NR + j] = w[(p * LF_NR + j) * ldw + kk]; columns past n are zero.
   k outer, the panel's 32 rows inner: the 32 source lines stay in L1 across 16 k values and the
   writes are contiguous (0.3-0.5 ns a value here; a k-blocked order was four times slower). */
static void lf_pack_w_scalar(const float* restrict w, size_t ldw, size_t n, size_t k,
                             float* restrict packed) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR;
    for (size_t p = 0; p < n_panels; p++) {
        float* restrict dst = packed + p * k * LF_NR;
        const float* restrict src = w + p * LF_NR * ldw;
        size_t width = n - p * LF_NR < LF_NR ? n - p * LF_NR : LF_NR;
        if (width < LF_NR)
            memset(dst, 0, k * LF_NR * sizeof(float));
        for (size_t kk = 0; kk < k; kk++)
            for (size_t j = 0; j < width; j++)
                dst[kk * LF_NR + j] = src[j * ldw + kk];
    }
}

/* the same panels from W's transpose stored row-major (k, n): packed[(p * k + kk) * LF_NR + j] =
   wt[kk * ldw + p * LF_NR + j], for products with W.T such as backward's dz @ W_hh */
static void lf_pack_wt(const float* restrict wt, size_t ldw, size_t n, size_t k,
                       float* restrict packed) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR;
    for (size_t p = 0; p < n_panels; p++) {
        float* restrict dst = packed + p * k * LF_NR;
        size_t j0 = p * LF_NR;
        size_t width = n - j0 < LF_NR ? n - j0 : LF_NR;
        if (width < LF_NR)
            memset(dst, 0, k * LF_NR * sizeof(float));
        for (size_t kk = 0; kk < k; kk++)
            memcpy(dst + kk * LF_NR, wt + kk * ldw + j0, width * sizeof(float));
    }
}

#if LF_PGEMM_X86
/* the best path this CPU (and OS) runs: 2 AVX-512 (F, BW, VL), 1 AVX2 + FMA, 0 neither */
static int lf_isa_detect(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                 && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") ? 2
               : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
    }
    return cached;
}
/* the path in use: 2 AVX-512, 1 AVX2, 0 BLAS (lf_set_kernel caps it) */
static inline int lf_isa(void) {
    return lf_isa_cap >= 0 ? lf_isa_cap : lf_isa_detect();
}
static int lf_pgemm_available(void) {
    return lf_isa() >= 1;
}
/* isa is capped at what the CPU has; returns the path set */
static int lf_set_kernel(int isa, int mr, size_t kc, size_t kc_narrow) {
    int best = lf_isa_detect();
    lf_isa_cap = isa < 0 ? best : (isa < best ? isa : best);
    lf_mr = mr >= LF_MR_MAX ? LF_MR_MAX : LF_MR;
    lf_kc = kc >= 16 ? kc : 256;
    lf_kc_narrow = kc_narrow >= 16 ? kc_narrow : 64;
    return lf_isa_cap;
}

/* A packed vector. shared (a constant after inlining): the copy is read by other threads too, so
   x is stored only where p does not already hold the same bits. Packing rewrites the same panels
   call after call, and a line another core has read costs an invalidation to write: 512 KB read
   by the other core took 58 us to rewrite against 10 us (C benchmark); compared first,
   unchanged lines stay shared. Alone, the compare costs about 2 us in 512 KB, so plain stores. */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_store_packed(float* p, __m512 x, const int shared) {
    if (shared) {
        __m512i old = _mm512_loadu_si512((const void*) p);
        if (!_mm512_cmpneq_epi32_mask(old, _mm512_castps_si512(x)))
            return;
    }
    _mm512_storeu_ps(p, x);
}

/* 16 x 16 block transpose in registers: in[r][c] (rows of `ld` floats, the first `rows` of them
   loaded, the first `cols` columns) -> out[c][r] (rows of LF_NR floats), c < cols. */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_transpose16(const float* in, size_t ld, int rows, int cols, float* out, const int shared) {
    __m512 r[16], t[16], u[16], v[16];
    __mmask16 load = cols >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << cols) - 1u);
    for (int i = 0; i < 16; i++)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(load, in + i * ld) : _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) {          /* pairs of rows interleaved */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {          /* 4 x 4 blocks inside each 128-bit lane */
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {          /* then the lanes themselves */
        v[i] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0x88);
        v[i + 4] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0xDD);
        v[i + 8] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0x88);
        v[i + 12] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        if (i < cols)
            lf_store_packed(out + i * LF_NR, _mm512_shuffle_f32x4(v[i], v[i + 8], 0x88), shared);
        if (i + 8 < cols)
            lf_store_packed(out + (i + 8) * LF_NR, _mm512_shuffle_f32x4(v[i], v[i + 8], 0xDD), shared);
    }
}

/* lf_pack_w_scalar's panels, in 16 x 16 register transposes (missing rows of a last panel read
   as zero): a tenth of the scalar loop's time, which every call pays once per weight matrix */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_pack_w_avx512_impl(const float* w, size_t ldw, size_t n, size_t k, float* packed,
                      const int shared) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR;
    for (size_t p = 0; p < n_panels; p++) {
        float* dst = packed + p * k * LF_NR;
        size_t width = n - p * LF_NR < LF_NR ? n - p * LF_NR : LF_NR;
        for (size_t half = 0; half < 2; half++) {
            int rows = width > half * 16 ? (int) (width - half * 16 < 16 ? width - half * 16 : 16) : 0;
            const float* src = w + (p * LF_NR + half * 16) * ldw;
            for (size_t kk = 0; kk < k; kk += 16) {
                int cols = k - kk < 16 ? (int) (k - kk) : 16;
                lf_transpose16(src + kk, ldw, rows, cols, dst + kk * LF_NR + half * 16, shared);
            }
        }
    }
}
__attribute__((target("avx512f"))) static void
lf_pack_w_avx512(const float* w, size_t ldw, size_t n, size_t k, float* packed) {
    lf_pack_w_avx512_impl(w, ldw, n, k, packed, 0);
}
__attribute__((target("avx512f"))) static void
lf_pack_w_shared_avx512(const float* w, size_t ldw, size_t n, size_t k, float* packed) {
    lf_pack_w_avx512_impl(w, ldw, n, k, packed, 1);
}

/* store masks of the two 16-float halves of a panel whose first `width` columns are kept */
static inline __mmask16 lf_mask_lo(size_t width) {
    return width >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << width) - 1u);
}
static inline __mmask16 lf_mask_hi(size_t width) {
    return width >= 32 ? (__mmask16) 0xFFFF
         : width > 16 ? (__mmask16) ((1u << (width - 16)) - 1u) : (__mmask16) 0;
}

/* One tile: MR rows of A times one panel, over k values; mr, a_trans and b_rows are constants
   after inlining. a_trans: A is read from its transpose stored (k, m), a[kk * lda + r]. b_rows:
   the panel is read in place from a row-major (k, n) matrix with leading dimension ldb (masked
   to the panel's width: no read past a row), instead of packed (aligned, zero-padded, ldb =
   LF_NR). continue_c: the accumulators start from C's values, the partial sums of an earlier
   block of k (the same FMA chain carried on, so blocking k does not change the bits). */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_tile_avx512_bx(const int mr, const int a_trans, const int b_rows, size_t k, const float* a,
                  size_t lda, const float* bp, size_t ldb, float* c, size_t ldc, __mmask16 mask0,
                  __mmask16 mask1, int accumulate, int continue_c) {
    __m512 acc0[LF_MR_MAX], acc1[LF_MR_MAX];
    LF_UNROLL_ROWS for (int r = 0; r < mr; r++) {
        if (continue_c) {
            acc0[r] = _mm512_maskz_loadu_ps(mask0, c + r * ldc);
            acc1[r] = _mm512_maskz_loadu_ps(mask1, c + r * ldc + 16);
        } else {
            acc0[r] = _mm512_setzero_ps();
            acc1[r] = _mm512_setzero_ps();
        }
    }
#pragma GCC unroll 2
    for (size_t kk = 0; kk < k; kk++) {
        __m512 b0 = b_rows ? _mm512_maskz_loadu_ps(mask0, bp) : _mm512_load_ps(bp);
        __m512 b1 = b_rows ? _mm512_maskz_loadu_ps(mask1, bp + 16) : _mm512_load_ps(bp + 16);
        bp += b_rows ? ldb : LF_NR;
        LF_UNROLL_ROWS for (int r = 0; r < mr; r++) {
            __m512 av = _mm512_set1_ps(a_trans ? a[kk * lda + r] : a[r * lda + kk]);
            acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
    }
    LF_UNROLL_ROWS for (int r = 0; r < mr; r++) {
        float* cr = c + r * ldc;
        if (accumulate) {
            acc0[r] = _mm512_add_ps(acc0[r], _mm512_maskz_loadu_ps(mask0, cr));
            acc1[r] = _mm512_add_ps(acc1[r], _mm512_maskz_loadu_ps(mask1, cr + 16));
        }
        _mm512_mask_storeu_ps(cr, mask0, acc0[r]);
        _mm512_mask_storeu_ps(cr + 16, mask1, acc1[r]);
    }
}

__attribute__((target("avx512f"), always_inline)) static inline void
lf_tile_avx512_ex(const int mr, const int a_trans, size_t k, const float* a, size_t lda,
                  const float* bp, float* c, size_t ldc, __mmask16 mask0, __mmask16 mask1,
                  int accumulate, int continue_c) {
    lf_tile_avx512_bx(mr, a_trans, 0, k, a, lda, bp, LF_NR, c, ldc, mask0, mask1, accumulate,
                      continue_c);
}

__attribute__((target("avx512f"), always_inline)) static inline void
lf_tile_avx512(const int mr, size_t k, const float* a, size_t lda, const float* bp,
               float* c, size_t ldc, __mmask16 mask0, __mmask16 mask1, int accumulate) {
    lf_tile_avx512_ex(mr, 0, k, a, lda, bp, c, ldc, mask0, mask1, accumulate, 0);
}

#define LF_TILE_CASE(R) case R: lf_tile_avx512(R, k, a, lda, bp, c, ldc, mask0, mask1, accumulate); break;

__attribute__((target("avx512f"))) static void
lf_tile_any(int mr, size_t k, const float* a, size_t lda, const float* bp, float* c, size_t ldc,
            __mmask16 mask0, __mmask16 mask1, int accumulate) {
    switch (mr) {
        LF_TILE_CASE(1) LF_TILE_CASE(2) LF_TILE_CASE(3) LF_TILE_CASE(4)
        LF_TILE_CASE(5) LF_TILE_CASE(6) LF_TILE_CASE(7) LF_TILE_CASE(8)
        LF_TILE_CASE(9) LF_TILE_CASE(10) LF_TILE_CASE(11) LF_TILE_CASE(12)
        default: break;
    }
}

/* C[:, col0:col0+n_cols] (+)= A(m, k) @ W[col0:col0+n_cols].T, W packed by lf_pack_w with n = n_all.
   col0 is a multiple of LF_NR; C's columns col0.. are written (only those < col0 + n_cols). */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_pgemm_mr(const int mr, size_t m, size_t col0, size_t n_cols, size_t k, const float* a,
            size_t lda, const float* packed, float* c, size_t ldc, int accumulate) {
    size_t p0 = col0 / LF_NR, p1 = (col0 + n_cols + LF_NR - 1) / LF_NR;
    size_t end = col0 + n_cols;
    for (size_t p = p0; p < p1; p++) {
        size_t j0 = p * LF_NR;
        size_t width = end - j0 < LF_NR ? end - j0 : LF_NR;
        __mmask16 mask0 = lf_mask_lo(width), mask1 = lf_mask_hi(width);
        const float* bp = packed + p * k * LF_NR;
        size_t r = 0;
        for (; r + mr <= m; r += mr)
            lf_tile_avx512(mr, k, a + r * lda, lda, bp, c + r * ldc + j0, ldc, mask0, mask1,
                           accumulate);
        if (r < m)
            lf_tile_any((int) (m - r), k, a + r * lda, lda, bp, c + r * ldc + j0, ldc, mask0, mask1,
                        accumulate);
    }
}

/* lf_mr rows a tile (8, or 12 on cores with two 512-bit FMA units: 24 accumulators) */
__attribute__((target("avx512f"))) static void
lf_pgemm_avx512(size_t m, size_t col0, size_t n_cols, size_t k, const float* a, size_t lda,
                const float* packed, float* c, size_t ldc, int accumulate) {
    if (lf_mr == 12)
        lf_pgemm_mr(12, m, col0, n_cols, k, a, lda, packed, c, ldc, accumulate);
    else
        lf_pgemm_mr(LF_MR, m, col0, n_cols, k, a, lda, packed, c, ldc, accumulate);
}

/* one tile of A given as its transpose; ldb: 0 for a packed panel, else B's rows in place */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_tile_at(const int mr, size_t k, const float* a, size_t lda, const float* bp, size_t ldb,
           float* c, size_t ldc, __mmask16 mask0, __mmask16 mask1, int continue_c) {
    if (ldb)
        lf_tile_avx512_bx(mr, 1, 1, k, a, lda, bp, ldb, c, ldc, mask0, mask1, 0, continue_c);
    else
        lf_tile_avx512_ex(mr, 1, k, a, lda, bp, c, ldc, mask0, mask1, 0, continue_c);
}

#define LF_TILE_AT_CASE(R) case R: lf_tile_at(R, k, a, lda, bp, ldb, c, ldc, mask0, mask1, \
                                              continue_c); break;

/* ldb: 0 for a packed panel, else B's rows in place (lf_tile_avx512_bx) */
__attribute__((target("avx512f"))) static void
lf_tile_at_any(int mr, size_t k, const float* a, size_t lda, const float* bp, size_t ldb, float* c,
               size_t ldc, __mmask16 mask0, __mmask16 mask1, int continue_c) {
    switch (mr) {
        LF_TILE_AT_CASE(1) LF_TILE_AT_CASE(2) LF_TILE_AT_CASE(3) LF_TILE_AT_CASE(4)
        LF_TILE_AT_CASE(5) LF_TILE_AT_CASE(6) LF_TILE_AT_CASE(7) LF_TILE_AT_CASE(8)
        LF_TILE_AT_CASE(9) LF_TILE_AT_CASE(10) LF_TILE_AT_CASE(11) LF_TILE_AT_CASE(12)
        default: break;
    }
}

/* k per block of lf_pgemm_at (lf_kc, derived from L1d: 256 on a 32 KiB L1d): a block's panel
   slice (lf_kc x 32 floats, 32 KB) stays in L1/L2 while every row tile runs over it */

/* One k-block (k0, kb) of lf_pgemm_at, every panel. ldb 0: W packed (lf_pack_w/lf_pack_wt);
   else W.T's rows in place, row-major (k, n) with leading dimension ldb (no packing: x and
   h_prev for the weight gradients are already laid out so). prefetch_next: the next block of A is asked
   into L2, a slice per row tile of the first panel: a long k (T*B) puts A beyond the caches, and
   its tiles' 32-byte reads at a stride of ldat floats came from memory at latency ((100,256,64,64)
   dW: 82 -> 91 GF/s in a C benchmark of that shape). */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_pgemm_at_block_mr(const int mr, size_t m, size_t n, size_t k, size_t k0, size_t kc,
                     const float* at, size_t ldat, const float* packed, size_t ldb, float* c,
                     size_t ldc, int prefetch_next) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR;
    size_t kb = k - k0 < kc ? k - k0 : kc;
    int cont = k0 > 0;
    size_t kb_next = k0 + kc < k ? (k - k0 - kc < kc ? k - k0 - kc : kc) : 0;
    for (size_t p = 0; p < n_panels; p++) {
        size_t j0 = p * LF_NR;
        size_t width = n - j0 < LF_NR ? n - j0 : LF_NR;
        __mmask16 mask0 = lf_mask_lo(width), mask1 = lf_mask_hi(width);
        const float* bp = ldb ? packed + k0 * ldb + j0 : packed + (p * k + k0) * LF_NR;
        const float* a = at + k0 * ldat;
        size_t n_tiles = (m + mr - 1) / mr;
        size_t next_bytes = p == 0 && prefetch_next ? kb_next * ldat * sizeof(float) : 0;
        size_t slice = (next_bytes / n_tiles + 63) / 64 * 64;
        const char* next_a = (const char*) (a + kc * ldat);
        size_t r = 0;
        for (; r + mr <= m; r += mr) {
            size_t off = r / mr * slice;
            if (off < next_bytes)
                lf_prefetch(next_a + off, off + slice <= next_bytes ? slice : next_bytes - off);
            lf_tile_at(mr, kb, a + r, ldat, bp, ldb, c + r * ldc + j0, ldc, mask0, mask1, cont);
        }
        if (kb_next > 0 && !ldb)
            lf_prefetch(bp + kc * LF_NR, kb_next * LF_NR * sizeof(float));
        else if (kb_next > 0 && p == 0)      /* the next block's rows, all panels at once */
            lf_prefetch(packed + (k0 + kc) * ldb, kb_next * ldb * sizeof(float));
        if (r < m)
            lf_tile_at_any((int) (m - r), kb, a + r, ldat, bp, ldb, c + r * ldc + j0, ldc, mask0,
                           mask1, cont);
    }
}

__attribute__((target("avx512f"))) static void
lf_pgemm_at_block(size_t m, size_t n, size_t k, size_t k0, size_t kc, const float* at, size_t ldat,
                  const float* packed, size_t ldb, float* c, size_t ldc, int prefetch_next) {
    if (lf_mr == 12)
        lf_pgemm_at_block_mr(12, m, n, k, k0, kc, at, ldat, packed, ldb, c, ldc, prefetch_next);
    else
        lf_pgemm_at_block_mr(LF_MR, m, n, k, k0, kc, at, ldat, packed, ldb, c, ldc, prefetch_next);
}

/* C(m, n) = A(m, k) @ W.T with A given as its transpose at (k, m), leading dimension ldat, and W
   (n, k) packed by lf_pack_w or lf_pack_wt. For weight gradients, dW = dZ.T @ X, where k is the
   long T*B axis: k runs in blocks of lf_kc, partial sums kept in C, each output one FMA chain. */
__attribute__((target("avx512f"))) static void
lf_pgemm_at_avx512(size_t m, size_t n, size_t k, const float* at, size_t ldat, const float* packed,
            float* c, size_t ldc) {
    if (k == 0)
        for (size_t r = 0; r < m; r++)
            memset(c + r * ldc, 0, n * sizeof(float));
    for (size_t k0 = 0; k0 < k; k0 += lf_kc)
        lf_pgemm_at_block(m, n, k, k0, lf_kc, at, ldat, packed, 0, c, ldc, 1);
}

/* colsum[0:m] += row[0:m] (the bias gradient's sums, one row of dZ at a time, in row order) */
__attribute__((target("avx512f"))) static inline void
lf_colsum_add(size_t m, const float* row, float* colsum) {
    for (size_t i = 0; i < m; i += 16) {
        __mmask16 lanes = m - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (m - i)) - 1u);
        _mm512_mask_storeu_ps(colsum + i, lanes,
                              _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, colsum + i),
                                            _mm512_maskz_loadu_ps(lanes, row + i)));
    }
}

/* One k-block (kb values from at, rows of m) of A packed for lf_at_panels: tile t's rows
   r0..r0+mr as apack[(t * kb + q) * mr + i] (18 KB a 12-row tile at kb = 384: it stays in L1
   while every panel of a group runs over it). A's rows are read whole and in order (dZ's 4H
   floats a row: the prefetchers' favourite) where the tiles read 48 bytes at a stride of 4H.
   colsum (or NULL) gets each row added in order: the same sums as lf_pgemm_at2 made before. */
__attribute__((target("avx512f"))) static void
lf_pack_at_block(size_t m, size_t kb, const float* at, size_t ldat, size_t mr, float* apack,
                 float* colsum) {
    size_t n_tiles = (m + mr - 1) / mr;
    for (size_t q = 0; q < kb; q++) {
        const float* row = at + q * ldat;
        for (size_t t = 0; t < n_tiles; t++) {
            size_t r0 = t * mr, rows = m - r0 < mr ? m - r0 : mr;
            __mmask16 lanes = (__mmask16) ((1u << rows) - 1u);
            _mm512_mask_storeu_ps(apack + (t * kb + q) * mr, lanes,
                                  _mm512_maskz_loadu_ps(lanes, row + r0));
        }
        if (colsum != NULL)
            lf_colsum_add(m, row, colsum);
    }
}

/* Panels of B per pass over A's row tiles: 8 x 32 columns x kb (384 KB at kb = 384, 256 KB at
   Zen 4's 256), a quarter of L2 or less, read from L2 by every row tile */
#define LF_AT_GROUP 8

/* C(m, n) of one k-block from A packed by lf_pack_at_block: for each group of panels, every row
   tile (from L1) over the group's panels (from L2). Each output is the same FMA chain as in
   lf_pgemm_at_block (C's partial sums carried on from block to block). */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_at_panels_mr(const int mr, size_t m, size_t n, size_t k, size_t k0, size_t kb,
                const float* apack, const float* packed, size_t ldb, float* c, size_t ldc) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR, n_tiles = (m + mr - 1) / mr;
    int cont = k0 > 0;
    for (size_t g0 = 0; g0 < n_panels; g0 += LF_AT_GROUP) {
        size_t g1 = g0 + LF_AT_GROUP < n_panels ? g0 + LF_AT_GROUP : n_panels;
        for (size_t t = 0; t < n_tiles; t++) {
            size_t r0 = t * mr, rows = m - r0 < (size_t) mr ? m - r0 : (size_t) mr;
            const float* a = apack + t * kb * mr;
            for (size_t p = g0; p < g1; p++) {
                size_t j0 = p * LF_NR;
                size_t width = n - j0 < LF_NR ? n - j0 : LF_NR;
                __mmask16 mask0 = lf_mask_lo(width), mask1 = lf_mask_hi(width);
                const float* bp = ldb ? packed + k0 * ldb + j0 : packed + (p * k + k0) * LF_NR;
                float* cp = c + r0 * ldc + j0;
                if (rows < (size_t) mr)
                    lf_tile_at_any((int) rows, kb, a, mr, bp, ldb, cp, ldc, mask0, mask1, cont);
                else
                    lf_tile_at(mr, kb, a, mr, bp, ldb, cp, ldc, mask0, mask1, cont);
            }
        }
    }
}

__attribute__((target("avx512f"))) static void
lf_at_panels(size_t m, size_t n, size_t k, size_t k0, size_t kb, const float* apack,
             const float* packed, size_t ldb, float* c, size_t ldc) {
    if (lf_mr == 12)
        lf_at_panels_mr(12, m, n, k, k0, kb, apack, packed, ldb, c, ldc);
    else
        lf_at_panels_mr(LF_MR, m, n, k, k0, kb, apack, packed, ldb, c, ldc);
}

/* Two lf_pgemm_at products of one A, C1 = A @ W1.T and C2 = A @ W2.T (each W packed, ldb 0, or
   given as W.T's rows in place, see lf_pgemm_at_block), block by block over k, and
   the sums of A's columns over k in order (colsum[i] = sum of at[q * ldat + i], or NULL): each
   block of A, read from memory once, serves all three while it is in L2. For dW_ih, dW_hh and
   db from dZ, where separate passes read dZ three times: (100,256,64,64) in 64-row blocks, both
   products 65 -> 87 GF/s in a C benchmark. Each output is the same FMA chain (or sum) as alone.
   With at most 64 columns in W1 and W2, k runs in blocks of 64: a block's slice of a panel
   (8 KB) then stays in L1 while every row tile of m runs over it ((100,256,64,64) dW_ih + dW_hh,
   all 256 rows in one call: 93 -> 103 GF/s in a C benchmark; with more columns the partial sums
   in C cost more than that saves). */
__attribute__((target("avx512f"))) static void
lf_pgemm_at2_avx512(size_t m, size_t k, const float* at, size_t ldat, size_t n1, const float* b1,
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
    /* wider products: A packed a k-block at a time (lf_pack_at_block), the tiles over groups of
       panels ((50,64,512,512) dW_ih + dW_hh, 1 thread, Xeon 6/207: A re-read from L2/L3 at a
       stride of 4H for every panel before) */
    void* raw = NULL;
    size_t mr = (size_t) lf_mr, n_tiles = (m + mr - 1) / mr;
    float* apack = n1 <= 64 && n2 <= 64 ? NULL
                 : lf_ws_aligned(LF_WS_APACK, kc * n_tiles * mr, &raw);
    if (apack != NULL) {
        for (size_t k0 = 0; k0 < k; k0 += kc) {
            size_t kb = k - k0 < kc ? k - k0 : kc;
            lf_pack_at_block(m, kb, at + k0 * ldat, ldat, mr, apack, colsum);
            lf_at_panels(m, n1, k, k0, kb, apack, b1, ldb1, c1, ldc1);
            lf_at_panels(m, n2, k, k0, kb, apack, b2, ldb2, c2, ldc2);
        }
        lf_ws_release(LF_WS_APACK, raw);
        return;
    }
    for (size_t k0 = 0; k0 < k; k0 += kc) {
        lf_pgemm_at_block(m, n1, k, k0, kc, at, ldat, b1, ldb1, c1, ldc1, 1);
        lf_pgemm_at_block(m, n2, k, k0, kc, at, ldat, b2, ldb2, c2, ldc2, 0);
        if (colsum != NULL) {
            size_t kb = k - k0 < kc ? k - k0 : kc;
            for (size_t q = k0; q < k0 + kb; q++)
                lf_colsum_add(m, at + q * ldat, colsum);
        }
    }
}

/* NP panels of one row: 2*NP independent FMA chains (one row alone would wait on the latency of
   a single chain per half panel); each output is still one chain over k in order, the same sum
   as in lf_pgemm's tiles, so a row's bits do not depend on how many rows run with it. */
__attribute__((target("avx512f"), always_inline)) static inline void
lf_row_panels(const int np, size_t k, const float* a, const float* bp, float* c, size_t end,
              size_t j0) {
    __m512 acc[8];
    LF_UNROLL_ROWS for (int q = 0; q < 2 * np; q++)
        acc[q] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (size_t kk = 0; kk < k; kk++) {
        __m512 av = _mm512_set1_ps(a[kk]);
        LF_UNROLL_ROWS for (int q = 0; q < np; q++) {
            const float* b = bp + (q * k + kk) * LF_NR;
            acc[2 * q] = _mm512_fmadd_ps(av, _mm512_load_ps(b), acc[2 * q]);
            acc[2 * q + 1] = _mm512_fmadd_ps(av, _mm512_load_ps(b + 16), acc[2 * q + 1]);
        }
    }
    LF_UNROLL_ROWS for (int q = 0; q < np; q++) {
        size_t j = j0 + q * LF_NR;
        size_t width = end - j < LF_NR ? end - j : LF_NR;
        _mm512_mask_storeu_ps(c + j, lf_mask_lo(width), acc[2 * q]);
        _mm512_mask_storeu_ps(c + j + 16, lf_mask_hi(width), acc[2 * q + 1]);
    }
}

/* the panels p .. p + np - 1 of one row (np <= 4) */
__attribute__((target("avx512f"))) static inline void
lf_row_group(size_t np, size_t p, size_t k, const float* a, const float* packed, float* c,
             size_t end) {
    switch (np) {
        case 4: lf_row_panels(4, k, a, packed + p * k * LF_NR, c, end, p * LF_NR); break;
        case 3: lf_row_panels(3, k, a, packed + p * k * LF_NR, c, end, p * LF_NR); break;
        case 2: lf_row_panels(2, k, a, packed + p * k * LF_NR, c, end, p * LF_NR); break;
        case 1: lf_row_panels(1, k, a, packed + p * k * LF_NR, c, end, p * LF_NR); break;
        default: break;
    }
}

/* one row: c[col0:col0+n_cols] = a(k) @ W[cols].T (c indexed from column 0), W as in lf_pgemm.
   backwards: the groups of 4 panels in reverse order. A recurrence that alternates the direction
   step by step finds in L1 the panels the previous step read last (LRU keeps them), where a
   fixed order evicts every panel before its reuse once W exceeds L1: (T=1000, B=1, H=64) W_hh
   (64 KB) 0.58 -> 0.47 us a product here. Each output's sum is the same either way. */
__attribute__((target("avx512f"))) static void
lf_pgemv_dir_avx512(size_t col0, size_t n_cols, size_t k, const float* a, const float* packed, float* c,
             int backwards) {
    size_t p0 = col0 / LF_NR, p1 = (col0 + n_cols + LF_NR - 1) / LF_NR;
    size_t end = col0 + n_cols;
    size_t n_full = (p1 - p0) / 4, rest = (p1 - p0) % 4;
    if (!backwards) {
        for (size_t g = 0; g < n_full; g++)
            lf_row_group(4, p0 + 4 * g, k, a, packed, c, end);
        lf_row_group(rest, p0 + 4 * n_full, k, a, packed, c, end);
    } else {
        lf_row_group(rest, p0 + 4 * n_full, k, a, packed, c, end);
        for (size_t g = n_full; g-- > 0;)
            lf_row_group(4, p0 + 4 * g, k, a, packed, c, end);
    }
}



/* One step's row product of a batch-1 recurrence, c = a(k) @ W.T for units u0..u1 (multiples of
   32; lf_pgemv_gates' order, the four gate panels of 32 units at a time), with the input
   projection of later steps folded in: an 8-row tile C_t = A_t(8, tk) @ W_t.T over the panels
   tv0..tv1 of the unit range's gate columns, counted gate by gate (panel v: gate v / (units / 32),
   unit panel v % (units / 32)), W_t packed at t_packed, C_t at tc (column 0, leading dimension
   tldc). The row product streams W from L2 at about 32 B/cycle and leaves the FMA units mostly
   idle; the tile is FMA work on data in L1, one tile k-step every second row k-step. Measured
   (Zen 4, H=128, I=128, a step's product and its share of the projection): 3.53 -> 2.74 us.
   Every output is still one FMA chain over k in order: the bits of lf_pgemv_gates and lf_pgemm.
   Tile k-steps start at the tile_from-th group of the step: the first group is still partly in
   L1 from the previous step (alternating order, lf_pgemv_dir), so its product is FMA-bound and
   has no slots to give; (H=64, I=32, product + cell a step: up front 0.77, tiles from group 0
   0.75, from group 1 0.72 us; H=128: from group 1 slower, 3.00 -> 3.15 us).
   The tiles run k-steps tk0..tk1 of their panels (0..tk: all); from tk0 > 0 they continue the
   partial sums a call before left in C_t, the same chains, so that a share of the work smaller
   than a panel can be spread over steps. */
__attribute__((target("avx512f"))) static void
lf_pgemv_gates_tiles_avx512(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                     const float* packed, float* c, int backwards, size_t tk, const float* ta,
                     size_t tlda, const float* t_packed, size_t tv0, size_t tv1, float* tc,
                     size_t tldc, size_t tile_from, size_t tk0, size_t tk1) {
    size_t n_groups = (u1 - u0) / LF_NR;
#define LF_TILE_PANEL(v) ((v) / n_groups * (hidden / LF_NR) + u0 / LF_NR + (v) % n_groups)
#define LF_TILE_START() do {                    /* zero, or C_t's partial sums from tk0 > 0 */  \
        LF_UNROLL_ROWS for (int r = 0; r < LF_MR; r++) {                                        \
            t0[r] = tk0 > 0 && tcp ? _mm512_loadu_ps(tcp + r * tldc) : _mm512_setzero_ps();     \
            t1[r] = tk0 > 0 && tcp ? _mm512_loadu_ps(tcp + r * tldc + 16) : _mm512_setzero_ps(); \
        }                                                                                       \
    } while (0)
    __m512 t0[LF_MR], t1[LF_MR];
    size_t t_left = tv0 < tv1 && n_groups > 0 && tk0 < tk1 ? (tv1 - tv0) * (tk1 - tk0) : 0;
    size_t t_kk = tk0, tv = tv0;
    const float* tbp = t_left ? t_packed + (LF_TILE_PANEL(tv) * tk + tk0) * LF_NR : NULL;
    float* tcp = t_left ? tc + LF_TILE_PANEL(tv) * LF_NR : NULL;
    LF_TILE_START();
#define LF_TILE_STEP() do {                                                                     \
        __m512 b0 = _mm512_load_ps(tbp), b1 = _mm512_load_ps(tbp + 16);                         \
        tbp += LF_NR;                                                                           \
        LF_UNROLL_ROWS for (int r = 0; r < LF_MR; r++) {                                        \
            __m512 tv_ = _mm512_set1_ps(ta[r * tlda + t_kk]);                                   \
            t0[r] = _mm512_fmadd_ps(tv_, b0, t0[r]);                                            \
            t1[r] = _mm512_fmadd_ps(tv_, b1, t1[r]);                                            \
        }                                                                                       \
        t_left--;                                                                               \
        if (++t_kk == tk1) {                  /* a panel's share done: store it, start the next */ \
            LF_UNROLL_ROWS for (int r = 0; r < LF_MR; r++) {                                    \
                _mm512_storeu_ps(tcp + r * tldc, t0[r]);                                        \
                _mm512_storeu_ps(tcp + r * tldc + 16, t1[r]);                                   \
            }                                                                                   \
            t_kk = tk0;                                                                         \
            if (++tv < tv1) {                                                                   \
                tbp = t_packed + (LF_TILE_PANEL(tv) * tk + tk0) * LF_NR;                        \
                tcp = tc + LF_TILE_PANEL(tv) * LF_NR;                                           \
                LF_TILE_START();                                                                \
            }                                                                                   \
        }                                                                                       \
    } while (0)
    for (size_t q = 0; q < n_groups; q++) {
        size_t u = u0 + (backwards ? n_groups - 1 - q : q) * LF_NR;   /* see lf_pgemv_dir */
        const float* bp[4];
        __m512 acc[8];
        for (int g = 0; g < 4; g++) {
            bp[g] = packed + (g * hidden + u) / LF_NR * k * LF_NR;
            acc[2 * g] = _mm512_setzero_ps();
            acc[2 * g + 1] = _mm512_setzero_ps();
        }
        for (size_t kk = 0; kk < k; kk++) {
            __m512 av = _mm512_set1_ps(a[kk]);
            for (int g = 0; g < 4; g++) {
                const float* b = bp[g] + kk * LF_NR;
                acc[2 * g] = _mm512_fmadd_ps(av, _mm512_load_ps(b), acc[2 * g]);
                acc[2 * g + 1] = _mm512_fmadd_ps(av, _mm512_load_ps(b + 16), acc[2 * g + 1]);
            }
            if ((kk & 1) && t_left && q >= tile_from)
                LF_TILE_STEP();
        }
        for (int g = 0; g < 4; g++) {
            _mm512_storeu_ps(c + g * hidden + u, acc[2 * g]);
            _mm512_storeu_ps(c + g * hidden + u + 16, acc[2 * g + 1]);
        }
    }
    while (t_left)              /* tile work beyond half the row's k-steps (I much larger than H) */
        LF_TILE_STEP();
#undef LF_TILE_STEP
#undef LF_TILE_START
#undef LF_TILE_PANEL
}

/* lf_gemv_rows: y[r * ldy + j] = W[j, :] . x[r, :] for the nx rows of x (leading dimension ldx),
   W (n, k) row-major (leading dimension ldw), unpacked: for the streaming step, which reads each
   weight once per call, so packing would cost more than it saves (scipy's sgemm repacked W at
   every step: 39 % of a batch-16 step in its copy routine). A tile is WR (4, or 1 for the last
   rows) weight rows x XR input rows, each output a 16-lane partial sum over k in order, reduced
   at the end: a row's result does not depend on the batch it came in, nor on where a caller's
   range of rows starts, as long as it starts on a multiple of 4. For one row the loads stream at
   L2's rate, where scipy's sgemv reached about two thirds of it (H=128, batch 1: 6.8 -> 4.9 us
   for the two products of a step). */

/* the sums of the 16 lanes of a0..a3 (in one fixed order): 8 shuffles and 7 adds, where four
   _mm512_reduce_add_ps take 16 and 16, as many operations as a k of 128's FMAs */
static inline __attribute__((always_inline, target("avx512f"))) __m128
lf_hsum4_avx512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    /* pairs: per 128-bit lane [a0 a1 a0 a1] and [a2 a3 a2 a3] */
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    /* per 128-bit lane [a0 a1 a2 a3] */
    const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44),
                                   _mm512_shuffle_ps(s01, s23, 0xEE));
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#define LF_GEMV_XR 4   /* input rows a tile: 4 x 4 accumulators, 4 + 4 loads per 16 FMAs */
#define LF_GEMV_XR_AVX2 2   /* 16 ymm registers: 4 x 2 accumulators */
static inline __attribute__((always_inline, target("avx512f"))) void
lf_gemv_tile_avx512(int WR, int XR, size_t k, const float* w, size_t ldw, const float* x,
                    size_t ldx, float* y, size_t ldy) {
    const size_t tail = k % 16;
    const __mmask16 mask = (__mmask16) ((1u << tail) - 1u);
    __m512 acc[4][LF_GEMV_XR];
    for (int a = 0; a < WR; a++)
        for (int b = 0; b < XR; b++)
            acc[a][b] = _mm512_setzero_ps();
    size_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m512 xv[LF_GEMV_XR];
        for (int b = 0; b < XR; b++)
            xv[b] = _mm512_loadu_ps(x + b * ldx + kk);
        for (int a = 0; a < WR; a++) {
            const __m512 wv = _mm512_loadu_ps(w + a * ldw + kk);
            for (int b = 0; b < XR; b++)
                acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
        }
    }
    if (tail) {
        __m512 xv[LF_GEMV_XR];
        for (int b = 0; b < XR; b++)
            xv[b] = _mm512_maskz_loadu_ps(mask, x + b * ldx + kk);
        for (int a = 0; a < WR; a++) {
            const __m512 wv = _mm512_maskz_loadu_ps(mask, w + a * ldw + kk);
            for (int b = 0; b < XR; b++)
                acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
        }
    }
    if (WR == 4) {
        for (int b = 0; b < XR; b++)
            _mm_storeu_ps(y + b * ldy, lf_hsum4_avx512(acc[0][b], acc[1][b], acc[2][b], acc[3][b]));
    } else {
        for (int b = 0; b < XR; b++)
            y[b * ldy] = _mm512_reduce_add_ps(acc[0][b]);
    }
}

/* rows j0..j1 of W against XR input rows: the tile with WR and XR as constants (its loops unroll,
   acc stays in registers, no dispatch a tile: a switch there cost a batch-1 step 20 %) */
#define LF_GEMV_PASS(ISA, TARGET, XR)                                                             \
__attribute__((target(TARGET))) static void lf_gemv_pass_##ISA##_##XR(                            \
        size_t j0, size_t j1, size_t k, const float* w, size_t ldw, const float* x, size_t ldx,  \
        float* y, size_t ldy) {                                                                  \
    size_t j = j0;                                                                                \
    for (; j + 4 <= j1; j += 4)                                                                   \
        lf_gemv_tile_##ISA(4, XR, k, w + j * ldw, ldw, x, ldx, y + j, ldy);                       \
    for (; j < j1; j++)                                                                           \
        lf_gemv_tile_##ISA(1, XR, k, w + j * ldw, ldw, x, ldx, y + j, ldy);                       \
}
typedef void (*lf_gemv_pass_fn)(size_t, size_t, size_t, const float*, size_t, const float*, size_t,
                                float*, size_t);
/* W in chunks of rows that fit 16 KB of L1 (a multiple of 4 rows), each chunk passed by every
   block of XRMAX input rows while it is in L1: W streams from L2 (or L3) once a step whatever
   the batch */
#define LF_GEMV_ROWS(ISA, TARGET, XRMAX, ...)                                                     \
__attribute__((target(TARGET))) static void lf_gemv_rows_##ISA(                                   \
        size_t n, size_t k, const float* w, size_t ldw, const float* x, size_t ldx, size_t nx,   \
        float* y, size_t ldy) {                                                                  \
    static const lf_gemv_pass_fn pass[XRMAX] = {__VA_ARGS__};                                     \
    size_t chunk = nx <= XRMAX ? n : (16384 / (4 * (k ? k : 1))) & ~(size_t) 3;                   \
    if (chunk < 4)                                                                                \
        chunk = 4;                                                                                \
    for (size_t j0 = 0; j0 < n; j0 += chunk) {                                                    \
        const size_t j1 = n - j0 < chunk ? n : j0 + chunk;                                        \
        for (size_t r = 0; r < nx; r += XRMAX) {                                                  \
            const size_t xr = nx - r < XRMAX ? nx - r : XRMAX;                                    \
            pass[xr - 1](j0, j1, k, w, ldw, x + r * ldx, ldx, y + r * ldy, ldy);                  \
        }                                                                                         \
    }                                                                                             \
}
LF_GEMV_PASS(avx512, "avx512f", 1)
LF_GEMV_PASS(avx512, "avx512f", 2)
LF_GEMV_PASS(avx512, "avx512f", 3)
LF_GEMV_PASS(avx512, "avx512f", 4)
LF_GEMV_ROWS(avx512, "avx512f", LF_GEMV_XR, lf_gemv_pass_avx512_1, lf_gemv_pass_avx512_2,
             lf_gemv_pass_avx512_3, lf_gemv_pass_avx512_4)

#include "lf_pgemm_avx2.h"

/* The entry points: the path lf_isa() names (AVX-512 or AVX2; the callers use none of them on
   the generic path). One well-predicted branch a call. */
static void lf_pgemv_dir(size_t col0, size_t n_cols, size_t k, const float* a,
                         const float* packed, float* c, int backwards) {
    if (lf_isa() >= 2)
        lf_pgemv_dir_avx512(col0, n_cols, k, a, packed, c, backwards);
    else
        lf_pgemv_dir_avx2(col0, n_cols, k, a, packed, c, backwards);
}
static void lf_pgemm(size_t m, size_t col0, size_t n_cols, size_t k, const float* a, size_t lda,
                     const float* packed, float* c, size_t ldc, int accumulate) {
    /* one row alone (a step's input projection at batch 1): the row kernel's 8 chains, not a
       tile's 2, which wait on the FMA latency; the same sums (one chain over k per output) */
    if (m == 1 && !accumulate) {
        lf_pgemv_dir(col0, n_cols, k, a, packed, c, 0);
        return;
    }
    if (lf_isa() >= 2)
        lf_pgemm_avx512(m, col0, n_cols, k, a, lda, packed, c, ldc, accumulate);
    else
        lf_pgemm_avx2(m, col0, n_cols, k, a, lda, packed, c, ldc, accumulate);
}
static void lf_pgemm_at(size_t m, size_t n, size_t k, const float* at, size_t ldat,
                        const float* packed, float* c, size_t ldc) {
    if (lf_isa() >= 2)
        lf_pgemm_at_avx512(m, n, k, at, ldat, packed, c, ldc);
    else
        lf_pgemm_at_avx2(m, n, k, at, ldat, packed, c, ldc);
}
static void lf_pgemm_at2(size_t m, size_t k, const float* at, size_t ldat, size_t n1,
                         const float* b1, size_t ldb1, float* c1, size_t ldc1, size_t n2,
                         const float* b2, size_t ldb2, float* c2, size_t ldc2, float* colsum) {
    if (lf_isa() >= 2)
        lf_pgemm_at2_avx512(m, k, at, ldat, n1, b1, ldb1, c1, ldc1, n2, b2, ldb2, c2, ldc2, colsum);
    else
        lf_pgemm_at2_avx2(m, k, at, ldat, n1, b1, ldb1, c1, ldc1, n2, b2, ldb2, c2, ldc2, colsum);
}
static void lf_pgemv(size_t col0, size_t n_cols, size_t k, const float* a, const float* packed,
                     float* c) {
    lf_pgemv_dir(col0, n_cols, k, a, packed, c, 0);
}
static void lf_pgemv_gates_tiles(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                                 const float* packed, float* c, int backwards, size_t tk,
                                 const float* ta, size_t tlda, const float* t_packed, size_t tv0,
                                 size_t tv1, float* tc, size_t tldc, size_t tile_from,
                                 size_t tk0, size_t tk1) {
    if (lf_isa() >= 2)
        lf_pgemv_gates_tiles_avx512(hidden, u0, u1, k, a, packed, c, backwards, tk, ta, tlda,
                                    t_packed, tv0, tv1, tc, tldc, tile_from, tk0, tk1);
    else
        lf_pgemv_gates_tiles_avx2(hidden, u0, u1, k, a, packed, c, backwards, tk, ta, tlda,
                                  t_packed, tv0, tv1, tc, tldc, tk0, tk1);
}
/* the four gate panels of units u..u+32 of one row at once (8 independent chains, where a lone
   panel per call would wait on FMA latency): c[g*hidden + u0 .. g*hidden + u1] for g = 0..3;
   hidden and u0 are multiples of LF_NR; the same sums as lf_pgemv's */
static void lf_pgemv_gates(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                           const float* packed, float* c, int backwards) {
    lf_pgemv_gates_tiles(hidden, u0, u1, k, a, packed, c, backwards, 0, NULL, 0, NULL, 0, 0, NULL, 0,
                         0, 0, 0);
}
static void lf_gemv_rows(size_t n, size_t k, const float* w, size_t ldw, const float* x,
                         size_t ldx, size_t nx, float* y, size_t ldy) {
    if (lf_isa() >= 2)
        lf_gemv_rows_avx512(n, k, w, ldw, x, ldx, nx, y, ldy);
    else
        lf_gemv_rows_avx2(n, k, w, ldw, x, ldx, nx, y, ldy);
}

/* shared: other threads read the packed copy too (lf_store_packed) */
static void lf_pack_w_for(const float* w, size_t ldw, size_t n, size_t k, float* packed,
                          int shared) {
    if (lf_isa() < 2)
        lf_pack_w_avx2_or_scalar(w, ldw, n, k, packed, shared);
    else if (shared)
        lf_pack_w_shared_avx512(w, ldw, n, k, packed);
    else
        lf_pack_w_avx512(w, ldw, n, k, packed);
}
static void lf_pack_w(const float* w, size_t ldw, size_t n, size_t k, float* packed) {
    lf_pack_w_for(w, ldw, n, k, packed, 0);
}
/* lf_pack_wt for a copy other threads read too: the kept copy compared first (lf_store_packed) */
__attribute__((target("avx512f"))) static void
lf_pack_wt_shared_avx512(const float* wt, size_t ldw, size_t n, size_t k, float* packed) {
    size_t n_panels = (n + LF_NR - 1) / LF_NR;
    for (size_t p = 0; p < n_panels; p++) {
        float* dst = packed + p * k * LF_NR;
        size_t j0 = p * LF_NR, width = n - j0 < LF_NR ? n - j0 : LF_NR;
        __mmask16 m0 = lf_mask_lo(width), m1 = lf_mask_hi(width);
        for (size_t kk = 0; kk < k; kk++) {
            const float* src = wt + kk * ldw + j0;
            lf_store_packed(dst + kk * LF_NR, _mm512_maskz_loadu_ps(m0, src), 1);
            lf_store_packed(dst + kk * LF_NR + 16, _mm512_maskz_loadu_ps(m1, src + 16), 1);
        }
    }
}
static void lf_pack_wt_for(const float* wt, size_t ldw, size_t n, size_t k, float* packed,
                           int shared) {
    if (shared && lf_isa() >= 2)
        lf_pack_wt_shared_avx512(wt, ldw, n, k, packed);
    else
        lf_pack_wt(wt, ldw, n, k, packed);
}
#else
static inline int lf_isa(void) { return 0; }
static int lf_pgemm_available(void) { return 0; }
static int lf_set_kernel(int isa, int mr, size_t kc, size_t kc_narrow) {
    (void) isa; (void) mr; (void) kc; (void) kc_narrow;
    return 0;
}
static void lf_pack_w_for(const float* w, size_t ldw, size_t n, size_t k, float* packed,
                          int shared) {
    (void) shared;
    lf_pack_w_scalar(w, ldw, n, k, packed);
}
static void lf_pack_w(const float* w, size_t ldw, size_t n, size_t k, float* packed) {
    lf_pack_w_scalar(w, ldw, n, k, packed);
}
static void lf_pack_wt_for(const float* wt, size_t ldw, size_t n, size_t k, float* packed,
                           int shared) {
    (void) shared;
    lf_pack_wt(wt, ldw, n, k, packed);
}
static void lf_pgemv_dir(size_t col0, size_t n_cols, size_t k, const float* a,
                         const float* packed, float* c, int backwards) {
    (void) col0; (void) n_cols; (void) k; (void) a; (void) packed; (void) c; (void) backwards;
}
static void lf_pgemv(size_t col0, size_t n_cols, size_t k, const float* a, const float* packed,
                     float* c) {
    (void) col0; (void) n_cols; (void) k; (void) a; (void) packed; (void) c;
}
static void lf_pgemm(size_t m, size_t col0, size_t n_cols, size_t k, const float* a, size_t lda,
                     const float* packed, float* c, size_t ldc, int accumulate) {
    (void) m; (void) col0; (void) n_cols; (void) k; (void) a; (void) lda; (void) packed; (void) c;
    (void) ldc; (void) accumulate;
}
static void lf_pgemm_at(size_t m, size_t n, size_t k, const float* at, size_t ldat,
                        const float* packed, float* c, size_t ldc) {
    (void) m; (void) n; (void) k; (void) at; (void) ldat; (void) packed; (void) c; (void) ldc;
}
static void lf_pgemm_at2(size_t m, size_t k, const float* at, size_t ldat, size_t n1,
                         const float* b1, size_t ldb1, float* c1, size_t ldc1, size_t n2,
                         const float* b2, size_t ldb2, float* c2, size_t ldc2, float* colsum) {
    (void) m; (void) k; (void) at; (void) ldat; (void) n1; (void) b1; (void) ldb1; (void) c1;
    (void) ldc1; (void) n2; (void) b2; (void) ldb2; (void) c2; (void) ldc2; (void) colsum;
}
static void lf_pgemv_gates_tiles(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                                 const float* packed, float* c, int backwards, size_t tk,
                                 const float* ta, size_t tlda, const float* t_packed, size_t tv0,
                                 size_t tv1, float* tc, size_t tldc, size_t tile_from,
                                 size_t tk0, size_t tk1) {
    (void) hidden; (void) u0; (void) u1; (void) k; (void) a; (void) packed; (void) c;
    (void) backwards; (void) tk; (void) ta; (void) tlda; (void) t_packed; (void) tv0; (void) tv1;
    (void) tc; (void) tldc; (void) tile_from; (void) tk0; (void) tk1;
}
static void lf_gemv_rows(size_t n, size_t k, const float* w, size_t ldw, const float* x, float* y) {
    (void) n; (void) k; (void) w; (void) ldw; (void) x; (void) y;
}
static void lf_pgemv_gates(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                           const float* packed, float* c, int backwards) {
    (void) hidden; (void) u0; (void) u1; (void) k; (void) a; (void) packed; (void) c;
    (void) backwards;
}
#endif

#endif
