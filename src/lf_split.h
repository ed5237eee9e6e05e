/* Team helpers for the batch-1 "split" recurrence (_forward.pyx): the threads of one OpenMP team
   share each step's hidden units and meet once per step at a spin barrier.

   Why not an OpenMP barrier: a batch-1 step lasts about a microsecond, and two OpenMP barriers per
   step cost more than splitting the step saves (measured: (100,1,128,128) on two threads 0.47 ms
   with OpenMP barriers against 0.43 ms on one thread). Spinning on one cache line costs the time
   of a line transfer between the cores; a thread that waits long sleeps until woken. */
#ifndef LF_SPLIT_H
#define LF_SPLIT_H

#include <sched.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <limits.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LF_PAUSE() _mm_pause()
#else
#define LF_PAUSE() ((void) 0)
#endif

static inline long lf_ticks_now(void) {
#if defined(__x86_64__) || defined(__i386__)
    return (long) __rdtsc();
#else
    return 0;
#endif
}

typedef struct {
    int arrived;       /* threads at the barrier in the current generation */
    int generation;    /* bumped by the last thread to arrive */
    int sleepers;      /* threads in (or entering) a passive wait on `generation` */
    char pad[52];      /* own cache line */
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
    b->sleepers = 0;
}

/* How long a waiter spins before it waits passively (futex on Linux, sched_yield elsewhere), in
   cycle-counter ticks (about 20 us at 2-4 GHz): twenty batch-1 steps, so that on an idle machine
   a waiter never sleeps, while one whose partner lost its core to another process gives that
   core back soon instead of spinning (the earlier 20000 pauses were up to ~1 ms at 140 cycles a
   pause on this Xeon, then sched_yield kept the waiter runnable). */
#define LF_SPIN_TICKS 50000L
#define LF_SPIN_POLLS 4000L     /* the bound where there is no cycle counter */

static inline void lf_wait_passive(int* addr, int old) {
#if defined(__linux__)
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, old, NULL, NULL, 0);
#else
    (void) addr; (void) old;
    sched_yield();
#endif
}

static inline void lf_wake_all(int* addr) {
#if defined(__linux__)
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void) addr;
#endif
}

/* every thread's writes before the call are seen by every thread after it (release/acquire) */
static inline void lf_barrier_wait(lf_barrier* b, int n_threads) {
    if (n_threads <= 1)
        return;
    int gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == n_threads) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        /* seq_cst with the sleepers' increment: either a sleeper sees the new generation before
           it sleeps (the futex call returns at once) or this thread sees the sleeper */
        __atomic_store_n(&b->generation, gen + 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&b->sleepers, __ATOMIC_SEQ_CST) > 0)
            lf_wake_all(&b->generation);
        return;
    }
    long start = lf_ticks_now();
    for (long polls = 0; __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen; polls++) {
        if ((polls & 63) != 63) {
            LF_PAUSE();
            continue;
        }
        long now = lf_ticks_now();
        if (now != 0 ? now - start < LF_SPIN_TICKS : polls < LF_SPIN_POLLS)
            continue;
        /* the partner is late (descheduled, most likely): give the core back until it arrives */
        __atomic_add_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&b->generation, __ATOMIC_SEQ_CST) == gen)
            lf_wait_passive(&b->generation, gen);
        __atomic_sub_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST);
        break;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
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
static inline long lf_team_unit_of(long hidden, long rank) {
    long n_panels = hidden / 32, team = lf_team_size();
    long per = (n_panels + team - 1) / team;
    return (rank * per < n_panels ? rank * per : n_panels) * 32;
}
static inline long lf_team_unit_begin(long hidden) {
    return lf_team_unit_of(hidden, lf_team_rank());
}
static inline long lf_team_unit_end(long hidden) {
    return lf_team_unit_of(hidden, lf_team_rank() + 1);
}

