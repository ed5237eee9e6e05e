/* Reduced-precision (bfloat16, int8) products of the LSTM's inference kernels (src/_lowp.pyx).

   Numerics (docs/precision.md):
   - bfloat16: weights and activations rounded to bfloat16, nearest-even, with float32 subnormals
     flushed to (signed) zero, NaN kept quiet: what VCVTNE2PS2BF16 does. Each output is one float32
     chain over the input pairs in order, acc = fma(w[2p+1], x[2p+1], acc); acc = fma(w[2p],
     x[2p], acc) (the product of two bfloat16 is exact in float32 unless it underflows; fused, it
     is not rounded on its own then), a subnormal sum flushed to zero: what
     VDPBF16PS does, measured bit for bit on AMD Zen 5 (3.2M random cases); the generic path
     computes the same, so both give the same bits. AMX's TDPBF16PS sums differently (an even and an
     odd chain per 32 inputs, then added to the accumulator: lf_emu_dpbf16, measured bit for bit
     on a Xeon with AMX); its emulation gives the hardware's bits, and differs from the other
     paths in the last bits.
   - int8: weights symmetric per output row, s_w = max|w_row| / 127, q = rint(w * (127 /
     max|w_row|)) in [-127, 127]; activations symmetric per row (a batch row of x_t or h_{t-1}),
     s_x = max|x_row| / 127, stored as q + 128 in uint8 for VPDPBUSD (u8 x s8), corrected by
     128 * sum_k q_w exactly in int32. out = (float) acc * (s_x * s_w). Exact integer sums: every
     path (generic, VNNI, AMX) gives the same bits. A row holding NaN or inf gives NaN outputs; a row
     whose largest magnitude is below 2^-120 quantizes to zeros.

   Packed weights of an (n, k) matrix: blocks of 16 output rows, k padded to kp (a multiple of 32
   bfloat16 or 64 int8, one AMX tile row of 64 bytes); inside a block, row p of 64 bytes holds the
   16 outputs' pair (bf16) or quad (int8) p: [blk][p][16][2 or 4]. That is the broadcast layout of
   VDPBF16PS/VPDPBUSD (one 64-byte load per 16 outputs and pair/quad) and, 16 rows of it at a
   time, exactly AMX's B tile (16 rows x 64 bytes, pairs/quads interleaved): one packing for all
   paths. Blocks of 4 KiB or more lie a cache line further apart (lf_lp_bs). */
#ifndef LF_LOWP_H
#define LF_LOWP_H

#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <float.h>
#include "lf_pgemm.h"
#include "lf_split.h"
#if defined(__linux__)
#include <unistd.h>
#include <sys/syscall.h>
#endif
#if LF_PGEMM_X86
#include <cpuid.h>
#endif

enum { LF_LP_BF16 = 1, LF_LP_INT8 = 2 };
enum { LF_PATH_GENERIC = 0, LF_PATH_AVX512 = 1, LF_PATH_AMX = 2, LF_PATH_AMX_EMU = 3,
       LF_PATH_AVX512_FMA = 4, LF_PATH_AVX2_FMA = 5 };   /* AVX2_FMA: also int8 on AVX2 */

typedef struct {
    int kind;
    int n, k, kp, nb;          /* outputs, inputs, padded inputs, blocks of 16 outputs */
    int bs;                    /* elements from one block to the next (lf_lp_bs) */
    const void* w;             /* packed: nb * bs uint16 (bf16) or int8 */
    const float* scale;        /* int8: s_w per output (nb*16) */
    const int32_t* corr;       /* int8: 128 * sum_k q_w per output */
    const void* w_row;         /* bfloat16 on the AMX path: w again in the layout of the one-row
                                  kernel in AMX's order (lf_lp_pack_row_order), or NULL */
} lf_lp_mat;

static inline int lf_lp_kp(int kind, int k) {
    int m = kind == LF_LP_BF16 ? 32 : 64;
    return (k + m - 1) / m * m;
}

/* ------------------------------------------------------------------ scalar conversions */
/* elements from one block of 16 outputs to the next: 16 * kp, and a cache line more from 4 KiB.
   A batch-1 step reads 8 blocks side by side; at a stride of a multiple of 4 KiB their lines
   share an L1 set (AMD EPYC Zen 4, 8 streams of bfloat16 from L2, kp 128: 93-99 B/ns unpadded,
   104-105 padded; kp 192: 89 against 97-99; kp 512: 77 against 82-84) */
static inline int lf_lp_bs(int kind, int kp) {
    const int bytes = 16 * kp * (kind == LF_LP_BF16 ? 2 : 1);
    return bytes >= 4096 ? 16 * kp + (kind == LF_LP_BF16 ? 32 : 64) : 16 * kp;
}

static inline float lf_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t) b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t lf_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t) ((u >> 16) | 0x40u);          /* NaN stays NaN (quiet) */
    if ((u & 0x7f800000u) == 0)
        return (uint16_t) ((u >> 16) & 0x8000u);        /* zero and subnormals: signed zero */
    u += 0x7fffu + ((u >> 16) & 1u);                    /* nearest, ties to even */
    return (uint16_t) (u >> 16);
}

static inline float lf_ftz(float a) {
    return fabsf(a) < FLT_MIN ? copysignf(0.0f, a) : a;
}

/* int8 rows whose largest magnitude is below this quantize to zeros (127 / max would overflow
   float32 from about 3.7e-37; 2^-120 = 7.5e-37) */
#define LF_LP_TINY 7.52316385e-37f

/* int8 pieces shared by the scalar and SIMD conversions (their tails): the largest magnitude of
   x[i0..k) into *amax and whether any is not finite into *bad; the row of zeros for a row that is
   not finite (scale NaN) or too small (scale 0), returning 1 then; q = rint(x * inv) + 128,
   clamped to [-127, 127] first */
static inline void lf_lp_absmax(const float* x, int i0, int k, float* amax, int* bad) {
    for (int i = i0; i < k; i++) {
        const float a = fabsf(x[i]);
        *amax = a > *amax ? a : *amax;
        *bad |= !(a <= FLT_MAX);
    }
}
static inline int lf_lp_q8_flat(int bad, float amax, int kp, uint8_t* q, float* sx) {
    if (!bad && amax >= LF_LP_TINY)
        return 0;
    memset(q, 128, (size_t) kp);
    *sx = bad ? NAN : 0.0f;
    return 1;
}
static inline void lf_lp_q8(const float* x, int i0, int k, float inv, uint8_t* q) {
    for (int i = i0; i < k; i++) {
        float r = rintf(x[i] * inv);
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        q[i] = (uint8_t) ((int) r + 128);
    }
}

/* one activation row -> its quantized row of kp elements (and s_x for int8) */
static void lf_lp_quant_row(int kind, int k, int kp, const float* x, void* dst, float* sx) {
    if (kind == LF_LP_BF16) {
        uint16_t* q = (uint16_t*) dst;
        for (int i = 0; i < k; i++)
            q[i] = lf_f32_to_bf16(x[i]);
        for (int i = k; i < kp; i++)
            q[i] = 0;
        return;
    }
    uint8_t* q = (uint8_t*) dst;
    float amax = 0.0f;
    int bad = 0;
    lf_lp_absmax(x, 0, k, &amax, &bad);
    if (lf_lp_q8_flat(bad, amax, kp, q, sx))
        return;
    lf_lp_q8(x, 0, k, 127.0f / amax, q);
    memset(q + k, 128, (size_t) (kp - k));
    *sx = amax / 127.0f;
}

/* The same conversion of a row in AVX-512 (the same operations lane by lane: the same bits; the
   maximum of magnitudes is exact in any order). Used where the CPU has AVX-512F/BW. */
#if LF_PGEMM_X86
__attribute__((target("avx2,fma,avx512f,avx512bw"))) static void
lf_lp_quant_row_avx512(int kind, int k, int kp, const float* x, void* dst, float* sx) {
    if (kind == LF_LP_BF16) {
        uint16_t* q = (uint16_t*) dst;
        const __m512i absm = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
        int i = 0;
        for (; i < k; i += 16) {
            const __mmask16 mk = k - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (k - i)) - 1u);
            const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(mk, x + i));
            const __m512i hi = _mm512_srli_epi32(u, 16);
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                          _mm512_and_si512(hi, _mm512_set1_epi32(1))), 16);
            const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, absm), inf);
            const __mmask16 sub = _mm512_testn_epi32_mask(u, inf);
            r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
            r = _mm512_mask_mov_epi32(r, sub, _mm512_and_si512(hi, _mm512_set1_epi32(0x8000)));
            _mm512_mask_cvtepi32_storeu_epi16(q + i, mk, r);
        }
        for (i = k; i < kp; i++)
            q[i] = 0;
        return;
    }
    uint8_t* q = (uint8_t*) dst;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int i = 0; i < k; i += 16) {
        const __mmask16 mk = k - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (k - i)) - 1u);
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x + i));
        bad |= _mm512_mask_cmp_ps_mask(mk, a, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);
        vmax = _mm512_max_ps(vmax, a);
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    if (lf_lp_q8_flat(bad != 0, amax, kp, q, sx))
        return;
    const __m512 inv = _mm512_set1_ps(127.0f / amax);
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int i = 0; i < k; i += 16) {
        const __mmask16 mk = k - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (k - i)) - 1u);
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), inv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        _mm512_mask_cvtepi32_storeu_epi8(q + i, mk, _mm512_add_epi32(_mm512_cvtps_epi32(r),
                                                                      _mm512_set1_epi32(128)));
    }
    memset(q + k, 128, (size_t) (kp - k));
    *sx = amax / 127.0f;
}

/* ... and in AVX2, for the AVX2 paths (a portable build compiles the scalar loop above for the
   baseline x86-64, rintf a call per element: 13 % of an int8 (100,16,128,128) call). The same
   operations lane by lane, the tail in the scalar ones: the same bits. */
__attribute__((target("avx2,fma"))) static void
lf_lp_quant_row_avx2(int kind, int k, int kp, const float* x, void* dst, float* sx) {
    const int k8 = k & ~7;
    if (kind == LF_LP_BF16) {
        uint16_t* q = (uint16_t*) dst;
        const __m256i absm = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
        for (int i = 0; i < k8; i += 8) {
            const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + i));
            const __m256i hi = _mm256_srli_epi32(u, 16);
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                          _mm256_and_si256(hi, _mm256_set1_epi32(1))), 16);
            const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absm), inf);  /* both < 2^31 */
            const __m256i sub = _mm256_cmpeq_epi32(_mm256_and_si256(u, inf), _mm256_setzero_si256());
            r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
            r = _mm256_blendv_epi8(r, _mm256_and_si256(hi, _mm256_set1_epi32(0x8000)), sub);
            /* 8 values < 2^16 -> 8 uint16 (packus saturates nothing here) */
            const __m128i v = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storeu_si128((__m128i*) (q + i), v);
        }
        for (int i = k8; i < k; i++)
            q[i] = lf_f32_to_bf16(x[i]);
        for (int i = k; i < kp; i++)
            q[i] = 0;
        return;
    }
    uint8_t* q = (uint8_t*) dst;
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int bad = 0;
    for (int i = 0; i < k8; i += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), absm);
        bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ));
        vmax = _mm256_max_ps(vmax, a);
    }
    _Alignas(32) float m8[8];
    _mm256_store_ps(m8, vmax);
    float amax = 0.0f;
    for (int i = 0; i < 8; i++)
        amax = m8[i] > amax ? m8[i] : amax;
    lf_lp_absmax(x, k8, k, &amax, &bad);
    if (lf_lp_q8_flat(bad, amax, kp, q, sx))
        return;
    const float inv = 127.0f / amax;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (int i = 0; i < k8; i += 8) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        const __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(128));
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i*) (q + i), _mm_packus_epi16(w16, w16));
    }
    lf_lp_q8(x, k8, k, inv, q);
    memset(q + k, 128, (size_t) (kp - k));
    *sx = amax / 127.0f;
}
#endif

/* a CPU check asked once (the answer does not change while the process runs) */
#define LF_CACHED_CHECK(name, check)                                                            \
static int name(void) {                                                                         \
    static int v = -1;                                                                          \
    if (v < 0)                                                                                  \
        v = check();                                                                            \
    return v;                                                                                   \
}
static int lf_lp_cpu_fma512(void);
LF_CACHED_CHECK(lf_lp_fma512_cached, lf_lp_cpu_fma512)
static int lf_lp_cpu_bf16(void);
LF_CACHED_CHECK(lf_lp_bf16_cached, lf_lp_cpu_bf16)
static int lf_lp_cpu_fma2(void);
LF_CACHED_CHECK(lf_lp_fma2_cached, lf_lp_cpu_fma2)

#if LF_PGEMM_X86
/* bfloat16 rows by VCVTNEPS2BF16: nearest even, subnormal inputs to signed zero, NaN quieted, as
   the code above (all 2^32 floats give the same bits on AMD EPYC Zen 4); one instruction for its
   dozen (AMD EPYC Zen 4, bfloat16 (100,256,64,64), whose rows it converts twice a step: see
   docs/precision.md) */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
lf_lp_quant_row_bf16_cvt(int k, int kp, const float* x, uint16_t* q) {
    int i = 0;
    for (; i < k; i += 16) {
        const __mmask16 mk = k - i >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (k - i)) - 1u);
        const __m256bh r = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x + i));
        _mm256_mask_storeu_epi16(q + i, mk, (__m256i) r);
    }
    for (i = k; i < kp; i++)
        q[i] = 0;
}
#endif

/* the layer's conversion of activation rows: AVX-512 on the paths that run AVX-512 anyway (so a
   path capped below it by LSTM_FAST_ISA runs none), the same bits as the scalar code */
static inline void lf_lp_quant_row_fast(int path, int kind, int k, int kp, const float* x,
                                        void* dst, float* sx) {
#if LF_PGEMM_X86
    if (kind == LF_LP_BF16 && (path == LF_PATH_AVX512 || path == LF_PATH_AMX) && lf_lp_bf16_cached()) {
        lf_lp_quant_row_bf16_cvt(k, kp, x, (uint16_t*) dst);
        return;
    }
    if ((path == LF_PATH_AVX512 || path == LF_PATH_AMX || path == LF_PATH_AVX512_FMA) &&
        lf_lp_fma512_cached()) {
        lf_lp_quant_row_avx512(kind, k, kp, x, dst, sx);
        return;
    }
    if (path == LF_PATH_AVX2_FMA && lf_lp_fma2_cached()) {
        lf_lp_quant_row_avx2(kind, k, kp, x, dst, sx);
        return;
    }
#endif
    lf_lp_quant_row(kind, k, kp, x, dst, sx);
}

/* Pack an (n, k) row-major float32 matrix (leading dimension ldw). int8: scale and corr get nb*16
   entries. The caller has checked that w is finite. */
static void lf_lp_pack(int kind, int n, int k, const float* w, size_t ldw, void* packed,
                       float* scale, int32_t* corr) {
    const int kp = lf_lp_kp(kind, k), nb = (n + 15) / 16;
    const size_t bs = (size_t) lf_lp_bs(kind, kp);
    if (kind == LF_LP_BF16) {
        uint16_t* p = (uint16_t*) packed;
        memset(p, 0, (size_t) nb * bs * sizeof(uint16_t));
        for (int j = 0; j < n; j++)
            for (int i = 0; i < k; i++)
                p[(size_t) (j / 16) * bs + (size_t) (i / 2) * 32 + (j % 16) * 2 + (i % 2)] =
                    lf_f32_to_bf16(w[(size_t) j * ldw + i]);
        return;
    }
    int8_t* p = (int8_t*) packed;
    memset(p, 0, (size_t) nb * bs);
    for (int j = 0; j < nb * 16; j++) {
        scale[j] = 0.0f;
        corr[j] = 0;
    }
    for (int j = 0; j < n; j++) {
        const float* row = w + (size_t) j * ldw;
        float amax = 0.0f;
        for (int i = 0; i < k; i++)
            amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
        if (amax < LF_LP_TINY)
            continue;
        const float inv = 127.0f / amax;
        int32_t sum = 0;
        for (int i = 0; i < k; i++) {
            float r = rintf(row[i] * inv);
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            int8_t q = (int8_t) r;
            p[(size_t) (j / 16) * bs + (size_t) (i / 4) * 64 + (j % 16) * 4 + (i % 4)] = q;
            sum += q;
        }
        scale[j] = amax / 127.0f;
        corr[j] = 128 * sum;
    }
}

/* The bfloat16 weights again for one row in AMX's order (lf_amx_order_bf16_row): per block and
   32 inputs, 16 slots of 64 bytes; with p = 16 kt + 2 q, slot 2q holds the even inputs 2p and
   2p + 2 of each output, slot 2q + 1 the odd inputs 2p + 1 and 2p + 3, the earlier of each in the
   high half. VDPBF16PS adds its high product first, then its low one, rounding each: one
   instruction takes two steps of a chain of even (or odd) products, which the standard layout
   takes in two, each with the other element's product zeroed. Made from the standard pack. */
static void lf_lp_pack_row_order(const lf_lp_mat* W, uint16_t* dst) {
    const uint16_t* src = (const uint16_t*) W->w;
    const size_t bs = (size_t) W->bs;
    memset(dst, 0, (size_t) W->nb * bs * sizeof(uint16_t));
    for (int b = 0; b < W->nb; b++)
        for (int p = 0; p < W->kp / 2; p += 2) {      /* standard pairs p and p + 1 */
            const uint16_t* s0 = src + (size_t) b * bs + (size_t) p * 32;
            const uint16_t* s1 = s0 + 32;
            uint16_t* even = dst + (size_t) b * bs + (size_t) p * 32;
            uint16_t* odd = even + 32;
            for (int n = 0; n < 16; n++) {
                even[2 * n + 1] = s0[2 * n];
                even[2 * n] = s1[2 * n];
                odd[2 * n + 1] = s0[2 * n + 1];
                odd[2 * n] = s1[2 * n + 1];
            }
        }
}

/* ------------------------------------------------------------------ epilogue */
/* int8: out[j] = (float) (acc[j] - corr[j]) * (s_x * s_w[j]) for the `width` valid outputs */
static inline void lf_lp_deq(const int32_t* acc, const lf_lp_mat* W, int j0, int width, float sx,
                             float* out) {
    for (int l = 0; l < width; l++)
        out[l] = (float) (int32_t) ((uint32_t) acc[l] - (uint32_t) W->corr[j0 + l]) *
                 (sx * W->scale[j0 + l]);
}

