# Team helpers of the split recurrence (lf_split.h: see there for why a spin barrier).
cdef extern from "lf_split.h" nogil:
    ctypedef struct lf_barrier:
        int arrived
    int lf_team_size()
    void lf_barrier_init(lf_barrier* b)
    long lf_ticks()
    long lf_team_unit_begin(long hidden)
    long lf_team_unit_end(long hidden)
    long lf_barrier_wait_timed(lf_barrier* b, int n_threads, long wait)
    void lf_split_account(long* totals, long start, long wait)
    int lf_split_allowed()
    void lf_split_report(long work_ticks, long wait_ticks)