/* Split mode or one thread, by measurement. Split mode needs every thread of its team running
   at once on a core of its own: where that fails it is slower than one thread. Seen here (2-vCPU
   VM, (100,1,128,128)): for minutes at a time the same split calls took 0.41-0.47 ms instead of
   0.23, longer than one thread's 0.355, with the threads' barrier waits as short as in the good
   state (their work itself ran 1.8x slower: cores shared on the host), so the waits cannot tell.
   Instead each shape (a key from the caller) keeps the measured ticks per step of both ways and
   runs the faster; every LF_CHOICE_EXPLORE calls, a run of LF_CHOICE_RUN calls takes the other
   way, so that a change of the machine's state is seen. Only the last half of a run is measured:
   right after split calls, OpenMP's idle worker still spins for a while and slows a one-thread
   call on a shared core. Calls that follow a pause of the shape's calls (LF_CHOICE_IDLE_TICKS)
   are a regime of their own, with their own measurements and choice: their threads were asleep,
   and waking them costs what back-to-back calls never pay. Measured into one average, one slow
   call after a pause made split mode look slower for the next 128 back-to-back calls; left
   unmeasured (as before), calls spaced by pauses never saw that split mode cost them far more
   than one thread: (100,1,32,64) called every 5 ms on a 2-vCPU guest (Xeon family 6 model 207)
   ran 2.76 ms on two threads against 0.15 ms on one (each woken thread arrived at the step
   barriers later than its partner's spin, which then slept too, step after step). Only the
   speed depends on the choice: both ways give the same bits. Exploring costs its share of calls
   times how much slower the other way is: with 8 calls in 128, (100,1,128,128) on two shared cores ran 0.355 ms against
   one thread's 0.335 (split mode 1.8x slower there). So the calls between two runs are 512
   times the measured ratio of the slower way to the faster (at most LF_CHOICE_EXPLORE_MAX):
   about 1.6 % of the calls' time whatever the ratio, and a change noticed within a few hundred
   calls where the two ways are close. With a fixed 8 in 512, a core busy with another process
   made (100,1,32,64)'s exploring split calls 2.7 ms against one thread's 0.072 (37x), and the
   shape's mean 1.5x one thread's; after pauses (waking the threads) the ratio was 18x.
   The first choice rests on four measured calls of each way, and a moment of the machine's
   (the other vCPU busy for a few ms) can decide it: then the first run of the other way comes
   early, LF_CHOICE_CONFIRM calls in, before the spacing grows (AMD EPYC Zen 4, the bench's int8
   (100,16,128,128) on two threads ran its rounds on one thread at 1.5 ms where split mode took
   0.85-1.04). The later runs keep the spacing above, counted from that one.
   The table is shared by the callers' threads without locks: a lost update only costs a choice. */
#define LF_CHOICE_SLOTS 8
#define LF_CHOICE_CONFIRM 64           /* the call by which the first run of the other way ended */
#define LF_CHOICE_EXPLORE 512          /* calls between runs at a ratio of 1 */
#define LF_CHOICE_EXPLORE_MAX 32768
#define LF_CHOICE_RUN 8
#define LF_CHOICE_IDLE_TICKS (1L << 21)   /* about a millisecond at the cycle counter's rate */
typedef struct {
    long key;
    long calls[2];               /* per regime: [0] back-to-back calls, [1] calls after a pause */
    long next_run[2];            /* per regime: the call that starts the next exploring run */
    long ticks_per_step[2][2];   /* [regime][0: one thread, 1: split]; 0 = not measured yet */
    long last_tick;              /* when the shape's last call was chosen (or ended) */
} lf_choice;
static lf_choice lf_choices[LF_CHOICE_SLOTS];
static long lf_choice_next = 0;

/* the key of a shape's measurements (never 0); tag (0-7) tells calls of one shape apart that
   do different work (the forward with and without the training cache, the backward, float64) */
static inline long lf_split_key(long batch, long hidden, long input_size, long n_threads, long tag) {
    return ((((hidden * 65536 + input_size) * 16 + batch) * 256 + n_threads) * 8 + tag) * 2 + 1;
}