/* ------------------------------------------------------------------ generic path */
/* out[r*ldo + j] for rows 0..rows-1 and outputs of blocks b0..b1-1 (j < n) */
static void lf_lp_gemm_generic(const lf_lp_mat* W, int rows, const void* A, size_t lda,
                               const float* sx, int b0, int b1, float* out, size_t ldo) {
    const int kp = W->kp;
    for (int r = 0; r < rows; r++) {
        for (int b = b0; b < b1; b++) {
            const int j0 = 16 * b, width = W->n - j0 < 16 ? W->n - j0 : 16;
            if (W->kind == LF_LP_BF16) {
                const uint16_t* a = (const uint16_t*) A + r * lda;
                const uint16_t* w = (const uint16_t*) W->w + (size_t) b * W->bs;
                float acc[16];
                for (int l = 0; l < 16; l++)
                    acc[l] = 0.0f;
                for (int p = 0; p < kp / 2; p++) {
                    const float x0 = lf_bf16_to_f32(a[2 * p]), x1 = lf_bf16_to_f32(a[2 * p + 1]);
                    const uint16_t* wp = w + (size_t) p * 32;
                    /* fused, as the instructions: a product that underflows is not rounded on
                       its own (a plain a * b + c compiles fused or not depending on -march, and
                       the portable build then differed from the FMA paths) */
                    for (int l = 0; l < 16; l++) {
                        float t = lf_ftz(fmaf(lf_bf16_to_f32(wp[2 * l + 1]), x1, acc[l]));
                        acc[l] = lf_ftz(fmaf(lf_bf16_to_f32(wp[2 * l]), x0, t));
                    }
                }
                memcpy(out + r * ldo + j0, acc, (size_t) width * sizeof(float));
            } else {
                const uint8_t* a = (const uint8_t*) A + r * lda;
                const int8_t* w = (const int8_t*) W->w + (size_t) b * W->bs;
                uint32_t acc[16];
                for (int l = 0; l < 16; l++)
                    acc[l] = 0;
                for (int p = 0; p < kp / 4; p++) {
                    const uint8_t* ap = a + 4 * p;
                    const int8_t* wp = w + (size_t) p * 64;
                    for (int l = 0; l < 16; l++)
                        acc[l] += (uint32_t) (ap[0] * wp[4 * l] + ap[1] * wp[4 * l + 1] +
                                              ap[2] * wp[4 * l + 2] + ap[3] * wp[4 * l + 3]);
                }
                lf_lp_deq((const int32_t*) acc, W, j0, width, sx[r], out + r * ldo + j0);
            }
        }
    }
}

/* ------------------------------------------------------------------ AMX tile logic */
/* The AMX kernel is written once (LF_AMX_KERNEL) over tile operations given as macros, and
   compiled twice: with the real instructions, and with a C emulation of them (tile registers in
   memory), which runs everywhere so that tests exercise the tile logic on CPUs without AMX.
   Tiles: 0..3 C (16 rows x 16 float32/int32), 4 A (rows x 64 bytes of activations), 5..7 B
   (16 rows x 64 bytes of packed weights: one k-tile of one output block). */
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} lf_amx_cfg;

typedef struct {
    int rows, colsb;
    uint8_t d[16 * 64];
} lf_tile;

static inline void lf_amx_make_cfg(lf_amx_cfg* cfg, int m) {
    memset(cfg, 0, sizeof(*cfg));
    cfg->palette_id = 1;
    for (int t = 0; t < 4; t++) {
        cfg->rows[t] = (uint8_t) m;
        cfg->colsb[t] = 64;
    }
    cfg->rows[4] = (uint8_t) m;
    cfg->colsb[4] = 64;
    for (int t = 5; t < 8; t++) {
        cfg->rows[t] = 16;
        cfg->colsb[t] = 64;
    }
}

static inline void lf_emu_cfg(lf_tile* T, const lf_amx_cfg* cfg) {
    for (int t = 0; t < 8; t++) {
        T[t].rows = cfg->rows[t];
        T[t].colsb = cfg->colsb[t];
    }
}
static inline void lf_emu_zero(lf_tile* T, int t) { memset(T[t].d, 0, sizeof(T[t].d)); }
static inline void lf_emu_load(lf_tile* T, int t, const void* p, size_t stride) {
    for (int m = 0; m < T[t].rows; m++)
        memcpy(T[t].d + 64 * m, (const uint8_t*) p + m * stride, (size_t) T[t].colsb);
}
static inline void lf_emu_store(lf_tile* T, int t, void* p, size_t stride) {
    for (int m = 0; m < T[t].rows; m++)
        memcpy((uint8_t*) p + m * stride, T[t].d + 64 * m, (size_t) T[t].colsb);
}
/* TDPBF16PS as the hardware computes it (measured on a Xeon with AMX, family 6 model 0xa7; Intel's
   pseudocode, one chain with the even element first, is not what it does): per output, the even
   elements' products summed in one float32 chain over the tile's 16 pairs, the odd elements' in
   another, both from zero; then their sum, then that added to C, each step rounded to nearest
   even with subnormal results flushed to zero. */
static inline void lf_emu_dpbf16(lf_tile* T, int c, int a, int b) {
    for (int m = 0; m < T[c].rows; m++) {
        float* cr = (float*) (T[c].d + 64 * m);
        const uint16_t* ar = (const uint16_t*) (T[a].d + 64 * m);
        for (int n = 0; n < T[c].colsb / 4; n++) {
            float e = 0.0f, o = 0.0f;
            for (int k = 0; k < T[a].colsb / 4; k++) {
                const uint16_t* br = (const uint16_t*) (T[b].d + 64 * k);
                /* fused, as the hardware: a product that underflows is not rounded on its own
                   (a plain a * b + c compiles fused or not depending on -march) */
                e = lf_ftz(fmaf(lf_bf16_to_f32(ar[2 * k]), lf_bf16_to_f32(br[2 * n]), e));
                o = lf_ftz(fmaf(lf_bf16_to_f32(ar[2 * k + 1]), lf_bf16_to_f32(br[2 * n + 1]), o));
            }
            cr[n] = lf_ftz(cr[n] + lf_ftz(e + o));
        }
    }
}
/* TDPBUSD: u8 (A) x s8 (B) quads summed into int32 (wrapping) */
static inline void lf_emu_dpbusd(lf_tile* T, int c, int a, int b) {
    for (int m = 0; m < T[c].rows; m++) {
        uint32_t* cr = (uint32_t*) (T[c].d + 64 * m);
        const uint8_t* ar = T[a].d + 64 * m;
        for (int k = 0; k < T[a].colsb / 4; k++) {
            const int8_t* br = (const int8_t*) (T[b].d + 64 * k);
            for (int n = 0; n < T[c].colsb / 4; n++)
                cr[n] += (uint32_t) (ar[4 * k] * br[4 * n] + ar[4 * k + 1] * br[4 * n + 1] +
                                     ar[4 * k + 2] * br[4 * n + 2] + ar[4 * k + 3] * br[4 * n + 3]);
        }
    }
}

/* A thread's tiles over one phase of a layer (the projection, or the whole recurrence): the rows
   they are configured for, so that the phase's products configure them when that changes, not
   at every call, and the phase releases them once at its end (lf_amx_end); and the emulation's
   tile registers, kept here as the hardware keeps its own, so that a configuration the kernel
   should have loaded and did not gives wrong rows in the tests too. */
typedef struct {
    int cfg_m;                 /* 0: not configured in this phase */
    lf_tile T[8];
} lf_amx_state;

/* C tile t (mm rows) of output block blk to out rows rr..: bfloat16 sums of a whole block stored
   straight from the tile; int8 (dequantized) and the last, partial block through ctile */
#define LF_AMX_OUT(STORE, EPI, t, rr, mm, blk) {                                                \
    if (W->kind == LF_LP_BF16 && 16 * (blk) + 16 <= W->n) {                                      \
        STORE(t, out + (size_t) (rr) * ldo + 16 * (size_t) (blk), ldo * sizeof(float));        \
    } else {                                                                                     \
        STORE(t, ctile, 64);                                                                     \
        EPI(W, ctile, mm, rr, blk, sx, out, ldo);                                                \
    } }

/* rows of A (row stride lda_bytes), blocks b0..b1 of W. From 32 rows on, two row tiles share
   each weight tile (C 2 x 2: tiles 0-3, A 4-5, B 6-7), so that the weights, the larger operand
   and the one read from L2, are loaded once per 32 rows; fewer rows take 1 x 4 (C 0-3, A 4,
   B 5-7), m rows each. Every output's sum runs over the k-tiles in order either way: the same
   bits. C tiles and tile 4 have m rows, tiles 5-7 16 (pairs always have m = 16): one
   configuration serves both arrangements, and it changes only with m. */
#define LF_AMX_KERNEL(NAME, ATTR, CFG, ZERO, LOAD, DP, STORE, EPI)                              \
ATTR static void NAME(lf_amx_state* st, const lf_lp_mat* W, int rows, const void* A,            \
                      size_t lda_bytes, const float* sx, int b0, int b1, float* out, size_t ldo) { \
    lf_tile* T = st->T;                                                                          \
    (void) T;                                                                                    \
    _Alignas(64) float ctile[16 * 16];                                                          \
    const int elem = W->kind == LF_LP_BF16 ? 2 : 1;                                             \
    const size_t wblock = (size_t) W->bs * elem;    /* bytes of one output block */             \
    const int kt_n = W->kp * elem / 64;                                                         \
    for (int r = 0; r < rows;) {                                                                \
        const int pair = rows - r >= 32;                                                        \
        const int m = pair || rows - r >= 16 ? 16 : rows - r;                                   \
        if (st->cfg_m != m) {                                                                    \
            lf_amx_cfg cfg;                                                                      \
            lf_amx_make_cfg(&cfg, m);                                                            \
            CFG(&cfg);                                                                           \
            st->cfg_m = m;                                                                       \
        }                                                                                        \
        const uint8_t* a = (const uint8_t*) A + (size_t) r * lda_bytes;                         \
        if (pair) {                                                                              \
            const uint8_t* a1 = a + 16 * lda_bytes;                                              \
            for (int b = b0; b < b1; b += 2) {                                                  \
                const int two = b + 1 < b1;                                                      \
                const uint8_t* w = (const uint8_t*) W->w + (size_t) b * wblock;                 \
                ZERO(0); ZERO(1); ZERO(2); ZERO(3);                                              \
                for (int kt = 0; kt < kt_n; kt++) {                                             \
                    LOAD(4, a + 64 * kt, lda_bytes);                                             \
                    LOAD(6, w + 1024 * kt, 64);                                                  \
                    DP(0, 4, 6);                                                                 \
                    LOAD(5, a1 + 64 * kt, lda_bytes);                                            \
                    DP(2, 5, 6);                                                                 \
                    if (two) {                                                                   \
                        LOAD(7, w + wblock + 1024 * kt, 64);                                     \
                        DP(1, 4, 7); DP(3, 5, 7);                                                \
                    }                                                                            \
                }                                                                                \
                LF_AMX_OUT(STORE, EPI, 0, r, 16, b)                                              \
                LF_AMX_OUT(STORE, EPI, 2, r + 16, 16, b)                                         \
                if (two) {                                                                       \
                    LF_AMX_OUT(STORE, EPI, 1, r, 16, b + 1)                                      \
                    LF_AMX_OUT(STORE, EPI, 3, r + 16, 16, b + 1)                                 \
                }                                                                                \
            }                                                                                    \
            r += 32;                                                                             \
            continue;                                                                            \
        }                                                                                        \
        for (int b = b0; b < b1; b += 4) {                                                      \
            const int nq = b1 - b < 4 ? b1 - b : 4;                                             \
            const uint8_t* w = (const uint8_t*) W->w + (size_t) b * wblock;                     \
            ZERO(0); ZERO(1); ZERO(2); ZERO(3);                                                  \
            for (int kt = 0; kt < kt_n; kt++) {                                                 \
                LOAD(4, a + 64 * kt, lda_bytes);                                                 \
                LOAD(5, w + 1024 * kt, 64);                                                      \
                DP(0, 4, 5);                                                                     \
                if (nq > 1) { LOAD(6, w + wblock + 1024 * kt, 64); DP(1, 4, 6); }               \
                if (nq > 2) { LOAD(7, w + 2 * wblock + 1024 * kt, 64); DP(2, 4, 7); }           \
                if (nq > 3) { LOAD(5, w + 3 * wblock + 1024 * kt, 64); DP(3, 4, 5); }           \
            }                                                                                    \
            LF_AMX_OUT(STORE, EPI, 0, r, m, b)                                                   \
            if (nq > 1) LF_AMX_OUT(STORE, EPI, 1, r, m, b + 1)                                   \
            if (nq > 2) LF_AMX_OUT(STORE, EPI, 2, r, m, b + 2)                                   \
            if (nq > 3) LF_AMX_OUT(STORE, EPI, 3, r, m, b + 3)                                   \
        }                                                                                        \
        r += m;                                                                                  \
    }                                                                                            \
}

/* C tile (m rows x 16) of output block `blk` -> out rows r.. (int8: dequantized) */
static inline void lf_amx_epi_scalar(const lf_lp_mat* W, const float* ct, int m, int r, int blk,
                                     const float* sx, float* out, size_t ldo) {
    const int j0 = 16 * blk, width = W->n - j0 < 16 ? W->n - j0 : 16;
    for (int i = 0; i < m; i++) {
        if (W->kind == LF_LP_BF16)
            memcpy(out + (size_t) (r + i) * ldo + j0, ct + 16 * i, (size_t) width * sizeof(float));
        else
            lf_lp_deq((const int32_t*) (ct + 16 * i), W, j0, width, sx[r + i],
                      out + (size_t) (r + i) * ldo + j0);
    }
}

#define LF_EMU_CFG(c) lf_emu_cfg(T, (c))
#define LF_EMU_ZERO(t) lf_emu_zero(T, t)
#define LF_EMU_LOAD(t, p, s) lf_emu_load(T, t, p, s)
#define LF_EMU_STORE(t, p, s) lf_emu_store(T, t, p, s)
#define LF_EMU_DP_BF16(c, a, b) lf_emu_dpbf16(T, c, a, b)
#define LF_EMU_DP_INT8(c, a, b) lf_emu_dpbusd(T, c, a, b)
#define LF_EMU_ATTR
LF_AMX_KERNEL(lf_amx_emu_bf16, LF_EMU_ATTR, LF_EMU_CFG, LF_EMU_ZERO, LF_EMU_LOAD, LF_EMU_DP_BF16,
              LF_EMU_STORE, lf_amx_epi_scalar)
LF_AMX_KERNEL(lf_amx_emu_int8, LF_EMU_ATTR, LF_EMU_CFG, LF_EMU_ZERO, LF_EMU_LOAD, LF_EMU_DP_INT8,
              LF_EMU_STORE, lf_amx_epi_scalar)

/* ------------------------------------------------------------------ CPU features */
/* 1: the CPU (and the OS, which saves the registers) offers every feature of `cond`, a test made
   of __builtin_cpu_supports calls; 0 off x86 */
#if LF_PGEMM_X86
#define LF_CPU_HAS(cond) (__builtin_cpu_init(), (cond))
#else
#define LF_CPU_HAS(cond) 0
#endif
#define LF_FEAT(name) __builtin_cpu_supports(name)

static int lf_lp_cpu_bf16(void) { return LF_CPU_HAS(LF_FEAT("avx512f") && LF_FEAT("avx512bf16")); }
static int lf_lp_cpu_vnni(void) { return LF_CPU_HAS(LF_FEAT("avx512f") && LF_FEAT("avx512vnni")); }
/* bfloat16 without VDPBF16PS: AVX-512F/BW or AVX2, with FMA; int8 without VNNI: AVX2 */
static int lf_lp_cpu_fma512(void) {
    return LF_CPU_HAS(LF_FEAT("avx512f") && LF_FEAT("avx512bw") && LF_FEAT("fma"));
}
static int lf_lp_cpu_fma2(void) { return LF_CPU_HAS(LF_FEAT("avx2") && LF_FEAT("fma")); }
static int lf_lp_cpu_avx2(void) { return LF_CPU_HAS(LF_FEAT("avx2")); }

/* 1: the CPU reports AMX-TILE, AMX-BF16 and AMX-INT8 (CPUID leaf 7, EDX bits 24, 22, 25) */
static int lf_lp_cpu_amx(void) {
#if LF_PGEMM_X86
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return ((d >> 24) & 1u) && ((d >> 22) & 1u) && ((d >> 25) & 1u);
#else
    return 0;
#endif
}

/* 1: the OS grants this process the AMX tile state. On Linux a process asks with
   arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) before its first tile instruction; a
   refusal (old kernel, seccomp, ...) returns 0 and the callers fall back. Asked once. */
static int lf_lp_amx_granted(void) {
    static int cached = -1;
    if (cached >= 0)
        return cached;
    int ok = 0;
#if LF_PGEMM_X86 && defined(__linux__) && defined(SYS_arch_prctl)
    if (lf_lp_cpu_amx()) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
#endif
    cached = ok;
    return ok;
}

/* ------------------------------------------------------------------ AVX-512 and AMX kernels */
#if LF_PGEMM_X86
#define LF_BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) static inline
#define LF_VNNI_ATTR __attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline

