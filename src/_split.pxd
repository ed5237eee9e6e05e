# Team helpers of the split recurrence (lf_split.h: see there for why a spin barrier).
cdef extern from "lf_split.h" nogil:
    ctypedef struct lf_barrier:
        int arrived
    int lf_team_size()
    int lf_team_rank()
    void lf_barrier_init(lf_barrier* b)
    void lf_barrier_wait(lf_barrier* b, int n_threads)
    long lf_ticks()
    int lf_split_allowed()
    void lf_split_report(long work_ticks, long wait_ticks)
    void lf_add_long(long* target, long value)