static inline lf_choice* lf_choice_find(long key) {
    for (int i = 0; i < LF_CHOICE_SLOTS; i++)
        if (__atomic_load_n(&lf_choices[i].key, __ATOMIC_RELAXED) == key)
            return &lf_choices[i];
    return NULL;
}

/* for a call of shape `key` (!= 0): bit 0 set to run it in split mode (else on one thread),
   bit 1 set to measure it (lf_split_record), bit 2 set when it follows a pause (its regime) */
static inline int lf_split_choose(long key) {
    lf_choice* c = lf_choice_find(key);
    if (c == NULL) {                          /* a new shape takes the oldest slot */
        long slot = __atomic_fetch_add(&lf_choice_next, 1, __ATOMIC_RELAXED) % LF_CHOICE_SLOTS;
        c = &lf_choices[slot];
        for (int r = 0; r < 2; r++) {
            __atomic_store_n(&c->ticks_per_step[r][0], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&c->ticks_per_step[r][1], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&c->calls[r], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&c->next_run[r], LF_CHOICE_CONFIRM - LF_CHOICE_RUN, __ATOMIC_RELAXED);
        }
        /* a shape's first call counts as back to back (no pause to measure from) */
        __atomic_store_n(&c->last_tick, lf_ticks(), __ATOMIC_RELAXED);
        __atomic_store_n(&c->key, key, __ATOMIC_RELAXED);
    }
    long now = lf_ticks();
    long gap = now - __atomic_exchange_n(&c->last_tick, now, __ATOMIC_RELAXED);
    int paused = gap >= LF_CHOICE_IDLE_TICKS;
    int tag = paused << 2;
    long calls = __atomic_fetch_add(&c->calls[paused], 1, __ATOMIC_RELAXED);
    long one = __atomic_load_n(&c->ticks_per_step[paused][0], __ATOMIC_RELAXED);
    long split = __atomic_load_n(&c->ticks_per_step[paused][1], __ATOMIC_RELAXED);
    /* waking the threads only adds to split mode's time: where back-to-back calls measured it
       slower, calls after a pause run on one thread without trying it (each try cost 2.7 ms
       against 0.07 on a busy core) */
    long one_b2b = __atomic_load_n(&c->ticks_per_step[0][0], __ATOMIC_RELAXED);
    long split_b2b = __atomic_load_n(&c->ticks_per_step[0][1], __ATOMIC_RELAXED);
    if (paused && one_b2b != 0 && split_b2b > one_b2b)
        return tag | 2;
    if (calls < 2 * LF_CHOICE_RUN)            /* first a run of each way, one thread first */
        return tag | (calls >= LF_CHOICE_RUN) | (calls % LF_CHOICE_RUN >= LF_CHOICE_RUN / 2 ? 2 : 0);
    if (split == 0 || one == 0)               /* no clock to measure with */
        return tag | 1 | 2;
    int best = split <= one;
    long run = __atomic_load_n(&c->next_run[paused], __ATOMIC_RELAXED);
    if (calls >= run + LF_CHOICE_RUN) {       /* the run is over: when the next one starts */
        long slow = best ? one : split, fast = best ? split : one;
        long spacing = LF_CHOICE_EXPLORE * slow / fast;   /* ticks a step: no overflow */
        run += spacing < LF_CHOICE_EXPLORE_MAX ? spacing : LF_CHOICE_EXPLORE_MAX;
        __atomic_store_n(&c->next_run[paused], run, __ATOMIC_RELAXED);
    }
    if (calls >= run && calls < run + LF_CHOICE_RUN)
        return tag | !best | (calls - run >= LF_CHOICE_RUN / 2 ? 2 : 0);
    return tag | best | 2;
}

/* the shape's call ended now: the next call's pause is counted from here, not from this call's
   start (for calls longer than LF_CHOICE_IDLE_TICKS, which would otherwise never be measured) */
static inline void lf_split_ended(long key) {
    lf_choice* c = lf_choice_find(key);
    if (c != NULL)
        __atomic_store_n(&c->last_tick, lf_ticks(), __ATOMIC_RELAXED);
}