static inline int32_t lf_load32(const void* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* R rows x NB blocks: one VDPBF16PS chain per output. One function per (R, NB), with arrays of
   exactly that size, so that gcc keeps the accumulators in registers (a larger array spills).
   Left for a single row's last 5-7 blocks only: as a named 1 x 4 tile and one of 1-3 blocks,
   (100,7,120,120) ran 1.02x-1.03x the time (fewer chains in the short tile). */
#define LF_BF16_TILE_FN(RR, NN)                                                                 \
LF_BF16_ATTR void lf_bf16_tile_##RR##_##NN(const lf_lp_mat* W, const uint16_t* a, size_t lda,  \
                                           int b, float* out, size_t ldo) {                     \
    const int kp = W->kp;                                                                       \
    const uint16_t* w = (const uint16_t*) W->w + (size_t) b * W->bs;                            \
    const size_t bs = (size_t) W->bs;                                                           \
    __m512 acc[RR][NN];                                                                         \
    for (int r = 0; r < RR; r++)                                                                \
        for (int q = 0; q < NN; q++)                                                            \
            acc[r][q] = _mm512_setzero_ps();                                                    \
    for (int p = 0; p < kp / 2; p++) {                                                          \
        __m512i wv[NN];                                                                         \
        for (int q = 0; q < NN; q++)                                                            \
            wv[q] = _mm512_loadu_si512((const void*) (w + q * bs + (size_t) p * 32));           \
        for (int r = 0; r < RR; r++) {                                                          \
            __m512i xv = _mm512_set1_epi32(lf_load32(a + r * lda + 2 * p));                     \
            for (int q = 0; q < NN; q++)                                                        \
                acc[r][q] = _mm512_dpbf16_ps(acc[r][q], (__m512bh) wv[q], (__m512bh) xv);       \
        }                                                                                       \
    }                                                                                           \
    for (int q = 0; q < NN; q++) {                                                              \
        const int j0 = 16 * (b + q), left = W->n - j0;                                          \
        const __mmask16 mk = left >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left) - 1u); \
        for (int r = 0; r < RR; r++)                                                            \
            _mm512_mask_storeu_ps(out + r * ldo + j0, mk, acc[r][q]);                           \
    }                                                                                           \
}

#define LF_LP_MR 4   /* rows per register tile below 6 rows left: 4 x 4 blocks, 16 accumulators */
#define LF_TILE_CASES(X) X(1,5) X(1,6) X(1,7)
LF_TILE_CASES(LF_BF16_TILE_FN)

/* The tiles of 1-6 rows x 1-4 blocks, and 1 row x 8 blocks, with named accumulators: with an
   array gcc 12 copies every accumulator between registers once per step of k (a 2 x 4 or 3 x 4
   tile then ran at about 30 % of the 6 x 4 tile's rate a product: EPYC Zen 4, 128 rows, the 2
   rows past 21 tiles of 6 took 4 % of the product's time). Same chains, same bits as the
   functions above. */
/* one step of k of the RR x NN tile: the NN blocks' weight vectors, then per row r a broadcast
   of its pair/quad and NN products; and row r's stores (rows and blocks past RR, NN are dead
   code) */
#define LF_HOT_W4(ET)                                                                           \
        const ET* wp = w + (size_t) p * 64 / sizeof(ET);                                        \
        const __m512i w0 = _mm512_loadu_si512((const void*) wp);                                \
        const __m512i w1 = NN > 1 ? _mm512_loadu_si512((const void*) (wp + bs)) : w0;           \
        const __m512i w2 = NN > 2 ? _mm512_loadu_si512((const void*) (wp + 2 * bs)) : w0;       \
        const __m512i w3 = NN > 3 ? _mm512_loadu_si512((const void*) (wp + 3 * bs)) : w0;       \
        __m512i x;
#define LF_HOT_ROW(r, DP, ET, PSTEP) if (RR > r) {                                              \
        x = _mm512_set1_epi32(lf_load32(a + (size_t) r * lda + PSTEP * p));                     \
        c##r##0 = DP(c##r##0, w0, x);                                                           \
        if (NN > 1) c##r##1 = DP(c##r##1, w1, x);                                               \
        if (NN > 2) c##r##2 = DP(c##r##2, w2, x);                                               \
        if (NN > 3) c##r##3 = DP(c##r##3, w3, x); }
#define LF_HOT_ST(r, STORE) if (RR > r) {                                                       \
        STORE(r, 0, c##r##0)                                                                    \
        if (NN > 1) STORE(r, 1, c##r##1)                                                        \
        if (NN > 2) STORE(r, 2, c##r##2)                                                        \
        if (NN > 3) STORE(r, 3, c##r##3) }
/* RR rows x NN blocks: 6 x 4 keeps 24 accumulators, 4 weight vectors and a broadcast in 29 of
   the 32 zmm registers, a third less weight traffic from L2 per product than 4 x 4 */
#define LF_HOT_TILE(SUF, RR_, NN_, ATTR, ET, VT, ZERO, DP, PSTEP, STORE)                         \
ATTR void lf_##SUF##_tile_h##RR_##NN_(const lf_lp_mat* W, const ET* a, size_t lda, const float* sx, \
                                      int b, float* out, size_t ldo) {                          \
    enum { RR = RR_, NN = NN_ };                                                                \
    const int kp = W->kp;                                                                       \
    const ET* w = (const ET*) W->w + (size_t) b * W->bs;                                        \
    const size_t bs = (size_t) W->bs;                                                           \
    VT c00 = ZERO, c01 = ZERO, c02 = ZERO, c03 = ZERO, c10 = ZERO, c11 = ZERO, c12 = ZERO,       \
       c13 = ZERO, c20 = ZERO, c21 = ZERO, c22 = ZERO, c23 = ZERO, c30 = ZERO, c31 = ZERO,      \
       c32 = ZERO, c33 = ZERO, c40 = ZERO, c41 = ZERO, c42 = ZERO, c43 = ZERO, c50 = ZERO,      \
       c51 = ZERO, c52 = ZERO, c53 = ZERO;                                                      \
    for (int p = 0; p < kp / PSTEP; p++) {                                                      \
        LF_HOT_W4(ET)                                                                           \
        LF_HOT_ROW(0, DP, ET, PSTEP) LF_HOT_ROW(1, DP, ET, PSTEP)                               \
        LF_HOT_ROW(2, DP, ET, PSTEP) LF_HOT_ROW(3, DP, ET, PSTEP)                               \
        LF_HOT_ROW(4, DP, ET, PSTEP) LF_HOT_ROW(5, DP, ET, PSTEP)                               \
    }                                                                                           \
    LF_HOT_ST(0, STORE) LF_HOT_ST(1, STORE) LF_HOT_ST(2, STORE) LF_HOT_ST(3, STORE)             \
    LF_HOT_ST(4, STORE) LF_HOT_ST(5, STORE)                                                     \
}
#define LF_HOT18(SUF, ATTR, ET, VT, ZERO, ACC, PSTEP, STORE)                                \
ATTR void lf_##SUF##_tile_hot18(const lf_lp_mat* W, const ET* a, size_t lda, const float* sx,   \
                                int b, float* out, size_t ldo) {                                \
    (void) lda;                                                                                 \
    const int kp = W->kp;                                                                       \
    const ET* w = (const ET*) W->w + (size_t) b * W->bs;                                        \
    const size_t bs = (size_t) W->bs;                                                           \
    VT c00 = ZERO, c01 = ZERO, c02 = ZERO, c03 = ZERO, c04 = ZERO, c05 = ZERO, c06 = ZERO,       \
       c07 = ZERO;                                                                              \
    for (int p = 0; p < kp / PSTEP; p++) {                                                      \
        const ET* wp = w + (size_t) p * 64 / sizeof(ET);                                        \
        __m512i x = _mm512_set1_epi32(lf_load32(a + PSTEP * p));                                \
        ACC(c00, _mm512_loadu_si512((const void*) wp), x);                                      \
        ACC(c01, _mm512_loadu_si512((const void*) (wp + bs)), x);                               \
        ACC(c02, _mm512_loadu_si512((const void*) (wp + 2 * bs)), x);                           \
        ACC(c03, _mm512_loadu_si512((const void*) (wp + 3 * bs)), x);                           \
        ACC(c04, _mm512_loadu_si512((const void*) (wp + 4 * bs)), x);                           \
        ACC(c05, _mm512_loadu_si512((const void*) (wp + 5 * bs)), x);                           \
        ACC(c06, _mm512_loadu_si512((const void*) (wp + 6 * bs)), x);                           \
        ACC(c07, _mm512_loadu_si512((const void*) (wp + 7 * bs)), x);                           \
    }                                                                                           \
    STORE(0, 0, c00) STORE(0, 1, c01) STORE(0, 2, c02) STORE(0, 3, c03)                          \
    STORE(0, 4, c04) STORE(0, 5, c05) STORE(0, 6, c06) STORE(0, 7, c07)                          \
}

#define LF_DP_BF16(c, w, x) _mm512_dpbf16_ps((c), (__m512bh) (w), (__m512bh) (x))
#define LF_STORE_BF16(r, q, v) {                                                                \
        const int j0 = 16 * (b + (q)), left = W->n - j0;                                        \
        const __mmask16 mk = left >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left) - 1u); \
        _mm512_mask_storeu_ps(out + (r) * ldo + j0, mk, (v)); }
#define LF_STORE_INT8(r, q, v) {                                                                \
        const int j0 = 16 * (b + (q)), left = W->n - j0;                                        \
        const __mmask16 mk = left >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left) - 1u); \
        __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32((v),                                     \
                       _mm512_loadu_si512((const void*) (W->corr + j0))));                       \
        __m512 sc = _mm512_mul_ps(_mm512_set1_ps(sx[r]), _mm512_loadu_ps(W->scale + j0));       \
        _mm512_mask_storeu_ps(out + (r) * ldo + j0, mk, _mm512_mul_ps(f, sc)); }
#define LF_BF16_HOT(RR, NN) LF_HOT_TILE(bf16, RR, NN, LF_BF16_ATTR, uint16_t, __m512,                \
                                         _mm512_setzero_ps(), LF_DP_BF16, 2, LF_STORE_BF16)
#define LF_HOT_CASES(X) X(1,1) X(1,2) X(1,3) X(1,4) X(2,1) X(2,2) X(2,3) X(2,4) X(3,1) X(3,2)    \
    X(3,3) X(3,4) X(4,1) X(4,2) X(4,3) X(4,4) X(5,1) X(5,2) X(5,3) X(5,4) X(6,1) X(6,2) X(6,3)  \
    X(6,4)
LF_HOT_CASES(LF_BF16_HOT)
/* the accumulation of the batch-1 tile as a statement: bfloat16 by intrinsic; int8 as inline
   assembly on the named accumulator, as lf_int8v_* below: with the intrinsic gcc 12 copied all
   eight accumulators to other registers and back on every step of k (16 moves beside 8
   products in the loop). Integer sums: the same bits either way. */
#define LF_ACC_BF16(c, w, x) (c) = LF_DP_BF16((c), (w), (x));
#define LF_ACC_INT8(c, w, x) { const __m512i w_ = (w);                                           \
        __asm__("vpdpbusd %1, %2, %0" : "+v"(c) : "v"(w_), "v"(x)); }
LF_HOT18(bf16, LF_BF16_ATTR, uint16_t, __m512, _mm512_setzero_ps(), LF_ACC_BF16, 2, LF_STORE_BF16)
LF_HOT18(int8, LF_VNNI_ATTR, uint8_t, __m512i, _mm512_setzero_si512(), LF_ACC_INT8, 4, LF_STORE_INT8)

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void
lf_lp_gemm_bf16_avx512(const lf_lp_mat* W, int rows, const void* A, size_t lda, int b0, int b1,
                       float* out, size_t ldo) {
    for (int r = 0; r < rows;) {
        /* 6 x 4 tiles (1-3 % faster than 4 x 4 on one thread of the EPYC Zen 4, the same bits) */
        const int left = rows - r, R = left >= 6 ? 6 : left >= LF_LP_MR ? LF_LP_MR : left;
        const int nbmax = R == 1 ? 8 : 4;
        const uint16_t* a = (const uint16_t*) A + r * lda;
        for (int b = b0; b < b1;) {
            const int NB = b1 - b < nbmax ? b1 - b : nbmax;
            switch (R * 16 + NB) {
#define LF_CASE_BF16(RR, NN) case RR * 16 + NN: lf_bf16_tile_##RR##_##NN(W, a, lda, b, out + r * ldo, ldo); break;
#define LF_CASE_HOT(RR, NN) case RR * 16 + NN: lf_bf16_tile_h##RR##NN(W, a, lda, NULL, b, out + r * ldo, ldo); break;
            case 1 * 16 + 8: lf_bf16_tile_hot18(W, a, lda, NULL, b, out + r * ldo, ldo); break;
                LF_TILE_CASES(LF_CASE_BF16)
                LF_HOT_CASES(LF_CASE_HOT)
#undef LF_CASE_BF16
#undef LF_CASE_HOT
            }
            b += NB;
        }
        r += R;
    }
}

/* Batch 1: one row of h (a, its int8 scale sa) against 8 blocks bh[q] of W_hh (each block's 16
   outputs to gh + 16 bh[q]), and beside it 8 rows of x (xa, lda bytes apart, scales sx) against
   block bi of W_ih (row r's 16 outputs to px + r * ldp), the two loops' instructions
   interleaved. A batch-1 step reads W_hh from L2 with the multiply units idle half the time;
   the projection of the next steps' inputs (their reads from L1, a block of W_ih an eighth of
   W_hh's bytes) fills them. Each output is the chain of the kernels above (pairs or quads in
   order from zero; int8 dequantized as they do): the same bits. One function per precision:
   its element size ES, PSTEP inputs a 4-byte broadcast, and the accumulation LF_FUSED_ACC and
   store LF_FUSED_DEQ defined before it. */
#define LF_FUSED_HH(q) LF_FUSED_ACC(c##q, _mm512_loadu_si512((const void*) (wh##q + 64 * (size_t) p)), x)
#define LF_FUSED_PX(r) LF_FUSED_ACC(d##r, wv, _mm512_set1_epi32(lf_load32(xa + (r) * lda + 4 * p)))
#define LF_FUSED_W(q) const uint8_t* wh##q = (const uint8_t*) Wh->w + (size_t) bh[q] * Wh->bs * es_;
#define LF_FUSED_ST(q) LF_FUSED_DEQ(Wh, 16 * bh[q], c##q, sa, gh + 16 * bh[q])
#define LF_FUSED_STX(r) LF_FUSED_DEQ(Wi, 16 * bi, d##r, sx[r], px + (r) * ldp)
#define LF_FUSED_EIGHT(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define LF_FUSED_HH_STEP { const __m512i x = _mm512_set1_epi32(lf_load32(a + 4 * p));            \
                           LF_FUSED_EIGHT(LF_FUSED_HH) }
#define LF_FUSED_PX_STEP { const __m512i wv = _mm512_loadu_si512((const void*) (wi + 64 * (size_t) p)); \
                           LF_FUSED_EIGHT(LF_FUSED_PX) }
#define LF_ROW8_FUSED(SUF, TARGET, VT, ZERO, ES, PSTEP)                                          \
__attribute__((target(TARGET))) static void                                                     \
lf_##SUF##_row8_fused(const lf_lp_mat* Wh, const int* bh, const uint8_t* a, float sa, float* gh, \
                      const lf_lp_mat* Wi, int bi, const uint8_t* xa, size_t lda,               \
                      const float* sx, float* px, size_t ldp) {                                 \
    const size_t es_ = ES;                                                                      \
    LF_FUSED_EIGHT(LF_FUSED_W)                                                                  \
    const uint8_t* wi = (const uint8_t*) Wi->w + (size_t) bi * Wi->bs * es_;                    \
    VT c0 = ZERO, c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;                \
    VT d0 = c0, d1 = c0, d2 = c0, d3 = c0, d4 = c0, d5 = c0, d6 = c0, d7 = c0;                  \
    const int n_h = Wh->kp / PSTEP, n_x = Wi->kp / PSTEP, n = n_h < n_x ? n_h : n_x;            \
    int p = 0;                                                                                  \
    for (; p < n; p++) {                                                                        \
        LF_FUSED_HH_STEP                                                                        \
        LF_FUSED_PX_STEP                                                                        \
    }                                                                                           \
    for (; p < n_h; p++)                                                                        \
        LF_FUSED_HH_STEP                                                                        \
    for (p = n; p < n_x; p++)                                                                   \
        LF_FUSED_PX_STEP                                                                        \
    LF_FUSED_EIGHT(LF_FUSED_ST)                                                                 \
    LF_FUSED_EIGHT(LF_FUSED_STX)                                                                \
}
#define LF_FUSED_ACC LF_ACC_BF16
#define LF_FUSED_DEQ(M, j0, acc, s, dst) _mm512_storeu_ps((dst), (acc));
LF_ROW8_FUSED(bf16, "avx512f,avx512bw,avx512bf16", __m512, _mm512_setzero_ps(), 2, 2)
#undef LF_FUSED_ACC
#undef LF_FUSED_DEQ
#define LF_FUSED_ACC LF_ACC_INT8
#define LF_FUSED_DEQ(M, j0, acc, s, dst) {                                                      \
        const __m512 f_ = _mm512_cvtepi32_ps(_mm512_sub_epi32((acc),                             \
                              _mm512_loadu_si512((const void*) ((M)->corr + (j0)))));             \
        _mm512_storeu_ps((dst), _mm512_mul_ps(f_, _mm512_mul_ps(_mm512_set1_ps(s),               \
                                                                _mm512_loadu_ps((M)->scale + (j0))))); }
LF_ROW8_FUSED(int8, "avx512f,avx512bw,avx512vnni", __m512i, _mm512_setzero_si512(), 1, 4)
#undef LF_FUSED_ACC
#undef LF_FUSED_DEQ
#undef LF_ROW8_FUSED
#undef LF_FUSED_HH
#undef LF_FUSED_PX
#undef LF_FUSED_W
#undef LF_FUSED_ST
#undef LF_FUSED_STX
#undef LF_FUSED_EIGHT
#undef LF_FUSED_HH_STEP
#undef LF_FUSED_PX_STEP

static void lf_lp_gemm_int8_vnni_rows(const lf_lp_mat* W, int rows, const void* A, size_t lda,
                                      const float* sx, int b0, int b1, float* out, size_t ldo);

/* int8 on VPDPBUSD: a single row takes 8 blocks a tile (eight accumulator chains hide the
   instruction's latency), the rest the 6 x 4 tiles below */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void
lf_lp_gemm_int8_avx512(const lf_lp_mat* W, int rows, const void* A, size_t lda, const float* sx,
                       int b0, int b1, float* out, size_t ldo) {
    int b = b0;
    if (rows == 1)
        for (; b + 8 <= b1; b += 8)
            lf_int8_tile_hot18(W, (const uint8_t*) A, lda, sx, b, out, ldo);
    if (b < b1)
        lf_lp_gemm_int8_vnni_rows(W, rows, A, lda, sx, b, b1, out, ldo);
}

/* int8 on VPDPBUSD, the register tile for many rows: RR rows (1..6) x NN blocks (1..4) of 16
   outputs, 24 accumulators at most. The instruction is written as inline assembly: gcc 12 copies
   every accumulator to another register around the intrinsic once per step of k (measured: as
   many register moves as products in the loop above). */
