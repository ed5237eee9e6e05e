/* What the CPU is, read with cpuid (x86-64, GCC/clang): vendor, family/model, the vector ISA
   extensions the kernels care about together with the OS's support for their registers (XCR0 via
   xgetbv), and the data cache sizes (Intel leaf 4, AMD leaf 0x8000001D; both give size = ways x
   partitions x line size x sets and how many logical CPUs share the cache).

   lstm_fast/_cpu.py turns this into a description and derives the kernels' block sizes from it;
   elsewhere (other architectures, other compilers) lf_cpu_query leaves `known` 0 and the Python
   side falls back to sysfs / sysconf. */
#ifndef LF_CPU_H
#define LF_CPU_H

#include <string.h>

typedef struct {
    int known;                 /* 1: filled from cpuid */
    char vendor[13];
    char brand[49];
    int family, model, stepping;
    /* instruction set, each already ANDed with the OS support of its state (XCR0) */
    int avx2, fma, avx512f, avx512bw, avx512vl, avx512dq, avx512_bf16, avx512_vnni;
    int amx_tile, amx_bf16, amx_int8;
    /* raw cpuid bits before the XCR0 check (to tell "CPU has it, OS disabled it") */
    int cpu_avx512f, cpu_amx_tile;
    unsigned long long xcr0;
    /* data/unified caches: bytes of one instance and logical CPUs sharing it (0: unknown) */
    long l1d_bytes, l2_bytes, l3_bytes;
    int l1d_shared, l2_shared, l3_shared;
    int threads_per_core;      /* logical CPUs per core where cpuid says (0: unknown) */
} lf_cpu_info;

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>

static inline void lf_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}

static inline unsigned long long lf_xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));   /* xgetbv */
    return ((unsigned long long) hi << 32) | lo;
}

/* one deterministic cache leaf (Intel 4 / AMD 0x8000001D): fills the level's size and sharing */
static inline void lf_cache_leaf(lf_cpu_info* info, unsigned leaf) {
    for (unsigned sub = 0; sub < 16; sub++) {
        unsigned r[4];
        lf_cpuid(leaf, sub, r);
        unsigned type = r[0] & 0x1F;              /* 0: no more, 1 data, 2 instruction, 3 unified */
        if (type == 0)
            break;
        if (type == 2)
            continue;
        unsigned level = (r[0] >> 5) & 0x7;
        int shared = (int) ((r[0] >> 14) & 0xFFF) + 1;
        long ways = ((r[1] >> 22) & 0x3FF) + 1, parts = ((r[1] >> 12) & 0x3FF) + 1;
        long line = (r[1] & 0xFFF) + 1, sets = (long) r[2] + 1;
        long bytes = ways * parts * line * sets;
        if (level == 1) { info->l1d_bytes = bytes; info->l1d_shared = shared; }
        else if (level == 2) { info->l2_bytes = bytes; info->l2_shared = shared; }
        else if (level == 3) { info->l3_bytes = bytes; info->l3_shared = shared; }
    }
}

static void lf_cpu_query(lf_cpu_info* info) {
    unsigned r[4];
    memset(info, 0, sizeof(*info));
    lf_cpuid(0, 0, r);
    unsigned max_leaf = r[0];
    memcpy(info->vendor, &r[1], 4);
    memcpy(info->vendor + 4, &r[3], 4);
    memcpy(info->vendor + 8, &r[2], 4);
    info->vendor[12] = 0;
    lf_cpuid(1, 0, r);
    unsigned base_family = (r[0] >> 8) & 0xF, base_model = (r[0] >> 4) & 0xF;
    info->family = (int) base_family + (base_family == 0xF ? (int) ((r[0] >> 20) & 0xFF) : 0);
    info->model = (int) base_model
                + ((base_family == 0x6 || base_family == 0xF) ? (int) (((r[0] >> 16) & 0xF) << 4) : 0);
    info->stepping = (int) (r[0] & 0xF);
    int fma = (r[2] >> 12) & 1, osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1;
    int htt = (r[3] >> 28) & 1;
    unsigned long long xcr0 = osxsave ? lf_xgetbv0() : 0;
    info->xcr0 = xcr0;
    int os_avx = (xcr0 & 0x6) == 0x6;                    /* XMM and YMM state */
    int os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;     /* opmask, ZMM_Hi256, Hi16_ZMM */
    int os_amx = (xcr0 & 0x60000ULL) == 0x60000ULL;      /* XTILECFG, XTILEDATA */
    if (max_leaf >= 7) {
        lf_cpuid(7, 0, r);
        unsigned b = r[1], c = r[2], d = r[3];
        info->avx2 = os_avx && avx && ((b >> 5) & 1);
        info->fma = os_avx && fma;
        info->cpu_avx512f = (b >> 16) & 1;
        info->avx512f = os_avx512 && info->cpu_avx512f;
        info->avx512dq = info->avx512f && ((b >> 17) & 1);
        info->avx512bw = info->avx512f && ((b >> 30) & 1);
        info->avx512vl = info->avx512f && ((b >> 31) & 1);
        info->avx512_vnni = info->avx512f && ((c >> 11) & 1);
        info->cpu_amx_tile = (d >> 24) & 1;
        info->amx_tile = os_amx && info->cpu_amx_tile;
        info->amx_bf16 = info->amx_tile && ((d >> 22) & 1);
        info->amx_int8 = info->amx_tile && ((d >> 25) & 1);
        if (r[0] >= 1) {
            lf_cpuid(7, 1, r);
            info->avx512_bf16 = info->avx512f && ((r[0] >> 5) & 1);
        }
    }
    lf_cpuid(0x80000000u, 0, r);
    unsigned max_ext = r[0];
    if (max_ext >= 0x80000004u) {
        for (unsigned i = 0; i < 3; i++) {
            lf_cpuid(0x80000002u + i, 0, r);
            memcpy(info->brand + 16 * i, r, 16);
        }
        info->brand[48] = 0;
    }
    int amd = strcmp(info->vendor, "AuthenticAMD") == 0 || strcmp(info->vendor, "HygonGenuine") == 0;
    if (amd && max_ext >= 0x8000001Du) {
        lf_cpuid(0x80000001u, 0, r);
        if ((r[2] >> 22) & 1)                            /* TopologyExtensions: leaf 0x8000001D */
            lf_cache_leaf(info, 0x8000001Du);
        if (max_ext >= 0x8000001Eu) {
            lf_cpuid(0x8000001Eu, 0, r);
            info->threads_per_core = (int) ((r[1] >> 8) & 0xFF) + 1;
        }
    } else if (!amd && max_leaf >= 4) {
        lf_cache_leaf(info, 4);
        if (max_leaf >= 0xB) {
            lf_cpuid(0xB, 0, r);                         /* level 0: SMT, EBX = threads a core */
            if (((r[2] >> 8) & 0xFF) == 1)
                info->threads_per_core = (int) (r[1] & 0xFFFF);
        }
    }
    (void) htt;
    info->known = 1;
}
#else
static void lf_cpu_query(lf_cpu_info* info) {
    memset(info, 0, sizeof(*info));
}
#endif

#endif