/* A split call's budget, in ticks for its first s steps: LF_SPLIT_ABORT times one thread's
   measured ticks per step in the call's regime, times s + LF_SPLIT_ABORT_LAG (the threads'
   waking). Past it the call finishes on one thread (same bits) and is measured whether or not it
   was to be, its whole time over all its steps: an exploring split call on a busy core cost 2.7
   ms where one thread took 0.07, and each change of the machine's state paid a run of 8 of them
   before the choice followed. (Until 2026-12-07 it recorded split mode's pace over the steps run
   split only: one call stopped after its first step, its threads' start in it, put split mode at
   150 times its pace, out of the choice for thousands of calls.) */
#define LF_SPLIT_ABORT 2
#define LF_SPLIT_ABORT_LAG 16
static inline long lf_split_budget(long key, int choice) {
    lf_choice* c = lf_choice_find(key);
    if (c == NULL || !(choice & 1))
        return 0;
    return LF_SPLIT_ABORT * __atomic_load_n(&c->ticks_per_step[(choice >> 2) & 1][0], __ATOMIC_RELAXED);
}

/* The start of a split call. libgomp wakes a sleeping worker in tens of microseconds, and a
   guest whose idle vCPU halted can take 150 us (AMD EPYC Zen 4 guest, 2026-12-07: (100,1,128,128)
   on two threads, split calls 0.33 ms against 0.31 on one thread, while 1000 steps took 1.9 us
   a step split against 3.2 alone). So the first thread does not wait for the others: it runs
   the steps alone, every unit, until all of them have arrived (lf_team_arrive), then opens the
   team at the next step (lf_team_open; release: its states so far are seen by the threads that
   read the step, lf_team_wait_open, acquire). The same products and cells either way. */
static inline void lf_team_arrive(long* arrived) { __atomic_add_fetch(arrived, 1, __ATOMIC_RELEASE); }
static inline long lf_team_arrived(const long* arrived) { return __atomic_load_n(arrived, __ATOMIC_ACQUIRE); }
static inline void lf_team_open(long* join_at, long step) { __atomic_store_n(join_at, step, __ATOMIC_RELEASE); }
/* the step from which this thread shares the units: within one step of its arrival, unless the
   first thread lost its core (then this one yields it after LF_SPIN_TICKS) */
static inline long lf_team_wait_open(const long* join_at) {
    long step, start = lf_ticks_now();
    for (long polls = 0; (step = __atomic_load_n(join_at, __ATOMIC_ACQUIRE)) < 0; polls++) {
        LF_PAUSE();
        if ((polls & 63) == 63 && (start == 0 || lf_ticks_now() - start > LF_SPIN_TICKS))
            sched_yield();
    }
    return step;
}

/* shared loads and stores of a team's flag (a step to stop at), ordered by its barrier */
static inline long lf_load_long(const long* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void lf_store_long(long* p, long v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* a measured call (`choice` as lf_split_choose returned it: its way and regime) took `ticks`
   for `steps` steps: a moving average per regime and way, each call counted at most twice the
   average so far. A guest's vCPU taken away for a moment made one split call of
   (100,1,128,128) 6-10x its pace (AMD EPYC Zen 4, 2026-12-07); counted whole it lifted split
   mode's average past one thread's, and the next 300-1200 calls ran on one thread at 1.5x
   split mode's time. Clamped, a lasting slowdown still turns the choice within two or three
   calls (each at most twice one thread's time, by the budget). */
static inline void lf_split_record(long key, int choice, long ticks, long steps) {
    lf_choice* c = lf_choice_find(key);
    if (c == NULL || ticks <= 0)
        return;
    long* slot = &c->ticks_per_step[(choice >> 2) & 1][choice & 1];
    long now = ticks / (steps > 0 ? steps : 1) + 1;
    long old = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (old != 0 && now > 2 * old)
        now = 2 * old;
    __atomic_store_n(slot, old == 0 ? now : (7 * old + 3 * now) / 10, __ATOMIC_RELAXED);
}

#endif