#define LF_VNNI_ACC(acc, x, w) __asm__("vpdpbusd %1, %2, %0" : "+v"(acc) : "v"(w), "v"(x))
#define LF_R6(M) M(0) M(1) M(2) M(3) M(4) M(5)
#define LF_I512_DECL(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0,             \
                                c##r##2 = c##r##0, c##r##3 = c##r##0;
#define LF_I512_ROW(r) if (r < RR_) {                                                            \
        const __m512i x = _mm512_set1_epi32(lf_load32(a + (size_t) r * lda + 4 * p));            \
        LF_VNNI_ACC(c##r##0, x, w0);                                                             \
        if (NN_ > 1) LF_VNNI_ACC(c##r##1, x, w1);                                                \
        if (NN_ > 2) LF_VNNI_ACC(c##r##2, x, w2);                                                \
        if (NN_ > 3) LF_VNNI_ACC(c##r##3, x, w3); }
#define LF_I512_STQ(r, q, acc) {                                                                 \
        const int j0 = 16 * (b + q), left = W->n - j0;                                           \
        const __mmask16 mk = left >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left) - 1u);  \
        const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc,                                \
                             _mm512_loadu_si512((const void*) (W->corr + j0))));                 \
        const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(sx[r]), _mm512_loadu_ps(W->scale + j0)); \
        _mm512_mask_storeu_ps(out + (size_t) (r) * ldo + j0, mk, _mm512_mul_ps(f, sc)); }
#define LF_I512_ST(r) if (r < RR_) {                                                             \
        LF_I512_STQ(r, 0, c##r##0)                                                               \
        if (NN_ > 1) LF_I512_STQ(r, 1, c##r##1)                                                  \
        if (NN_ > 2) LF_I512_STQ(r, 2, c##r##2)                                                  \
        if (NN_ > 3) LF_I512_STQ(r, 3, c##r##3) }
#define LF_I512_FN(RR, NN)                                                                      \
__attribute__((target("avx512f,avx512bw,avx512vnni"), noinline)) static void                   \
lf_int8v_##RR##_##NN(const lf_lp_mat* W, const uint8_t* a, size_t lda, const float* sx, int b,  \
                     float* out, size_t ldo) {                                                  \
    enum { RR_ = RR, NN_ = NN };                                                                \
    const int8_t* w = (const int8_t*) W->w + (size_t) b * W->bs;                                \
    const size_t bs = (size_t) W->bs;                                                           \
    LF_R6(LF_I512_DECL)                                                                         \
    for (int p = 0; p < W->kp / 4; p++) {                                                       \
        const int8_t* wp = w + (size_t) p * 64;                                                 \
        const __m512i w0 = _mm512_loadu_si512((const void*) wp);                                \
        const __m512i w1 = NN_ > 1 ? _mm512_loadu_si512((const void*) (wp + bs)) : w0;          \
        const __m512i w2 = NN_ > 2 ? _mm512_loadu_si512((const void*) (wp + 2 * bs)) : w0;      \
        const __m512i w3 = NN_ > 3 ? _mm512_loadu_si512((const void*) (wp + 3 * bs)) : w0;      \
        LF_R6(LF_I512_ROW)                                                                      \
    }                                                                                           \
    LF_R6(LF_I512_ST)                                                                           \
}
#define LF_I512_CASES(X) X(1,1) X(2,1) X(3,1) X(4,1) X(5,1) X(6,1) X(1,2) X(2,2) X(3,2) X(4,2)  \
    X(5,2) X(6,2) X(1,3) X(2,3) X(3,3) X(4,3) X(5,3) X(6,3) X(1,4) X(2,4) X(3,4) X(4,4) X(5,4)  \
    X(6,4)
LF_I512_CASES(LF_I512_FN)

typedef void (*lf_int8v_tile)(const lf_lp_mat*, const uint8_t*, size_t, const float*, int,
                              float*, size_t);
#define LF_I512_ROWS 6

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void
lf_lp_gemm_int8_vnni_rows(const lf_lp_mat* W, int rows, const void* A, size_t lda,
                          const float* sx, int b0, int b1, float* out, size_t ldo) {
    static const lf_int8v_tile tiles[4][LF_I512_ROWS] = {
        {lf_int8v_1_1, lf_int8v_2_1, lf_int8v_3_1, lf_int8v_4_1, lf_int8v_5_1, lf_int8v_6_1},
        {lf_int8v_1_2, lf_int8v_2_2, lf_int8v_3_2, lf_int8v_4_2, lf_int8v_5_2, lf_int8v_6_2},
        {lf_int8v_1_3, lf_int8v_2_3, lf_int8v_3_3, lf_int8v_4_3, lf_int8v_5_3, lf_int8v_6_3},
        {lf_int8v_1_4, lf_int8v_2_4, lf_int8v_3_4, lf_int8v_4_4, lf_int8v_5_4, lf_int8v_6_4}};
    for (int r = 0; r < rows; r += LF_I512_ROWS) {
        const int R = rows - r < LF_I512_ROWS ? rows - r : LF_I512_ROWS;
        for (int b = b0; b < b1; b += 4) {
            const int NB = b1 - b < 4 ? b1 - b : 4;
            tiles[NB - 1][R - 1](W, (const uint8_t*) A + (size_t) r * lda, lda, sx + r, b,
                                 out + (size_t) r * ldo, ldo);
        }
    }
}

/* the epilogue in AVX-512 (a scalar one cost more than the tile products at int8): the same
   operations as the scalar and VNNI epilogues, so the same bits */
__attribute__((target("avx512f,avx512bw"))) static inline void
lf_amx_epi_avx512(const lf_lp_mat* W, const float* ct, int m, int r, int blk, const float* sx,
                  float* out, size_t ldo) {
    const int j0 = 16 * blk, left = W->n - j0;
    const __mmask16 mk = left >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left) - 1u);
    if (W->kind == LF_LP_BF16) {
        for (int i = 0; i < m; i++)
            _mm512_mask_storeu_ps(out + (size_t) (r + i) * ldo + j0, mk, _mm512_load_ps(ct + 16 * i));
        return;
    }
    const __m512i corr = _mm512_loadu_si512((const void*) (W->corr + j0));
    const __m512 sw = _mm512_loadu_ps(W->scale + j0);
    for (int i = 0; i < m; i++) {
        __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512((const void*) (ct + 16 * i)), corr));
        _mm512_mask_storeu_ps(out + (size_t) (r + i) * ldo + j0, mk,
                              _mm512_mul_ps(v, _mm512_mul_ps(_mm512_set1_ps(sx[r + i]), sw)));
    }
}

/* bfloat16, one row (batch-1 steps), in TDPBF16PS's order with VDPBF16PS: a tile's fixed cost is
   for 16 rows. Per 32 inputs an even chain (x's odd element zeroed: VDPBF16PS adds w*0 exactly,
   then the even product) and an odd chain, then C + (E + O) with subnormals flushed: the AMX bits. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static inline __m512 lf_ftz512(__m512 v) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(FLT_MIN), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(v, tiny, _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_castps_si512(v), _mm512_set1_epi32((int) 0x80000000u))));
}
#define LF_B1_EACH(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
/* paired (a constant after inlining): from W->w_row (lf_lp_pack_row_order), one VDPBF16PS a
   chain per two pairs of inputs instead of one per pair, half the instructions, the same sums;
   the activations' even (odd) elements then paired from two neighbouring pairs, the earlier in
   the high half */
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) static inline void
lf_amx_order_bf16_row_blocks(const int paired, const lf_lp_mat* W, const uint16_t* a, int b0,
                             int b1, float* out) {
    const int kp = W->kp;
    const size_t bs = (size_t) W->bs;
    for (int b = b0; b < b1; b += 8) {
        const int nq = b1 - b < 8 ? b1 - b : 8;
        const uint16_t* w = (const uint16_t*) (paired ? W->w_row : W->w) + (size_t) b * bs;
#define LF_B1_DECL(q) __m512 c##q = _mm512_setzero_ps();
        LF_B1_EACH(LF_B1_DECL)
        for (int kt = 0; kt < kp / 32; kt++) {
#define LF_B1_EO(q) __m512 e##q = _mm512_setzero_ps(), o##q = _mm512_setzero_ps();
            LF_B1_EACH(LF_B1_EO)
            for (int p = 16 * kt; p < 16 * kt + 16; p += paired ? 2 : 1) {
                const uint32_t pair0 = (uint32_t) lf_load32(a + 2 * p);
                const uint32_t pair1 = paired ? (uint32_t) lf_load32(a + 2 * p + 2) : 0u;
                const __m512i xe = _mm512_set1_epi32((int32_t) (paired ? (pair0 << 16) | (pair1 & 0xFFFFu)
                                                                       : pair0 & 0xFFFFu));
                const __m512i xo = _mm512_set1_epi32((int32_t) (paired ? (pair0 & 0xFFFF0000u) | (pair1 >> 16)
                                                                       : pair0 & 0xFFFF0000u));
                const uint16_t* wp = w + (size_t) p * 32;
#define LF_B1_DP(q) if (q < nq) {                                                                   \
                const __m512i we = _mm512_loadu_si512((const void*) (wp + q * bs));                 \
                const __m512i wo = paired ? _mm512_loadu_si512((const void*) (wp + q * bs + 32)) : we; \
                e##q = _mm512_dpbf16_ps(e##q, (__m512bh) we, (__m512bh) xe);                        \
                o##q = _mm512_dpbf16_ps(o##q, (__m512bh) wo, (__m512bh) xo); }
                LF_B1_EACH(LF_B1_DP)
            }
#define LF_B1_ACC(q) c##q = lf_ftz512(_mm512_add_ps(c##q, lf_ftz512(_mm512_add_ps(e##q, o##q))));
            LF_B1_EACH(LF_B1_ACC)
        }
#define LF_B1_ST(q) if (q < nq) { const int j0 = 16 * (b + q), left = W->n - j0;                      \
            _mm512_mask_storeu_ps(out + j0, left >= 16 ? (__mmask16) 0xFFFF                          \
                                  : (__mmask16) ((1u << left) - 1u), c##q); }
        LF_B1_EACH(LF_B1_ST)
#undef LF_B1_DECL
#undef LF_B1_EO
#undef LF_B1_DP
#undef LF_B1_ACC
#undef LF_B1_ST
    }
}
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void
lf_amx_order_bf16_row(const lf_lp_mat* W, const uint16_t* a, int b0, int b1, float* out) {
    if (W->w_row != NULL)
        lf_amx_order_bf16_row_blocks(1, W, a, b0, b1, out);
    else
        lf_amx_order_bf16_row_blocks(0, W, a, b0, b1, out);
}

/* ------------------------------------------------------------------ bfloat16 without VDPBF16PS */
/* CPUs with AVX-512F or AVX2 + FMA but no AVX512-BF16 (Skylake to Ice Lake Xeons, AMD Zen 2/3,
   and machines whose hypervisor hides the BF16 and AMX bits) run VDPBF16PS's chain in float32
   FMAs: per output, acc = fma(w_odd, x_odd, acc); acc = fma(w_even, x_even, acc). A bfloat16 value
   widens to float32 exactly (its bits in the high half), the product of two is exact in float32,
   so each FMA rounds once, as the instruction does; MXCSR's flush-to-zero, set for the call, flushes
   subnormal sums as the instruction and the generic path do. Same bits as those paths (x86 judges
   a result tiny before rounding to the subnormal grid: a sum within 2^-150 below FLT_MIN could
   differ; no product of bfloat16 activations and weights of an LSTM comes near).
   Activations are widened once per call, in chunks of LF_FMA_KC inputs, into float32 rows that
   the register tile broadcasts from memory at constant offsets; weights are widened in registers
   (a shift or a masked move of the packed pairs). */
#define LF_FTZ_BIT 0x8000u
#define LF_FMA_ROWS 12          /* rows per AVX-512 register tile: 12 x 2 blocks = 24 accumulators */
#define LF_FMA2_ROWS 4          /* rows per AVX2 register tile: 4 x 16 outputs = 8 accumulators */
#define LF_FMA_KC 256           /* inputs per widened chunk: 12 rows x 256 float32 = 12 KiB of L1,
                                   a row stride the tiles address as a constant */

#define LF_FMA512_ATTR __attribute__((target("avx2,fma,avx512f,avx512bw"), noinline)) static
#define LF_FMA2_ATTR __attribute__((target("avx2,fma"), noinline)) static
#define LF_R12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)

/* A tile: RR rows x NN blocks of 16 outputs over the pairs p0..p1 of one widened chunk X (row
   stride LF_FMA_KC, pair p at X[2 (p - p0)]). The accumulators start from zero on the first chunk
   and from out (where the previous chunk left them: float32 round trips exactly) after it. */
#define LF_F512_DECL(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
#define LF_F512_LD(r) if (r < RR_) {                                                             \
        c##r##0 = _mm512_maskz_loadu_ps(m0, out + (size_t) r * ldo + j0);                        \
        if (NN_ > 1) c##r##1 = _mm512_maskz_loadu_ps(m1, out + (size_t) r * ldo + j0 + 16); }
#define LF_F512_ROW(r) if (r < RR_) {                                                            \
        const __m512 xo = _mm512_set1_ps(xp[r * LF_FMA_KC + 1]);                                 \
        const __m512 xe = _mm512_set1_ps(xp[r * LF_FMA_KC]);                                     \
        c##r##0 = _mm512_fmadd_ps(wo0, xo, c##r##0);                                             \
        if (NN_ > 1) c##r##1 = _mm512_fmadd_ps(wo1, xo, c##r##1);                                \
        c##r##0 = _mm512_fmadd_ps(we0, xe, c##r##0);                                             \
        if (NN_ > 1) c##r##1 = _mm512_fmadd_ps(we1, xe, c##r##1); }
#define LF_F512_ST(r) if (r < RR_) {                                                             \
        _mm512_mask_storeu_ps(out + (size_t) r * ldo + j0, m0, c##r##0);                         \
        if (NN_ > 1) _mm512_mask_storeu_ps(out + (size_t) r * ldo + j0 + 16, m1, c##r##1); }
#define LF_F512_FN(RR, NN)                                                                      \
LF_FMA512_ATTR void lf_bf16f512_##RR##_##NN(const lf_lp_mat* W, const float* X, int p0, int p1, \
                                            int b, float* out, size_t ldo) {                    \
    enum { RR_ = RR, NN_ = NN };                                                                \
    const uint16_t* w = (const uint16_t*) W->w + (size_t) b * W->bs;                            \
    const size_t bs = (size_t) W->bs;                                                           \
    const __mmask32 odd = (__mmask32) 0xAAAAAAAAu;                                              \
    const int j0 = 16 * b, left0 = W->n - j0, left1 = left0 - 16;                               \
    const __mmask16 m0 = left0 >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << left0) - 1u);  \
    const __mmask16 m1 = left1 >= 16 ? (__mmask16) 0xFFFF                                       \
                         : (left1 > 0 ? (__mmask16) ((1u << left1) - 1u) : (__mmask16) 0);      \
    LF_R12(LF_F512_DECL)                                                                        \
    if (p0 > 0) { LF_R12(LF_F512_LD) }                                                          \
    const float* xp = X;                                                                        \
    for (int p = p0; p < p1; p++, xp += 2) {                                                    \
        const __m512i v0 = _mm512_loadu_si512((const void*) (w + (size_t) p * 32));             \
        const __m512 we0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));                      \
        const __m512 wo0 = _mm512_castsi512_ps(_mm512_maskz_mov_epi16(odd, v0));                \
        __m512 we1 = _mm512_setzero_ps(), wo1 = _mm512_setzero_ps();                            \
        if (NN_ > 1) {                                                                          \
            const __m512i v1 = _mm512_loadu_si512((const void*) (w + bs + (size_t) p * 32));    \
            we1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));                               \
            wo1 = _mm512_castsi512_ps(_mm512_maskz_mov_epi16(odd, v1));                         \
        }                                                                                       \
        LF_R12(LF_F512_ROW)                                                                     \
    }                                                                                           \
    LF_R12(LF_F512_ST)                                                                          \
}
#define LF_F512_CASES(X) X(1,1) X(2,1) X(3,1) X(4,1) X(5,1) X(6,1) X(7,1) X(8,1) X(9,1) X(10,1) \
    X(11,1) X(12,1) X(1,2) X(2,2) X(3,2) X(4,2) X(5,2) X(6,2) X(7,2) X(8,2) X(9,2) X(10,2)      \
    X(11,2) X(12,2)
LF_F512_CASES(LF_F512_FN)

/* one row x 8 blocks (batch-1 steps: the weights stream from L2 at half float32's bytes) */
#define LF_F8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
LF_FMA512_ATTR void lf_bf16f512_row8(const lf_lp_mat* W, const float* X, int p0, int p1, int b,
                                     float* out) {
    const uint16_t* w = (const uint16_t*) W->w + (size_t) b * W->bs;
    const size_t bs = (size_t) W->bs;
    const __mmask32 odd = (__mmask32) 0xAAAAAAAAu;
#define LF_R8_DECL(q) __m512 c##q = p0 > 0 ? _mm512_loadu_ps(out + 16 * (b + q)) : _mm512_setzero_ps();
    LF_F8(LF_R8_DECL)
    const float* xp = X;
    for (int p = p0; p < p1; p++, xp += 2) {
        const __m512 xo = _mm512_set1_ps(xp[1]), xe = _mm512_set1_ps(xp[0]);
#define LF_R8_DP(q) { const __m512i v = _mm512_loadu_si512((const void*) (w + q * bs + (size_t) p * 32)); \
            c##q = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_maskz_mov_epi16(odd, v)), xo, c##q);     \
            c##q = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, c##q); }
        LF_F8(LF_R8_DP)
    }
    /* only whole blocks come here (8 of them, all below n): plain stores */
#define LF_R8_ST(q) _mm512_storeu_ps(out + 16 * (b + q), c##q);
    LF_F8(LF_R8_ST)
#undef LF_R8_DECL
#undef LF_R8_DP
#undef LF_R8_ST
}

/* 2 or 3 rows x 4 whole blocks: 8 or 12 accumulators, where the 12 x 2 tiles' 2-3 rows keep
   4-6 chains of two dependent FMAs a pair (latency-bound, as lf_bf16f2_row4 below says for AVX2).
   Same chains: the same bits. */
