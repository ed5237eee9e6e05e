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


/* a cycle counter for the split mode's own bookkeeping (0 where there is none) */
static inline long lf_ticks(void) {
#if defined(__x86_64__) || defined(__i386__)
    return (long) __rdtsc();
#else
    return 0;
#endif
}

/* This thread's share of `hidden` units in split mode: whole 32-unit panels, split as evenly
   as the panel count allows (first unit; lf_team_unit_end for one past the last). */
static inline long lf_team_unit_begin(long hidden) {
    long n_panels = hidden / 32, team = lf_team_size(), rank = lf_team_rank();
    long per = (n_panels + team - 1) / team;
    return (rank * per < n_panels ? rank * per : n_panels) * 32;
}
static inline long lf_team_unit_end(long hidden) {
    long n_panels = hidden / 32, team = lf_team_size(), rank = lf_team_rank();
    long per = (n_panels + team - 1) / team;
    return ((rank + 1) * per < n_panels ? (rank + 1) * per : n_panels) * 32;
}

/* the barrier, returning `wait` plus the ticks spent in it */
static inline long lf_barrier_wait_timed(lf_barrier* b, int n_threads, long wait) {
    long t0 = lf_ticks();
    lf_barrier_wait(b, n_threads);
    return wait + (lf_ticks() - t0);
}

/* a thread's end of a split run begun at tick `start`: its work (the ticks since, less its
   waits) and its waits added to totals[0] and totals[1] */
static inline void lf_split_account(long* totals, long start, long wait) {
    __atomic_add_fetch(&totals[0], lf_ticks() - start - wait, __ATOMIC_RELAXED);
    __atomic_add_fetch(&totals[1], wait, __ATOMIC_RELAXED);
}

/* Split mode needs every thread of its team running at once. Where that fails (a busy machine,
   a virtual machine whose cores are not all scheduled) it is slower than one thread: with two
   threads it wins while each waits at the barrier less than it works. A call whose threads
   waited longer in all than they worked turns split mode off for the next LF_SPLIT_BACKOFF
   calls of the process (the bits are the same either way). */
#define LF_SPLIT_BACKOFF 200
static int lf_split_backoff = 0;

static inline int lf_split_allowed(void) {
    int left = __atomic_load_n(&lf_split_backoff, __ATOMIC_RELAXED);
    if (left > 0) {
        __atomic_store_n(&lf_split_backoff, left - 1, __ATOMIC_RELAXED);
        return 0;
    }
    return 1;
}

static inline void lf_split_report(long work_ticks, long wait_ticks) {
    if (wait_ticks > work_ticks)
        __atomic_store_n(&lf_split_backoff, LF_SPLIT_BACKOFF, __ATOMIC_RELAXED);
}

#endif
