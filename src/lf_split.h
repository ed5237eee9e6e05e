/* Team helpers for the batch-1 "split" recurrence (_forward.pyx): the threads of one OpenMP team
   share each step's hidden units and meet once per step at a spin barrier.

   Why not an OpenMP barrier: a batch-1 step lasts about a microsecond, and two OpenMP barriers per
   step cost more than splitting the step saves (measured: (100,1,128,128) on two threads 0.47 ms
   with OpenMP barriers against 0.43 ms on one thread). Spinning on one cache line costs the time
   of a line transfer between the cores; a thread that waits long yields its core. */
#ifndef LF_SPLIT_H
#define LF_SPLIT_H

#include <sched.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LF_PAUSE() _mm_pause()
#else
#define LF_PAUSE() ((void) 0)
#endif

typedef struct {
    int arrived;       /* threads at the barrier in the current generation */
    int generation;    /* bumped by the last thread to arrive */
    char pad[56];      /* own cache line */
} lf_barrier;

static inline int lf_team_size(void) {
#if defined(_OPENMP)
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static inline int lf_team_rank(void) {
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline void lf_barrier_init(lf_barrier* b) {
    b->arrived = 0;
    b->generation = 0;
}

/* every thread's writes before the call are seen by every thread after it (release/acquire) */
static inline void lf_barrier_wait(lf_barrier* b, int n_threads) {
    if (n_threads <= 1)
        return;
    int gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == n_threads) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen; spins++) {
        if (spins < 20000)
            LF_PAUSE();
        else
            sched_yield();    /* the other thread is descheduled: give the core back */
    }
}

#endif