#define LF_W5_EACH(M) M(0, 0) M(0, 1) M(0, 2) M(0, 3) M(1, 0) M(1, 1) M(1, 2) M(1, 3)           \
    M(2, 0) M(2, 1) M(2, 2) M(2, 3)
#define LF_W5_DECL(r, q) __m512 c##r##q = p0 > 0 && r < RR_                                     \
    ? _mm512_loadu_ps(out + (size_t) r * ldo + 16 * (b + q)) : _mm512_setzero_ps();
#define LF_W5_ST(r, q) if (r < RR_) _mm512_storeu_ps(out + (size_t) r * ldo + 16 * (b + q), c##r##q);
#define LF_W5_ROW(r) if (r < RR_) {                                                             \
        const __m512 xo = _mm512_set1_ps(xp[r * LF_FMA_KC + 1]);                                 \
        const __m512 xe = _mm512_set1_ps(xp[r * LF_FMA_KC]);                                     \
        c##r##0 = _mm512_fmadd_ps(wo0, xo, c##r##0); c##r##1 = _mm512_fmadd_ps(wo1, xo, c##r##1); \
        c##r##2 = _mm512_fmadd_ps(wo2, xo, c##r##2); c##r##3 = _mm512_fmadd_ps(wo3, xo, c##r##3); \
        c##r##0 = _mm512_fmadd_ps(we0, xe, c##r##0); c##r##1 = _mm512_fmadd_ps(we1, xe, c##r##1); \
        c##r##2 = _mm512_fmadd_ps(we2, xe, c##r##2); c##r##3 = _mm512_fmadd_ps(we3, xe, c##r##3); }
#define LF_W5_W(q)                                                                              \
        const __m512i v##q = _mm512_loadu_si512((const void*) (w + q * bs + (size_t) p * 32));  \
        const __m512 we##q = _mm512_castsi512_ps(_mm512_slli_epi32(v##q, 16));                  \
        const __m512 wo##q = _mm512_castsi512_ps(_mm512_maskz_mov_epi16(odd, v##q));
#define LF_W5_FN(RR)                                                                            \
LF_FMA512_ATTR void lf_bf16f512w_##RR(const lf_lp_mat* W, const float* X, int p0, int p1, int b, \
                                      float* out, size_t ldo) {                                 \
    enum { RR_ = RR };                                                                          \
    const uint16_t* w = (const uint16_t*) W->w + (size_t) b * W->bs;                            \
    const size_t bs = (size_t) W->bs;                                                           \
    const __mmask32 odd = (__mmask32) 0xAAAAAAAAu;                                              \
    LF_W5_EACH(LF_W5_DECL)                                                                      \
    const float* xp = X;                                                                        \
    for (int p = p0; p < p1; p++, xp += 2) {                                                    \
        LF_W5_W(0) LF_W5_W(1) LF_W5_W(2) LF_W5_W(3)                                             \
        LF_W5_ROW(0) LF_W5_ROW(1) LF_W5_ROW(2)                                                  \
    }                                                                                           \
    LF_W5_EACH(LF_W5_ST)                                                                        \
}
LF_W5_FN(2) LF_W5_FN(3)

typedef void (*lf_bf16f_tile)(const lf_lp_mat*, const float*, int, int, int, float*, size_t);

/* bfloat16 rows (inputs i0..i0+len) -> float32 rows of stride LF_FMA_KC (exact: the bits move to
   the high half) */
LF_FMA512_ATTR void lf_widen_bf16_512(const uint16_t* a, size_t lda, int rows, int i0, int len,
                                      float* X) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < len; i += 16) {
            const __m256i h = _mm256_loadu_si256((const __m256i*) (a + r * lda + i0 + i));
            _mm512_storeu_si512((void*) (X + (size_t) r * LF_FMA_KC + i),
                                _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
}

/* The AVX-512 driver: rows in chunks of 12, inputs in chunks of LF_FMA_KC (widened once each),
   2 blocks per register tile (8 for a single row). */
__attribute__((target("avx2,fma,avx512f,avx512bw"))) static void
lf_lp_gemm_bf16_fma512(const lf_lp_mat* W, int rows, const void* A, size_t lda, int b0, int b1,
                       float* out, size_t ldo) {
    static const lf_bf16f_tile tiles[2][LF_FMA_ROWS] = {
        {lf_bf16f512_1_1, lf_bf16f512_2_1, lf_bf16f512_3_1, lf_bf16f512_4_1, lf_bf16f512_5_1,
         lf_bf16f512_6_1, lf_bf16f512_7_1, lf_bf16f512_8_1, lf_bf16f512_9_1, lf_bf16f512_10_1,
         lf_bf16f512_11_1, lf_bf16f512_12_1},
        {lf_bf16f512_1_2, lf_bf16f512_2_2, lf_bf16f512_3_2, lf_bf16f512_4_2, lf_bf16f512_5_2,
         lf_bf16f512_6_2, lf_bf16f512_7_2, lf_bf16f512_8_2, lf_bf16f512_9_2, lf_bf16f512_10_2,
         lf_bf16f512_11_2, lf_bf16f512_12_2}};
    _Alignas(64) float X[LF_FMA_ROWS * LF_FMA_KC];
    const int kp = W->kp;
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | LF_FTZ_BIT);
    for (int r = 0; r < rows; r += LF_FMA_ROWS) {
        const int R = rows - r < LF_FMA_ROWS ? rows - r : LF_FMA_ROWS;
        float* o = out + (size_t) r * ldo;
        for (int i0 = 0; i0 < kp; i0 += LF_FMA_KC) {
            const int len = kp - i0 < LF_FMA_KC ? kp - i0 : LF_FMA_KC;
            const int p0 = i0 / 2, p1 = (i0 + len) / 2;
            lf_widen_bf16_512((const uint16_t*) A + (size_t) r * lda, lda, R, i0, len, X);
            int b = b0;
            if (R == 1)
                for (; b + 8 <= b1 && 16 * (b + 8) <= W->n; b += 8)
                    lf_bf16f512_row8(W, X, p0, p1, b, o);
            if (R == 2 || R == 3)
                for (; b + 4 <= b1 && 16 * (b + 4) <= W->n; b += 4)
                    (R == 2 ? lf_bf16f512w_2 : lf_bf16f512w_3)(W, X, p0, p1, b, o, ldo);
            for (; b < b1; b += 2)
                tiles[b1 - b < 2 ? 0 : 1][R - 1](W, X, p0, p1, b, o, ldo);
        }
    }
    _mm_setcsr(csr);
}

/* AVX2: 8 outputs a vector, so a block of 16 is two halves (the low and high 32 bytes of each
   packed 64-byte row); RR rows (1..4) x one block */
#define LF_R4(M) M(0) M(1) M(2) M(3)
#define LF_F2_DECL(r) __m256 c##r##l = _mm256_setzero_ps(), c##r##h = _mm256_setzero_ps();
#define LF_F2_LD(r) if (r < RR_) {                                                               \
        const float* o = out + (size_t) r * ldo + j0;                                            \
        if (left >= 16) {                                                                        \
            c##r##l = _mm256_loadu_ps(o);                                                        \
            c##r##h = _mm256_loadu_ps(o + 8);                                                    \
        } else {                                                                                 \
            _Alignas(32) float t[16] = {0};                                                      \
            memcpy(t, o, (size_t) left * sizeof(float));                                         \
            c##r##l = _mm256_load_ps(t);                                                         \
            c##r##h = _mm256_load_ps(t + 8);                                                     \
        } }
#define LF_F2_ROW(r) if (r < RR_) {                                                              \
        const __m256 xo = _mm256_broadcast_ss(xp + r * LF_FMA_KC + 1);                           \
        const __m256 xe = _mm256_broadcast_ss(xp + r * LF_FMA_KC);                               \
        c##r##l = _mm256_fmadd_ps(wol, xo, c##r##l);                                             \
        c##r##h = _mm256_fmadd_ps(woh, xo, c##r##h);                                             \
        c##r##l = _mm256_fmadd_ps(wel, xe, c##r##l);                                             \
        c##r##h = _mm256_fmadd_ps(weh, xe, c##r##h); }
#define LF_F2_ST(r) if (r < RR_) {                                                               \
        float* o = out + (size_t) r * ldo + j0;                                                  \
        if (left >= 16) {                                                                        \
            _mm256_storeu_ps(o, c##r##l);                                                        \
            _mm256_storeu_ps(o + 8, c##r##h);                                                    \
        } else {                                                                                 \
            _Alignas(32) float t[16];                                                            \
            _mm256_store_ps(t, c##r##l);                                                         \
            _mm256_store_ps(t + 8, c##r##h);                                                     \
            memcpy(o, t, (size_t) left * sizeof(float));                                         \
        } }
#define LF_F2_FN(RR)                                                                            \
LF_FMA2_ATTR void lf_bf16f2_##RR(const lf_lp_mat* W, const float* X, int p0, int p1, int b,     \
                                 float* out, size_t ldo) {                                      \
    enum { RR_ = RR };                                                                          \
    const uint16_t* w = (const uint16_t*) W->w + (size_t) b * W->bs;                            \
    const __m256i hi = _mm256_set1_epi32((int) 0xFFFF0000u);                                    \
    const int j0 = 16 * b, left = W->n - j0;                                                    \
    LF_R4(LF_F2_DECL)                                                                           \
    if (p0 > 0) { LF_R4(LF_F2_LD) }                                                             \
    const float* xp = X;                                                                        \
    for (int p = p0; p < p1; p++, xp += 2) {                                                    \
        const __m256i vl = _mm256_loadu_si256((const __m256i*) (w + (size_t) p * 32));          \
        const __m256i vh = _mm256_loadu_si256((const __m256i*) (w + (size_t) p * 32 + 16));     \
        const __m256 wel = _mm256_castsi256_ps(_mm256_slli_epi32(vl, 16));                      \
        const __m256 wol = _mm256_castsi256_ps(_mm256_and_si256(vl, hi));                       \
        const __m256 weh = _mm256_castsi256_ps(_mm256_slli_epi32(vh, 16));                      \
        const __m256 woh = _mm256_castsi256_ps(_mm256_and_si256(vh, hi));                       \
        LF_R4(LF_F2_ROW)                                                                        \
    }                                                                                           \
    LF_R4(LF_F2_ST)                                                                             \
}
LF_F2_FN(1) LF_F2_FN(2) LF_F2_FN(3) LF_F2_FN(4)

/* One row x 4 whole blocks: 8 accumulators. The one-block tiles above keep 2 per row, each
   taking two dependent FMAs a pair: at one or two rows their chains' latency, not the FMA units,
   sets the pace (batch-1 steps ran at 0.73x float32's AVX2 speed). Two rows run it once each: a
   2 x 2 tile spilled an accumulator with 16 ymm registers (a portable build) and ran 1.05x the
   2 x 1 tiles' time. Same chains: the same bits. */
#define LF_F4(M) M(0) M(1) M(2) M(3)
LF_FMA2_ATTR void lf_bf16f2_row4(const lf_lp_mat* W, const float* X, int p0, int p1, int b,
                                 float* out) {
    const uint16_t* w = (const uint16_t*) W->w + (size_t) b * W->bs;
    const size_t bs = (size_t) W->bs;
    const __m256i hi = _mm256_set1_epi32((int) 0xFFFF0000u);
#define LF_R4_DECL(q)                                                                           \
    __m256 c##q##l = p0 > 0 ? _mm256_loadu_ps(out + 16 * (b + q)) : _mm256_setzero_ps();        \
    __m256 c##q##h = p0 > 0 ? _mm256_loadu_ps(out + 16 * (b + q) + 8) : _mm256_setzero_ps();
    LF_F4(LF_R4_DECL)
    const float* xp = X;
    for (int p = p0; p < p1; p++, xp += 2) {
        const __m256 xo = _mm256_broadcast_ss(xp + 1), xe = _mm256_broadcast_ss(xp);
#define LF_R4_DP(q) {                                                                           \
            const uint16_t* wq = w + q * bs + (size_t) p * 32;                                  \
            const __m256i vl = _mm256_loadu_si256((const __m256i*) wq);                         \
            const __m256i vh = _mm256_loadu_si256((const __m256i*) (wq + 16));                  \
            c##q##l = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(vl, hi)), xo, c##q##l); \
            c##q##h = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(vh, hi)), xo, c##q##h); \
            c##q##l = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(vl, 16)), xe, c##q##l); \
            c##q##h = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(vh, 16)), xe, c##q##h); }
        LF_F4(LF_R4_DP)
    }
    /* whole blocks only (all four below n): plain stores */
#define LF_R4_ST(q) _mm256_storeu_ps(out + 16 * (b + q), c##q##l);                               \
    _mm256_storeu_ps(out + 16 * (b + q) + 8, c##q##h);
    LF_F4(LF_R4_ST)
#undef LF_R4_DECL
#undef LF_R4_DP
#undef LF_R4_ST
}

LF_FMA2_ATTR void lf_widen_bf16_avx2(const uint16_t* a, size_t lda, int rows, int i0, int len,
                                     float* X) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < len; i += 8) {
            const __m128i h = _mm_loadu_si128((const __m128i*) (a + r * lda + i0 + i));
            _mm256_storeu_si256((__m256i*) (X + (size_t) r * LF_FMA_KC + i),
                                _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
}

__attribute__((target("avx2,fma"))) static void
lf_lp_gemm_bf16_fma2(const lf_lp_mat* W, int rows, const void* A, size_t lda, int b0, int b1,
                     float* out, size_t ldo) {
    static const lf_bf16f_tile tiles[LF_FMA2_ROWS] = {lf_bf16f2_1, lf_bf16f2_2, lf_bf16f2_3,
                                                      lf_bf16f2_4};
    _Alignas(64) float X[LF_FMA2_ROWS * LF_FMA_KC];
    const int kp = W->kp;
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | LF_FTZ_BIT);
    for (int r = 0; r < rows; r += LF_FMA2_ROWS) {
        const int R = rows - r < LF_FMA2_ROWS ? rows - r : LF_FMA2_ROWS;
        for (int i0 = 0; i0 < kp; i0 += LF_FMA_KC) {
            const int len = kp - i0 < LF_FMA_KC ? kp - i0 : LF_FMA_KC;
            lf_widen_bf16_avx2((const uint16_t*) A + (size_t) r * lda, lda, R, i0, len, X);
            int b = b0;
            if (R <= 2)
                for (; b + 4 <= b1 && 16 * (b + 4) <= W->n; b += 4)
                    for (int i = 0; i < R; i++)
                        lf_bf16f2_row4(W, X + i * LF_FMA_KC, i0 / 2, (i0 + len) / 2, b,
                                       out + (size_t) (r + i) * ldo);
            for (; b < b1; b++)
                tiles[R - 1](W, X, i0 / 2, (i0 + len) / 2, b, out + (size_t) r * ldo, ldo);
        }
    }
    _mm_setcsr(csr);
}

/* int8 on CPUs without VPDPBUSD (AVX2; AVX-512 without VNNI): VPMADDWD on int16. The packed
   weights sign-extend to int16 in registers (16 bytes: 4 outputs x 4 inputs), a row's four
   activation bytes (q + 128, unsigned) zero-extend to int16 and repeat in every 64 bits; VPMADDWD
   sums the pairs exactly (255 * 127 * 2 fits int32), two lanes per output are added at the end and
   128 * sum(q_w) subtracted as on the other paths: exact integer sums, the same bits. */
#define LF_I2_ROWS 4            /* rows x 8 outputs per register tile: 8 accumulators */
#define LF_I2_KC 1024           /* inputs per widened chunk: 4 rows x 1024 int16 = 8 KiB */
/* The rows' activation bytes are widened to int16 once per chunk, 4 a quad, so that a tile
   broadcasts a quad with one 64-bit load: widened in the tile, per row and quad (a broadcast and
   an unpack), the shuffles outnumbered the products and int8 (100,16,128,128) ran 0.9x-0.95x
   float32's AVX2 time. Partial sums between chunks wait in out as int32 bits; integer sums
   (wrapping) do not depend on their order: the same bits. */
#define LF_I2_DECL(r) __m256i c##r##a = _mm256_setzero_si256(), c##r##b = _mm256_setzero_si256();
#define LF_I2_ROW(r) if (r < RR_) {                                                              \
        const __m256i x = _mm256_set1_epi64x(lf_load64(X + (size_t) r * LF_I2_KC + 4 * (p - p0))); \
        c##r##a = _mm256_add_epi32(c##r##a, _mm256_madd_epi16(wl, x));                           \
        c##r##b = _mm256_add_epi32(c##r##b, _mm256_madd_epi16(wh, x)); }
#define LF_I2_ST(r) if (r < RR_) {                                                               \
        float* o = out + (size_t) r * ldo + j0;                                                  \
        _Alignas(32) float t[8];                                                                 \
        __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c##r##a, c##r##b), 0xD8);         \
        if (p0 > 0) {                                                                            \
            memcpy(t, o, (size_t) (left >= 8 ? 8 : left) * sizeof(float));                      \
            s = _mm256_add_epi32(s, _mm256_load_si256((const __m256i*) t));                     \
        }                                                                                        \
        if (last)                                                                                \
            _mm256_store_ps(t, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, corr)),     \
                                             _mm256_mul_ps(_mm256_set1_ps(sx[r]), sw)));         \
        else                                                                                     \
            _mm256_store_si256((__m256i*) t, s);                                                 \
        memcpy(o, t, (size_t) (left >= 8 ? 8 : left) * sizeof(float)); }
#define LF_I2_FN(RR)                                                                            \
__attribute__((target("avx2"), noinline)) static void                                          \
lf_int8_avx2_##RR(const lf_lp_mat* W, const int16_t* X, int p0, int p1, const float* sx, int b, \
                  int half, int last, float* out, size_t ldo) {                                 \
    enum { RR_ = RR };                                                                          \
    const int8_t* w = (const int8_t*) W->w + (size_t) b * W->bs + 32 * half;                    \
    const int j0 = 16 * b + 8 * half, left = W->n - j0;                                         \
    LF_R4(LF_I2_DECL)                                                                           \
    for (int p = p0; p < p1; p++) {                                                             \
        const int8_t* wp = w + (size_t) p * 64;                                                 \
        const __m256i wl = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*) wp));         \
        const __m256i wh = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*) (wp + 16)));  \
        LF_R4(LF_I2_ROW)                                                                        \
    }                                                                                           \
    /* outputs past n have scale 0 and corr 0 in the packing: reading them is safe */           \
    const __m256i corr = _mm256_loadu_si256((const __m256i*) (W->corr + j0));                   \
    const __m256 sw = _mm256_loadu_ps(W->scale + j0);                                           \
    LF_R4(LF_I2_ST)                                                                             \
}
static inline int64_t lf_load64(const void* p) {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}
LF_I2_FN(1) LF_I2_FN(2) LF_I2_FN(3) LF_I2_FN(4)

typedef void (*lf_int8_avx2_tile)(const lf_lp_mat*, const int16_t*, int, int, const float*, int,
                                  int, int, float*, size_t);

/* rows of activation bytes (inputs i0..i0+len) -> int16 rows of stride LF_I2_KC */
__attribute__((target("avx2"))) static void
lf_widen_u8_avx2(const uint8_t* a, size_t lda, int rows, int i0, int len, int16_t* X) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < len; i += 16)
            _mm256_storeu_si256((__m256i*) (X + (size_t) r * LF_I2_KC + i),
                                _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*) (a + r * lda + i0 + i))));
}

__attribute__((target("avx2"))) static void
lf_lp_gemm_int8_avx2(const lf_lp_mat* W, int rows, const void* A, size_t lda, const float* sx,
                     int b0, int b1, float* out, size_t ldo) {
    static const lf_int8_avx2_tile tiles[LF_I2_ROWS] = {lf_int8_avx2_1, lf_int8_avx2_2,
                                                        lf_int8_avx2_3, lf_int8_avx2_4};
    _Alignas(32) int16_t X[LF_I2_ROWS * LF_I2_KC];
    const int kp = W->kp;
    for (int r = 0; r < rows; r += LF_I2_ROWS) {
        const int R = rows - r < LF_I2_ROWS ? rows - r : LF_I2_ROWS;
        for (int i0 = 0; i0 < kp; i0 += LF_I2_KC) {
            const int len = kp - i0 < LF_I2_KC ? kp - i0 : LF_I2_KC;
            lf_widen_u8_avx2((const uint8_t*) A + (size_t) r * lda, lda, R, i0, len, X);
            for (int b = b0; b < b1; b++)
                for (int half = 0; half < 2 && 16 * b + 8 * half < W->n; half++)
                    tiles[R - 1](W, X, i0 / 4, (i0 + len) / 4, sx + r, b, half, i0 + len == kp,
                                 out + (size_t) r * ldo, ldo);
        }
    }
}

#define LF_HW_ATTR __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw")))
#define LF_HW_CFG(c) _tile_loadconfig((const void*) (c))
#define LF_HW_ZERO(t) _tile_zero(t)
#define LF_HW_LOAD(t, p, s) _tile_loadd(t, (const void*) (p), (s))
#define LF_HW_STORE(t, p, s) _tile_stored(t, (void*) (p), (s))
#define LF_HW_DP_BF16(c, a, b) _tile_dpbf16ps(c, a, b)
#define LF_HW_DP_INT8(c, a, b) _tile_dpbusd(c, a, b)
LF_AMX_KERNEL(lf_amx_hw_bf16, LF_HW_ATTR, LF_HW_CFG, LF_HW_ZERO, LF_HW_LOAD, LF_HW_DP_BF16,
              LF_HW_STORE, lf_amx_epi_avx512)
LF_AMX_KERNEL(lf_amx_hw_int8, LF_HW_ATTR, LF_HW_CFG, LF_HW_ZERO, LF_HW_LOAD, LF_HW_DP_INT8,
              LF_HW_STORE, lf_amx_epi_avx512)
/* the end of a phase: the tiles back to their init state (a core whose tile state is in use
   cannot enter its deepest idle states) */
LF_HW_ATTR static void lf_amx_hw_release(void) { _tile_release(); }
#endif

/* 1: `path` can run `kind` on this CPU (and OS) */
static int lf_lp_path_ok(int kind, int path) {
    switch (path) {
    case LF_PATH_GENERIC:
    case LF_PATH_AMX_EMU:
        return 1;
    case LF_PATH_AVX512:
        return kind == LF_LP_BF16 ? lf_lp_cpu_bf16() : lf_lp_cpu_vnni();
    case LF_PATH_AMX:
        return lf_lp_amx_granted();
    case LF_PATH_AVX512_FMA:
        return kind == LF_LP_BF16 && lf_lp_cpu_fma512();
    case LF_PATH_AVX2_FMA:
        return kind == LF_LP_BF16 ? lf_lp_cpu_fma2() : lf_lp_cpu_avx2();
    }
    return 0;
}

#define LF_LP_AMX_MIN_ROWS 4
LF_CACHED_CHECK(lf_lp_vnni_cached, lf_lp_cpu_vnni)

/* the end of a phase that ran AMX products with `st` */
static void lf_amx_end(int path, lf_amx_state* st) {
#if LF_PGEMM_X86
    if (path == LF_PATH_AMX && st->cfg_m)
        lf_amx_hw_release();
#else
    (void) path;
#endif
    st->cfg_m = 0;
}

/* out = dequant(A . W^T) for rows of A and blocks b0..b1 of W (the path was checked); `amx`: the
   calling thread's tile state in this phase (AMX paths) */
static void lf_lp_gemm_in(int path, lf_amx_state* amx, const lf_lp_mat* W, int rows, const void* A,
                          const float* sx, int b0, int b1, float* out, size_t ldo) {
    const size_t lda = (size_t) W->kp;          /* elements (bf16 or bytes) per activation row */
    const size_t lda_bytes = lda * (W->kind == LF_LP_BF16 ? 2 : 1);
    if (rows <= 0 || b0 >= b1)
        return;
#if LF_PGEMM_X86
    if (path == LF_PATH_AVX512) {
        if (W->kind == LF_LP_BF16)
            lf_lp_gemm_bf16_avx512(W, rows, A, lda, b0, b1, out, ldo);
        else
            lf_lp_gemm_int8_avx512(W, rows, A, lda, sx, b0, b1, out, ldo);
        return;
    }
    if (path == LF_PATH_AVX512_FMA && W->kind == LF_LP_BF16) {
        lf_lp_gemm_bf16_fma512(W, rows, A, lda, b0, b1, out, ldo);
        return;
    }
    if (path == LF_PATH_AVX2_FMA) {
        if (W->kind == LF_LP_BF16)
            lf_lp_gemm_bf16_fma2(W, rows, A, lda, b0, b1, out, ldo);
        else
            lf_lp_gemm_int8_avx2(W, rows, A, lda, sx, b0, b1, out, ldo);
        return;
    }
    if (path == LF_PATH_AMX) {
        /* a few rows (batch-1 steps): a tile's fixed cost outweighs its rows; VPDPBUSD's exact
           sums give the same int8 bits (every AMX CPU has AVX512-VNNI) */
        if (W->kind == LF_LP_INT8 && rows <= LF_LP_AMX_MIN_ROWS && lf_lp_vnni_cached()) {
            lf_lp_gemm_int8_avx512(W, rows, A, lda, sx, b0, b1, out, ldo);
            return;
        }
        if (W->kind == LF_LP_BF16 && rows == 1 && lf_lp_bf16_cached()) {
            lf_amx_order_bf16_row(W, (const uint16_t*) A, b0, b1, out);
            return;
        }
        if (W->kind == LF_LP_BF16)
            lf_amx_hw_bf16(amx, W, rows, A, lda_bytes, sx, b0, b1, out, ldo);
        else
            lf_amx_hw_int8(amx, W, rows, A, lda_bytes, sx, b0, b1, out, ldo);
        return;
    }
#endif
    if (path == LF_PATH_AMX_EMU) {
        if (W->kind == LF_LP_BF16)
            lf_amx_emu_bf16(amx, W, rows, A, lda_bytes, sx, b0, b1, out, ldo);
        else
            lf_amx_emu_int8(amx, W, rows, A, lda_bytes, sx, b0, b1, out, ldo);
        return;
    }
    lf_lp_gemm_generic(W, rows, A, lda, sx, b0, b1, out, ldo);
}

/* one product alone (tests): its own tile state, released after */
static void lf_lp_gemm(int path, const lf_lp_mat* W, int rows, const void* A, const float* sx,
                       int b0, int b1, float* out, size_t ldo) {
    lf_amx_state amx;
    amx.cfg_m = 0;
    lf_lp_gemm_in(path, &amx, W, rows, A, sx, b0, b1, out, ldo);
    lf_amx_end(path, &amx);
}

/* rows of A one at a time through the AMX path's one-row bfloat16 kernel (W->w_row's layout when
   present, else the standard one): for tests on CPUs with AVX512-BF16, which have no tiles to
   compare it with but their emulation. -1 where it cannot run. */
static int lf_lp_rows_amx_order(const lf_lp_mat* W, int rows, const void* A, float* out, size_t ldo) {
#if LF_PGEMM_X86
    if (W->kind != LF_LP_BF16 || !lf_lp_bf16_cached())
        return -1;
    for (int r = 0; r < rows; r++)
        lf_amx_order_bf16_row(W, (const uint16_t*) A + (size_t) r * W->kp, 0, W->nb, out + (size_t) r * ldo);
    return 0;
#else
    (void) W; (void) rows; (void) A; (void) out; (void) ldo;
    return -1;
#endif
}

/* ------------------------------------------------------------------ one LSTM layer */
typedef void (*lf_cell_fn)(Py_ssize_t hidden, const float* gh, const float* gx, const float* bias,
                           float* c, float* h_raw);
/* the same cell for units u0..u1 only (multiples of 32: the same lanes, so the same bits) */
typedef void (*lf_cell_units_fn)(Py_ssize_t hidden, Py_ssize_t u0, Py_ssize_t u1, const float* gh,
                                 const float* gx, const float* bias, float* c, float* h_raw);

typedef struct {
    int kind, path;
    int T, B, n_in, H, P, Hout, D;
    const lf_lp_mat* ih[2];
    const lf_lp_mat* hh[2];
    const lf_lp_mat* hr[2];        /* P > 0 */
    const float* bias;             /* (D, 4H): b_ih + b_hh */
    const float* x;                /* (T, B, I) */
    const Py_ssize_t* order;       /* rows longest first */
    const Py_ssize_t* lengths;
    float* h;                      /* (D, B, Hout), in place */
    float* c;                      /* (D, B, H), in place */
    float* y;                      /* (T, B, D*Hout); positions past a length are left alone */
    int threads_proj, threads_rec;
    int threads_split;             /* threads for split by units (3), where the shapes allow */
    int threads_dirs;              /* 2: two directions on two threads (2c); else 0 */
    size_t rows_max_bytes;         /* weights up to which the layer may run split by rows (2a) */
    lf_cell_fn cell;
    lf_cell_units_fn cell_units;   /* NULL: no split by units */
} lf_lp_layer;

/* output blocks of 16 per work item of a product: a function of the shapes only, so that the
   split (and the thread count) never changes what an output is computed from */
#define LF_LP_ITEM_BLOCKS 8
#define LF_LP_ITEM_ROWS 96

static inline size_t lf_lp_elem(int kind) { return kind == LF_LP_BF16 ? 2 : 1; }

typedef struct {
    void* xa; float* xs; float* gx; void* ha; float* hs; float* gh; void* pa; float* ps;
    float* hraw; float* hp;
    int rows_fused;            /* split by rows, each projecting its own inputs (2a): then xa, xs
                                  and gx hold one step's rows, indexed like ha, hs and gh */
    lf_barrier step_barrier;   /* the recurrence's: spins ~20 us before it sleeps (lf_split.h) */
} lf_lp_ws;

/* thread `rank` of `team`'s share lo..hi of n work items: contiguous, as even as n allows */
static inline int lf_lp_share(int n, int team, int rank) { return (int) ((long) n * rank / team); }

/* 1. every step's inputs of directions d0..d1-1: quantized once into xa, xs (both directions
   read them), then projected. Called by each thread of a team of `team` (which meet at an
   OpenMP barrier between the two), or by one thread alone (team 1). */
static void lf_lp_layer_proj(const lf_lp_layer* L, const lf_lp_ws* W, int d0, int d1, void* xa,
                             float* xs, int team, int rank) {
    const int kind = L->kind, G = 4 * L->H;
    const size_t TB = (size_t) L->T * L->B, es = lf_lp_elem(kind);
    const int kp_ih = L->ih[0]->kp, nb_g = L->ih[0]->nb;
    const int n_groups = (nb_g + LF_LP_ITEM_BLOCKS - 1) / LF_LP_ITEM_BLOCKS;
    const int n_rblk = (int) ((TB + LF_LP_ITEM_ROWS - 1) / LF_LP_ITEM_ROWS);
    const int n_items = (d1 - d0) * n_groups * n_rblk;
    lf_amx_state amx;
    amx.cfg_m = 0;
    for (size_t r = (size_t) lf_lp_share((int) TB, team, rank);
         r < (size_t) lf_lp_share((int) TB, team, rank + 1); r++)
        lf_lp_quant_row_fast(L->path, kind, L->n_in, kp_ih, L->x + r * L->n_in,
                             (uint8_t*) xa + r * kp_ih * es, xs + r);
    if (team > 1) {
        #pragma omp barrier
    }
    for (int it = lf_lp_share(n_items, team, rank); it < lf_lp_share(n_items, team, rank + 1); it++) {
        const int d = d0 + it / (n_groups * n_rblk), g = (it / n_rblk) % n_groups;
        const size_t r0 = (size_t) (it % n_rblk) * LF_LP_ITEM_ROWS;
        const int rows = (int) (TB - r0 < LF_LP_ITEM_ROWS ? TB - r0 : LF_LP_ITEM_ROWS);
        const int b0 = g * LF_LP_ITEM_BLOCKS;
        const int b1 = b0 + LF_LP_ITEM_BLOCKS < nb_g ? b0 + LF_LP_ITEM_BLOCKS : nb_g;
        lf_lp_gemm_in(L->path, &amx, L->ih[d], rows, (const uint8_t*) xa + r0 * kp_ih * es,
                      xs + r0, b0, b1, W->gx + ((size_t) d * TB + r0) * G, (size_t) G);
    }
    lf_amx_end(L->path, &amx);
}

/* step s's running rows (a prefix of the order, longest first) */
static inline int lf_lp_active(const lf_lp_layer* L, int s) {
    int n_act = L->B;
    while (n_act > 0 && L->lengths[L->order[n_act - 1]] <= s)
        n_act--;
    return n_act;
}

/* the next step's product input: the h row of position i (order[i]) of direction d, quantized */
static inline void lf_lp_quant_h(const lf_lp_layer* L, const lf_lp_ws* W, int d, int i) {
    const size_t es = lf_lp_elem(L->kind);
    const int kp_hh = L->hh[0]->kp;
    lf_lp_quant_row_fast(L->path, L->kind, L->Hout, kp_hh,
                         L->h + ((size_t) d * L->B + L->order[i]) * L->Hout,
                         (uint8_t*) W->ha + ((size_t) d * L->B + i) * kp_hh * es, W->hs + d * L->B + i);
}

/* the time step that step s of direction d reads for batch row b (the reverse direction runs
   each sequence backwards from its own last step) */
static inline Py_ssize_t lf_lp_time(const lf_lp_layer* L, int s, int d, Py_ssize_t b) {
    return d == 0 ? s : L->lengths[b] - 1 - s;
}

/* step s's cell update of the row at position i of direction d; then its h quantized for the
   projection product (with a projection) or copied to y and quantized for the next step. Its
   input gates: row (d, i) of the step's own projection when split by rows, else row (d, t, b)
   of the up-front one. */
static inline void lf_lp_cell_row(const lf_lp_layer* L, const lf_lp_ws* W, int s, int d, int i) {
    const int B = L->B, H = L->H, Hout = L->Hout, P = L->P, G = 4 * H, D = L->D;
    const size_t es = lf_lp_elem(L->kind);
    const Py_ssize_t b = L->order[i];
    const Py_ssize_t t = lf_lp_time(L, s, d, b);
    const float* gx = W->gx + (W->rows_fused ? (size_t) d * B + i
                                             : ((size_t) d * L->T + t) * B + b) * G;
    float* c = L->c + ((size_t) d * B + b) * H;
    float* hrow = P ? W->hraw + ((size_t) d * B + i) * H : L->h + ((size_t) d * B + b) * Hout;
    L->cell(H, W->gh + ((size_t) d * B + i) * G, gx, L->bias + (size_t) d * G, c, hrow);
    if (P) {
        const int kp_hr = L->hr[0]->kp;
        lf_lp_quant_row_fast(L->path, L->kind, H, kp_hr, hrow,
                             (uint8_t*) W->pa + ((size_t) d * B + i) * kp_hr * es, W->ps + d * B + i);
    } else {
        memcpy(L->y + ((size_t) t * B + b) * D * Hout + (size_t) d * Hout, hrow,
               (size_t) Hout * sizeof(float));
        lf_lp_quant_h(L, W, d, i);
    }
}

/* with a projection: the projected h of the row at position i to the state and y, quantized
   for the next step */
static inline void lf_lp_proj_row(const lf_lp_layer* L, const lf_lp_ws* W, int s, int d, int i) {
    const int B = L->B, Hout = L->Hout, D = L->D;
    const Py_ssize_t b = L->order[i];
    const Py_ssize_t t = lf_lp_time(L, s, d, b);
    const float* src = W->hp + ((size_t) d * B + i) * Hout;
    memcpy(L->h + ((size_t) d * B + b) * Hout, src, (size_t) Hout * sizeof(float));
    memcpy(L->y + ((size_t) t * B + b) * D * Hout + (size_t) d * Hout, src,
           (size_t) Hout * sizeof(float));
    lf_lp_quant_h(L, W, d, i);
}

/* 2a. the recurrence of the rows at positions r0..r1 of the order, alone: a batch's rows never
   meet, so a thread that owns whole rows (their products over every gate column, their cells,
   their quantization) needs no barrier at all. It also projects its own rows' inputs, step by
   step (the rows' x_t gathered and quantized, then W_ih's product into a buffer of these rows
   only): the cell then reads gates the thread has just written, from L1, where the up-front
   projection (1) left the whole (T, B, 4H) of them to L2, L3 or the other thread's cache. Each
   output is the same sum whatever rows a call holds, and each x row the same quantization:
   the same bits as 1 + 2b. */
#define LF_LP_CHUNK_MIN_ROWS 8
/* ... when the weights (W_ih, W_hh, W_hr) are small, L->rows_max_bytes (lstm_fast._cpu.derive:
   3/4 of L2 on Intel, a quarter of the L3 on AMD): each thread then reads all of them every
   step, where the column split reads a share and the up-front projection streams W_ih once per
   96 rows. */
/* one thread alone takes the row split from 16 rows: with 8, its step products of W_ih (6 + 2 row
   tiles) cost more than the up-front projection's 96-row blocks saved (int8 (100,8,128,128)
   1.023x, (100,8,256,128) 1.029x; from 16 rows 0.94x-1.00x, Xeon 6/207, pinned A/B) */
#define LF_LP_ALONE_MIN_ROWS 16
#define LF_LP_AMX_CHUNK_MIN_ROWS 32     /* AMX: two row tiles a thread (lf_lp_layer_forward) */
static void lf_lp_rows_rec(const lf_lp_layer* L, const lf_lp_ws* W, int r0, int r1) {
    const int kind = L->kind, path = L->path, D = L->D, B = L->B, T = L->T, H = L->H;
    const int Hout = L->Hout, P = L->P, G = 4 * H;
    const size_t es = lf_lp_elem(kind);
    const int kp_ih = L->ih[0]->kp, kp_hh = L->hh[0]->kp, kp_hr = P ? L->hr[0]->kp : 0;
    const int nb_g = L->hh[0]->nb, nb_p = P ? L->hr[0]->nb : 0;
    const int n_first = lf_lp_active(L, 0);
    lf_amx_state amx;
    amx.cfg_m = 0;
    for (int d = 0; d < D; d++)
        for (int i = r0; i < r1 && i < n_first; i++)
            lf_lp_quant_h(L, W, d, i);
    for (int s = 0; s < T; s++) {
        const int n_act = lf_lp_active(L, s);
        const int e = n_act < r1 ? n_act : r1;
        if (e <= r0)
            break;   /* rows are longest first: none of these runs later either */
        for (int d = 0; d < D; d++) {
            /* this step's inputs of the rows (position i: W->xa row i, W->gx row (d, i)) */
            for (int i = r0; i < e; i++) {
                const Py_ssize_t b = L->order[i];
                lf_lp_quant_row_fast(path, kind, L->n_in, kp_ih,
                                     L->x + ((size_t) lf_lp_time(L, s, d, b) * B + b) * L->n_in,
                                     (uint8_t*) W->xa + (size_t) i * kp_ih * es, W->xs + i);
            }
            lf_lp_gemm_in(path, &amx, L->ih[d], e - r0,
                          (const uint8_t*) W->xa + (size_t) r0 * kp_ih * es, W->xs + r0, 0, nb_g,
                          W->gx + ((size_t) d * B + r0) * G, (size_t) G);
            lf_lp_gemm_in(path, &amx, L->hh[d], e - r0,
                          (const uint8_t*) W->ha + ((size_t) d * B + r0) * kp_hh * es,
                          W->hs + d * B + r0, 0, nb_g, W->gh + ((size_t) d * B + r0) * G, (size_t) G);
        }
        for (int d = 0; d < D; d++)
            for (int i = r0; i < e; i++)
                lf_lp_cell_row(L, W, s, d, i);
        if (P) {
            for (int d = 0; d < D; d++)
                lf_lp_gemm_in(path, &amx, L->hr[d], e - r0,
                              (const uint8_t*) W->pa + ((size_t) d * B + r0) * kp_hr * es,
                              W->ps + d * B + r0, 0, nb_p, W->hp + ((size_t) d * B + r0) * Hout,
                              (size_t) Hout);
            for (int d = 0; d < D; d++)
                for (int i = r0; i < e; i++)
                    lf_lp_proj_row(L, W, s, d, i);
        }
    }
    lf_amx_end(path, &amx);
}

/* 2b. the recurrence, both directions in the same loop: every thread goes through every step,
   with a barrier after the product and after the cell update (and after the projection and its
   copy). A row's h is quantized for the next step by the thread that just wrote it, in the cell
   (or copy) phase: the scale is the row's own, and no thread reads the quantized rows until the
   barrier; a separate quantization phase cost a third barrier a step. Directions d0..d1-1, by
   thread `rank` of `team` (team 1: one thread alone, no barrier). */
static void lf_lp_layer_rec_dirs(const lf_lp_layer* L, const lf_lp_ws* W, int d0, int d1,
                                 int team, int rank) {
    const int kind = L->kind, path = L->path, B = L->B, T = L->T, H = L->H, nd = d1 - d0;
    const int Hout = L->Hout, P = L->P, G = 4 * H;
    const size_t es = lf_lp_elem(kind);
    const int kp_hh = L->hh[0]->kp, kp_hr = P ? L->hr[0]->kp : 0;
    const int nb_g = L->hh[0]->nb, nb_p = P ? L->hr[0]->nb : 0;
    const int n_groups = (nb_g + LF_LP_ITEM_BLOCKS - 1) / LF_LP_ITEM_BLOCKS;
    const int n_pgroups = (nb_p + LF_LP_ITEM_BLOCKS - 1) / LF_LP_ITEM_BLOCKS;
    /* OpenMP's barrier puts a waiting thread to sleep at once under lstm_fast's GOMP_SPINCOUNT
       default (docs/threads.md), a wake-up of tens of microseconds at every barrier */
    lf_barrier* bar = (lf_barrier*) &W->step_barrier;
    const int item_lo = lf_lp_share(nd * n_groups, team, rank);
    const int item_hi = lf_lp_share(nd * n_groups, team, rank + 1);
    const int n_first = lf_lp_active(L, 0);
    lf_amx_state amx;
    amx.cfg_m = 0;
    for (int it = lf_lp_share(nd * n_first, team, rank); it < lf_lp_share(nd * n_first, team, rank + 1); it++)
        lf_lp_quant_h(L, W, d0 + it / n_first, it % n_first);
    lf_barrier_wait(bar, team);
    for (int s = 0; s < T; s++) {
        const int n_act = lf_lp_active(L, s);
        if (n_act == 0)
            break;
        /* each thread's share of the column groups, walked backwards on odd steps: the groups
           the previous step read last are still in L1 (as lf_pgemv_dir does for float32); an
           output's sum does not depend on the order */
        for (int k = item_lo; k < item_hi; k++) {
            const int it = s & 1 ? item_lo + item_hi - 1 - k : k;
            const int d = d0 + it / n_groups, g = it % n_groups;
            const int b0 = g * LF_LP_ITEM_BLOCKS;
            const int b1 = b0 + LF_LP_ITEM_BLOCKS < nb_g ? b0 + LF_LP_ITEM_BLOCKS : nb_g;
            lf_lp_gemm_in(path, &amx, L->hh[d], n_act,
                          (const uint8_t*) W->ha + (size_t) d * B * kp_hh * es, W->hs + d * B, b0, b1,
                          W->gh + (size_t) d * B * G, (size_t) G);
        }
        lf_barrier_wait(bar, team);
        for (int it = lf_lp_share(nd * n_act, team, rank); it < lf_lp_share(nd * n_act, team, rank + 1); it++)
            lf_lp_cell_row(L, W, s, d0 + it / n_act, it % n_act);
        lf_barrier_wait(bar, team);
        if (P) {
            for (int it = lf_lp_share(nd * n_pgroups, team, rank);
                 it < lf_lp_share(nd * n_pgroups, team, rank + 1); it++) {
                const int d = d0 + it / n_pgroups, g = it % n_pgroups;
                const int b0 = g * LF_LP_ITEM_BLOCKS;
                const int b1 = b0 + LF_LP_ITEM_BLOCKS < nb_p ? b0 + LF_LP_ITEM_BLOCKS : nb_p;
                lf_lp_gemm_in(path, &amx, L->hr[d], n_act,
                              (const uint8_t*) W->pa + (size_t) d * B * kp_hr * es, W->ps + d * B,
                              b0, b1, W->hp + (size_t) d * B * Hout, (size_t) Hout);
            }
            lf_barrier_wait(bar, team);
            for (int it = lf_lp_share(nd * n_act, team, rank); it < lf_lp_share(nd * n_act, team, rank + 1); it++)
                lf_lp_proj_row(L, W, s, d0 + it / n_act, it % n_act);
            lf_barrier_wait(bar, team);
        }
    }
    lf_amx_end(path, &amx);
}

/* the recurrence of every direction, by this thread of the team (or alone) */
static void lf_lp_layer_rec(const lf_lp_layer* L, const lf_lp_ws* W) {
    const int team = lf_team_size(), rank = lf_team_rank();
    if (W->rows_fused)     /* each thread its own contiguous share of the rows (2a) */
        lf_lp_rows_rec(L, W, lf_lp_share(L->B, team, rank), lf_lp_share(L->B, team, rank + 1));
    else
        lf_lp_layer_rec_dirs(L, W, 0, L->D, team, rank);
}

/* 2c. Two directions on two threads (fewer rows than the row split takes): each thread claims a
   direction and runs it whole, alone: its inputs quantized and projected by its W_ih (into a
   buffer of that direction's own), then its recurrence, with no barrier at all (the directions
   of a layer never meet). A thread that arrives late (a sleeping worker's wake) finds its
   direction claimed if the first thread finished its own before it came. The same sums and
   cells as 1 + 2b: the same bits. */
static void lf_lp_dir_forward(const lf_lp_layer* L, const lf_lp_ws* W, int d) {
    const size_t TB = (size_t) L->T * L->B;
    lf_lp_layer_proj(L, W, d, d + 1,
                     (uint8_t*) W->xa + (size_t) d * TB * L->ih[0]->kp * lf_lp_elem(L->kind),
                     W->xs + (size_t) d * TB, 1, 0);
    lf_lp_layer_rec_dirs(L, W, d, d + 1, 1, 0);
}

/* 3. Split by hidden units, for a few rows (batch < LF_LP_SPLIT_MAX_ROWS), one direction, no
   projection: each thread computes its 32-unit panels' four gate columns of every step (its
   share of W_hh, and of W_ih for the inputs), their cells, and its units of h; the threads then
   meet once a step at a spin barrier (lf_split.h) before each reads the whole h for the next
   step. At batch 1 a step is bound by reading the weights from L2 (and by the input
   projection's products): each core reads its half from its own L2. Each thread quantizes the
   whole h row itself (a row's int8 scale is its largest magnitude over every unit), the same
   bits in every thread. The inputs are projected in blocks of lf_lp_split_block steps, each
   thread its own columns, at the block's first step.
   The first thread does not wait for the others to wake (150 us for a halted vCPU of a guest):
   it runs whole steps alone, every unit, until they have arrived, then opens the team at the
   next step (lf_team_open), as float32's split mode does. The same products and cells either
   way, and the same as 1 + 2b: the same bits on every thread count. */
#define LF_LP_SPLIT_MAX_ROWS 8
/* steps a projection block: about 16 rows. A block's projection is the longest stretch in which
   the first thread, still alone, cannot open the team: with 16 steps at batch 4 (64 rows) the
   woken thread waited through it, and (100,4,256,256) ran 1.02x (bfloat16) and 1.09x (int8) the
   time of the column split (2b) on two threads, where 1000 steps ran 0.90x and 0.97x (Zen 4) */
static inline int lf_lp_split_block(int B) { return B >= 16 ? 1 : 16 / B; }
/* fewer steps: the call ends before a woken thread would have joined, and the parallel region's
   end still waits for it */
#define LF_LP_SPLIT_MIN_STEPS 32
static long lf_lp_split_alone_forced = 0;   /* tests: the first thread runs this many steps alone */
static int lf_lp_split_way_forced = 0;      /* tests and tools: 1 split, 2 one thread, 0 measured */
static long lf_lp_split_runs = 0;           /* calls run split by units (tests: it did run) */
static long lf_lp_dir_runs = 0;             /* calls run split by directions (2c) */
static long lf_lp_fused_runs = 0;           /* calls run with the fused batch-1 products */
static long lf_lp_fused_blocks = 0;         /* blocks whose projection came from such products */

static inline int lf_lp_split_ok(const lf_lp_layer* L) {
    return L->threads_split > 1 && L->cell_units != NULL && L->D == 1 && L->P == 0
           && L->B < LF_LP_SPLIT_MAX_ROWS && L->H % 32 == 0 && L->H >= 64
           && L->T >= LF_LP_SPLIT_MIN_STEPS;
}

/* Batch 1 on VDPBF16PS or VPDPBUSD (one thread, split by units, or each direction on a thread of
   its own): each step's W_hh product
   carries a share of the next block's input projection (lf_bf16_row8_fused, lf_int8_row8_fused),
   so that a block's projection costs no time of its own. A thread whose units changed within a block (the team
   opened there) carries the shares of the steps left from then on, and projects the shares of
   the steps before at the next block's start; the first block is projected at its start. The
   same sums: the same bits.
   Only where a thread's share of W_hh is 64 KB or more: a smaller one is read from L1 and its
   product leaves the units no time to fill (AMD EPYC Zen 4, in turns: bfloat16 (100,1,64,64) on
   one thread, 32 KB, 1.02x the time fused; int8 (100,1,128,128) split on two threads, 32 KB
   each, 1.00x-1.08x; from 64 KB 0.78x-0.96x). */
#define LF_LP_FUSED_MIN_BYTES (64 * 1024)
static inline int lf_lp_fused_share_ok(const lf_lp_layer* L, int u0, int u1) {
    return (size_t) (u1 - u0) * 4 * L->hh[0]->kp * lf_lp_elem(L->kind) >= LF_LP_FUSED_MIN_BYTES;
}
static inline int lf_lp_fused_ok(const lf_lp_layer* L) {
#if LF_PGEMM_X86
    return L->path == LF_PATH_AVX512 && L->cell_units != NULL
           && L->B == 1 && L->P == 0 && L->H % 32 == 0 && L->H >= 64
           && L->T >= LF_LP_SPLIT_MIN_STEPS && lf_lp_fused_share_ok(L, 0, L->H);
#else
    (void) L;
    return 0;
#endif
}

typedef struct {          /* one thread's buffers */
    void* xa; float* xs;  /* a block's quantized inputs */
    void* ha; float* hs;  /* this step's quantized h */
    float* gh;            /* this step's h products, the thread's columns */
    /* fused: the block whose projection this thread's steps carry (-1: none), the units they
       carry it for, the step of the block before from which they carry it, and how many have */
    int fuse_block, fuse_u0, fuse_u1, fuse_from, fuse_steps;
} lf_lp_split_own;

/* the columns of units u0..u1 of the four gates (all of them in one call when it has all) */
static inline void lf_lp_split_gemm(int path, lf_amx_state* amx, const lf_lp_mat* M, int rows,
                                    const void* A, const float* sx, int H, int u0, int u1,
                                    float* out, size_t ldo) {
    if (u0 == 0 && u1 == H) {
        lf_lp_gemm_in(path, amx, M, rows, A, sx, 0, M->nb, out, ldo);
        return;
    }
    for (int g = 0; g < 4; g++)
        lf_lp_gemm_in(path, amx, M, rows, A, sx, (g * H + u0) / 16, (g * H + u1) / 16, out, ldo);
}

/* the rows of the block of steps s0.. of direction d (at most pb, none past `steps`) quantized
   into O->xa; with `pad`, the rows past `steps` zeroed up to pb (the fused products read whole
   groups of 8) */
static void lf_lp_split_quant_block(const lf_lp_layer* L, const lf_lp_split_own* O, int d,
                                    int steps, int s0, int pb, int pad) {
    const int B = L->B, kp_ih = L->ih[0]->kp;
    const size_t es = lf_lp_elem(L->kind);
    const int n = steps - s0 < pb ? steps - s0 : pb;
    for (int k = 0; k < n; k++)
        for (int i = 0; i < B; i++)
            lf_lp_quant_row_fast(L->path, L->kind, L->n_in, kp_ih,
                                 L->x + ((size_t) lf_lp_time(L, s0 + k, d, L->order[i]) * B
                                         + L->order[i]) * L->n_in,
                                 (uint8_t*) O->xa + ((size_t) k * B + i) * kp_ih * es,
                                 O->xs + k * B + i);
    if (pad && n < pb) {
        memset((uint8_t*) O->xa + (size_t) n * B * kp_ih * es, 0, (size_t) (pb - n) * B * kp_ih * es);
        memset(O->xs + n * B, 0, (size_t) (pb - n) * B * sizeof(float));
    }
}

#if LF_PGEMM_X86
/* fused: the thread's n blocks of the four gates' columns (units u0..u1), e-th of them */
#define LF_FUSED_BLOCK(e) ((((e) / nb_u) * H + u0) / 16 + (e) % nb_u)
/* step j of a block: the W_hh product of units u0..u1 (8 of their blocks a call) and the j-th
   share of the next block's projection: a piece (8 of its 16 rows against one block of W_ih) a
   call, the thread's 2n pieces over the block's 16 steps */
static void lf_lp_fused_hh(const lf_lp_layer* L, const lf_lp_split_own* O, int d, float* gx_next,
                           int j, int u0, int u1) {
    const lf_lp_mat *Wh = L->hh[d], *Wi = L->ih[d];
    const int H = L->H, G = 4 * H, nb_u = (u1 - u0) / 16, n = 4 * nb_u, n_calls = n / 8;
    const int kp_ih = Wi->kp;
    const size_t es = lf_lp_elem(L->kind);
    for (int t = 0; t < n_calls; t++) {
        int bh[8];
        for (int q = 0; q < 8; q++)
            bh[q] = LF_FUSED_BLOCK(8 * t + q);
        const int piece = j * n_calls + t, half = piece / n, bi = LF_FUSED_BLOCK(piece % n);
        const uint8_t* xa = (const uint8_t*) O->xa + (size_t) half * 8 * kp_ih * es;
        float* px = gx_next + (size_t) half * 8 * G + (size_t) bi * 16;
        if (L->kind == LF_LP_INT8)
            lf_int8_row8_fused(Wh, bh, (const uint8_t*) O->ha, O->hs[0], O->gh, Wi, bi, xa,
                               (size_t) kp_ih, O->xs + half * 8, px, (size_t) G);
        else
            lf_bf16_row8_fused(Wh, bh, (const uint8_t*) O->ha, 0.0f, O->gh, Wi, bi, xa,
                               (size_t) kp_ih * 2, NULL, px, (size_t) G);
    }
}

/* the pieces of steps 0..j-1 of the block before (those it did not carry) */
static void lf_lp_fused_rest(const lf_lp_layer* L, const lf_lp_split_own* O, lf_amx_state* amx,
                             int d, float* gx, int j, int u0, int u1) {
    const lf_lp_mat* Wi = L->ih[d];
    const int H = L->H, G = 4 * H, nb_u = (u1 - u0) / 16, n = 4 * nb_u, n_calls = n / 8;
    const size_t es = lf_lp_elem(L->kind);
    for (int piece = 0; piece < j * n_calls; piece++) {
        const int half = piece / n, bi = LF_FUSED_BLOCK(piece % n);
        lf_lp_gemm_in(L->path, amx, Wi, 8, (const uint8_t*) O->xa + (size_t) half * 8 * Wi->kp * es,
                      O->xs + half * 8, bi, bi + 1, gx + (size_t) half * 8 * G, (size_t) G);
    }
}
#undef LF_FUSED_BLOCK
#endif

/* step s of direction d (steps in all), units u0..u1: h_cur -> h_next (rows by position in the
   order), c, y and L->h in place. gx: the block's projected inputs; fused (lf_lp_fused_ok): two
   such blocks, this one's and the next one's, by the block's parity */
static void lf_lp_split_step(const lf_lp_layer* L, lf_lp_split_own* O, int d, int steps,
                             float* gx_all, int fused, const float* h_cur, float* h_next, int s,
                             int u0, int u1, lf_amx_state* amx) {
    const int kind = L->kind, path = L->path, B = L->B, H = L->H, G = 4 * H;
    const size_t es = lf_lp_elem(kind);
    const int kp_hh = L->hh[0]->kp;
    const int n_act = lf_lp_active(L, s), pb = lf_lp_split_block(B), blk = s / pb;
    float* gx = gx_all + (fused ? (size_t) (blk % 2) * pb * B * G : 0);
    /* a next block to project in these steps (where this thread's share is large enough) */
    const int next = fused && (blk + 1) * pb < steps && lf_lp_fused_share_ok(L, u0, u1);
    const int carrying = fused && O->fuse_block == blk + 1 && O->fuse_u0 == u0 && O->fuse_u1 == u1;
    if (s % pb == 0) {
        /* every row of the block's steps, as the up-front projection (1) does, unless the
           block before carried it: whole for these units or more (a team opened at this
           step), or from a step on for these units (then the pieces before it) */
        const int whole = O->fuse_from == 0 && O->fuse_u0 <= u0 && u1 <= O->fuse_u1;
        const int from = O->fuse_u0 == u0 && O->fuse_u1 == u1;
        if (fused && O->fuse_block == blk && O->fuse_from + O->fuse_steps == pb && (whole || from)) {
            __atomic_add_fetch(&lf_lp_fused_blocks, 1, __ATOMIC_RELAXED);
#if LF_PGEMM_X86
            if (!whole)
                lf_lp_fused_rest(L, O, amx, d, gx, O->fuse_from, u0, u1);
#endif
        } else {
            lf_lp_split_quant_block(L, O, d, steps, s, pb, 0);
            lf_lp_split_gemm(path, amx, L->ih[d], (steps - s < pb ? steps - s : pb) * B, O->xa,
                             O->xs, H, u0, u1, gx, (size_t) G);
        }
    }
    if (next && (s % pb == 0 || !carrying)) {
        /* carry the next block's projection from this step on (its start, or where these
           units began within it) */
        lf_lp_split_quant_block(L, O, d, steps, (blk + 1) * pb, pb, 1);
        O->fuse_block = blk + 1;
        O->fuse_u0 = u0;
        O->fuse_u1 = u1;
        O->fuse_from = s % pb;
        O->fuse_steps = 0;
    }
    for (int i = 0; i < n_act; i++)
        lf_lp_quant_row_fast(path, kind, H, kp_hh, h_cur + (size_t) i * H,
                             (uint8_t*) O->ha + (size_t) i * kp_hh * es, O->hs + i);
#if LF_PGEMM_X86
    if (next && n_act == 1) {
        lf_lp_fused_hh(L, O, d, gx_all + (size_t) ((blk + 1) % 2) * pb * B * G, s % pb, u0, u1);
        O->fuse_steps++;
    } else
#endif
    {
        lf_lp_split_gemm(path, amx, L->hh[d], n_act, O->ha, O->hs, H, u0, u1, O->gh, (size_t) G);
    }
    for (int i = 0; i < n_act; i++) {
        const Py_ssize_t b = L->order[i];
        const Py_ssize_t t = lf_lp_time(L, s, d, b);
        float* hn = h_next + (size_t) i * H;
        L->cell_units(H, u0, u1, O->gh + (size_t) i * G,
                      gx + ((size_t) (s % pb) * B + i) * G, L->bias + (size_t) d * G,
                      L->c + ((size_t) d * B + b) * H, hn);
        memcpy(L->y + (((size_t) t * B + b) * L->D + d) * H + u0, hn + u0,
               (size_t) (u1 - u0) * sizeof(float));
        memcpy(L->h + ((size_t) d * B + b) * H + u0, hn + u0, (size_t) (u1 - u0) * sizeof(float));
    }
}

/* Direction d on n_threads (1: the fused batch-1 way alone). Returns 0, or -1 when memory ran out
   (nothing is written then). */
static int lf_lp_split_forward(const lf_lp_layer* L, int n_threads, int fused, int d) {
    const int B = L->B, H = L->H, G = 4 * H, T = L->T;
    const size_t es = lf_lp_elem(L->kind);
    const int kp_ih = L->ih[0]->kp, kp_hh = L->hh[0]->kp;
    const size_t rows_blk = (size_t) lf_lp_split_block(B) * B;
    /* each thread's buffers in one allocation, each part on its own cache lines */
#define LF_LP_UP64(n) (((size_t) (n) + 63) / 64 * 64)
    const size_t sz_xa = LF_LP_UP64(rows_blk * kp_ih * es), sz_xs = LF_LP_UP64(rows_blk * 4);
    const size_t sz_ha = LF_LP_UP64((size_t) B * kp_hh * es), sz_hs = LF_LP_UP64((size_t) B * 4);
    const size_t sz_gh = LF_LP_UP64((size_t) B * G * 4);
    const size_t per_thread = sz_xa + sz_xs + sz_ha + sz_hs + sz_gh;
#undef LF_LP_UP64
    uint8_t* own_mem = (uint8_t*) lf_malloc64(per_thread * (size_t) n_threads);
    float* h_bufs = (float*) lf_malloc64(2 * (size_t) B * H * sizeof(float));
    float* gx = (float*) lf_malloc64((fused ? 2 : 1) * rows_blk * G * sizeof(float));
    lf_lp_split_own* own = (lf_lp_split_own*) malloc((size_t) n_threads * sizeof(lf_lp_split_own));
    if (!own_mem || !h_bufs || !gx || !own) {
        free(own_mem); free(h_bufs); free(gx); free(own);
        return -1;
    }
    for (int r = 0; r < n_threads; r++) {
        uint8_t* p = own_mem + (size_t) r * per_thread;
        own[r].xa = p;
        own[r].xs = (float*) (p + sz_xa);
        own[r].ha = p + sz_xa + sz_xs;
        own[r].hs = (float*) (p + sz_xa + sz_xs + sz_ha);
        own[r].gh = (float*) (p + sz_xa + sz_xs + sz_ha + sz_hs);
        own[r].fuse_block = -1;
        own[r].fuse_u0 = own[r].fuse_u1 = own[r].fuse_from = own[r].fuse_steps = 0;
    }
    for (int i = 0; i < B; i++)
        memcpy(h_bufs + (size_t) i * H, L->h + ((size_t) d * B + L->order[i]) * H,
               (size_t) H * sizeof(float));
    lf_barrier barrier;
    lf_barrier_init(&barrier);
    long join_at = -1, arrived = 0;
    const long alone = lf_lp_split_alone_forced;
    /* every thread stops at the same step: past the longest row (lengths below T) */
    const int steps = L->lengths[L->order[0]] < T ? (int) L->lengths[L->order[0]] : T;
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        const int team = lf_team_size(), rank = lf_team_rank();
        lf_lp_split_own* O = &own[rank];
        lf_amx_state amx;
        amx.cfg_m = 0;
        int s = 0;
        if (rank == 0) {
            while (s < steps && team > 1 && (s < alone || lf_team_arrived(&arrived) < team - 1)) {
                lf_lp_split_step(L, O, d, steps, gx, fused, h_bufs + (size_t) (s % 2) * B * H,
                                 h_bufs + (size_t) ((s + 1) % 2) * B * H, s, 0, H, &amx);
                s++;
            }
            lf_team_open(&join_at, s);
        } else {
            lf_team_arrive(&arrived);
            s = (int) lf_team_wait_open(&join_at);
        }
        /* whole 32-unit panels, as float32's split mode shares them */
        const int u0 = (int) lf_team_unit_begin(H), u1 = (int) lf_team_unit_end(H);
        for (; s < steps; s++) {
            if (u1 > u0)
                lf_lp_split_step(L, O, d, steps, gx, fused, h_bufs + (size_t) (s % 2) * B * H,
                                 h_bufs + (size_t) ((s + 1) % 2) * B * H, s, u0, u1, &amx);
            lf_barrier_wait(&barrier, team);
        }
        lf_amx_end(L->path, &amx);
    }
    free(own_mem); free(h_bufs); free(gx); free(own);
    return 0;
}

/* 2c: two threads, each claiming a direction and running it whole (a thread that arrives late
   finds its direction taken if the first finished its own): fused, each direction's batch-1 loop
   (lf_lp_split_forward on one thread); else its projection and recurrence in W's buffers
   (lf_lp_dir_forward). Returns 0, or -1 when memory ran out in a fused direction (the other
   may have run: the caller raises and drops the outputs). */
static int lf_lp_two_dirs(const lf_lp_layer* L, const lf_lp_ws* W, int fused) {
    int next_dir = 0, rc = 0;
    __atomic_add_fetch(&lf_lp_dir_runs, 1, __ATOMIC_RELAXED);
    #pragma omp parallel num_threads(2)
    {
        for (int d; (d = __atomic_fetch_add(&next_dir, 1, __ATOMIC_RELAXED)) < L->D;) {
            if (!fused)
                lf_lp_dir_forward(L, W, d);
            else if (lf_lp_split_forward(L, 1, 1, d) != 0)
                __atomic_store_n(&rc, -1, __ATOMIC_RELAXED);
        }
    }
    return rc;
}

enum { LF_LP_WS_XA = 0, LF_LP_WS_GX = 1 };   /* work-buffer slots of this module */

/* The layer: inputs projected first, then the recurrence. One thread runs the phases without
   entering a parallel region (libgomp then wakes no pool threads: a few us a batch-1 call).
   Returns 0, or -1 when memory ran out (nothing is written then). */
static int lf_lp_layer_forward(const lf_lp_layer* L) {
    const int D = L->D, B = L->B, H = L->H, Hout = L->Hout, P = L->P, G = 4 * H;
    const size_t TB = (size_t) L->T * B, es = lf_lp_elem(L->kind);
    const int kp_ih = L->ih[0]->kp, kp_hh = L->hh[0]->kp, kp_hr = P ? L->hr[0]->kp : 0;
    /* threads or one, by the measured speed of each for this shape (lf_split_choose): a core
       taken by another process makes every step wait for the thread that lost it (measured on
       the Xeon 6/207 with one core busy, batch 16: 2 threads 3-6x slower than 1). Both ways
       give the same bits. */
    int threads_proj = L->threads_proj, threads_rec = L->threads_rec, choice = 1;
    int split = lf_lp_split_ok(L), dirs = L->threads_dirs > 1 && D == 2;
    int fused = lf_lp_fused_ok(L);
    long key = 0, start = 0;
    if (threads_proj > 1 || threads_rec > 1 || split || dirs) {
        const int most = threads_proj > threads_rec ? threads_proj : threads_rec;
        key = lf_split_key(B, H, L->n_in, split && L->threads_split > most ? L->threads_split : most,
                           (L->kind - 1) + 2 * (D - 1) + 4 * (P > 0));
        choice = lf_split_choose(key);
        if ((split || dirs) && lf_lp_split_way_forced)
            choice = lf_lp_split_way_forced == 1 ? 1 : 0;
        if (!(choice & 1))
            threads_proj = threads_rec = 1, split = 0, dirs = 0;
    }
    /* batch 1 fused: split by units, its directions on two threads (2c), or one thread */
    fused = fused && (split || dirs || (threads_proj <= 1 && threads_rec <= 1));
    if (split || fused) {        /* split by units (3), or batch 1 fused */
        if (split)
            __atomic_add_fetch(&lf_lp_split_runs, 1, __ATOMIC_RELAXED);
        if (fused)
            __atomic_add_fetch(&lf_lp_fused_runs, 1, __ATOMIC_RELAXED);
        start = lf_ticks();
        int rc = 0;
        if (D == 1) {
            rc = lf_lp_split_forward(L, split ? L->threads_split : 1, fused, 0);
        } else if (dirs) {
            rc = lf_lp_two_dirs(L, NULL, 1);
        } else {
            for (int d = 0; d < D && rc == 0; d++)
                rc = lf_lp_split_forward(L, 1, fused, d);
        }
        if (key != 0) {
            if (rc == 0 && (choice & 2))
                lf_split_record(key, choice, lf_ticks() - start, L->T);
            lf_split_ended(key);
        }
        return rc;
    }
    lf_lp_ws W;
    /* enough rows for every thread and small weights: split by rows, each thread projecting its
       own inputs step by step (2a). Not where the projection has work for more threads than
       the recurrence (long sequences of a small layer: int8 (1000,16,128,32) on two threads
       1.12x, bfloat16 (1000,16,256,32) 1.50x the time with the projection in the one thread's
       steps). On AMX (and its emulation, which takes the same ways) from 32 rows a thread, a
       pair of row tiles: this way's products then load each weight tile once per 32 rows, as
       the up-front projection's do, and the step's gates stay in cache instead of going
       through memory as (T, B, 4H) floats. Unmeasured on AMX (no such CPU since the rule was
       written); the same trade as measured on the other paths, and as oneDNN's AMX LSTM makes
       (the layer's product in each step). */
    const size_t step_bytes = (size_t) D * ((size_t) L->ih[0]->n * kp_ih + (size_t) L->hh[0]->n * kp_hh
                                            + (P ? (size_t) L->hr[0]->n * kp_hr : 0)) * es;
    const int amx = L->path == LF_PATH_AMX || L->path == LF_PATH_AMX_EMU;
    const int chunk_min = amx ? LF_LP_AMX_CHUNK_MIN_ROWS : LF_LP_CHUNK_MIN_ROWS;
    const int alone_min = amx ? LF_LP_AMX_CHUNK_MIN_ROWS : LF_LP_ALONE_MIN_ROWS;
    W.rows_fused = step_bytes <= L->rows_max_bytes && threads_proj <= threads_rec
                   && B >= (threads_rec > 1 ? threads_rec * chunk_min : alone_min);
    /* two directions on their two threads (2c) where the rows are too few for the row split */
    const int by_dirs = dirs && !W.rows_fused;
    if (W.rows_fused) {        /* one step's rows */
        W.xa = lf_malloc64((size_t) B * kp_ih * es);
        W.xs = (float*) lf_malloc64((size_t) B * sizeof(float));
        W.gx = (float*) lf_malloc64((size_t) D * B * G * sizeof(float));
    } else {
        /* every step's: the two large buffers are kept per thread from call to call
           (lf_ws_get): a fresh one's first touch costs a page fault per 4 KB on every call */
        W.xa = lf_ws_get(LF_LP_WS_XA, (by_dirs ? D : 1) * TB * kp_ih * es);
        W.xs = (float*) lf_malloc64((by_dirs ? D : 1) * TB * sizeof(float));
        W.gx = (float*) lf_ws_get(LF_LP_WS_GX, (size_t) D * TB * G * sizeof(float));
    }
    W.ha = lf_malloc64((size_t) D * B * kp_hh * es);
    W.hs = (float*) lf_malloc64((size_t) D * B * sizeof(float));
    W.gh = (float*) lf_malloc64((size_t) D * B * G * sizeof(float));
    W.pa = P ? lf_malloc64((size_t) D * B * kp_hr * es) : NULL;
    W.ps = P ? (float*) lf_malloc64((size_t) D * B * sizeof(float)) : NULL;
    W.hraw = P ? (float*) lf_malloc64((size_t) D * B * H * sizeof(float)) : NULL;
    W.hp = P ? (float*) lf_malloc64((size_t) D * B * Hout * sizeof(float)) : NULL;
    lf_barrier_init(&W.step_barrier);
    int ok = W.xa && W.xs && W.gx && W.ha && W.hs && W.gh && (!P || (W.pa && W.ps && W.hraw && W.hp));
    if (ok) {
        start = lf_ticks();
        if (by_dirs) {
            lf_lp_two_dirs(L, &W, 0);
        } else {
            if (!W.rows_fused) {  /* the up-front projection (1); split by rows (2a), each
                                     thread projects its own rows' inputs in its steps */
                if (threads_proj > 1) {
                    #pragma omp parallel num_threads(threads_proj)
                    lf_lp_layer_proj(L, &W, 0, D, W.xa, W.xs, lf_team_size(), lf_team_rank());
                } else {
                    lf_lp_layer_proj(L, &W, 0, D, W.xa, W.xs, 1, 0);
                }
            }
            if (threads_rec > 1) {
                #pragma omp parallel num_threads(threads_rec)
                lf_lp_layer_rec(L, &W);
            } else {
                lf_lp_layer_rec(L, &W);
            }
        }
        if (key != 0 && (choice & 2))
            lf_split_record(key, choice, lf_ticks() - start, L->T);
    }
    if (key != 0)
        lf_split_ended(key);
    if (W.rows_fused) {
        free(W.xa); free(W.gx);
    } else {
        lf_ws_release(LF_LP_WS_XA, W.xa);
        lf_ws_release(LF_LP_WS_GX, W.gx);
    }
    free(W.xs); free(W.ha); free(W.hs); free(W.gh); free(W.pa);
    free(W.ps); free(W.hraw); free(W.hp);
    return ok ? 0 : -1;
}

#endif
