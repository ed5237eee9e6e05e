# Team helpers of the split recurrence (lf_split.h: see there for why a spin barrier).
cdef extern from "lf_split.h" nogil:
    ctypedef struct lf_barrier:
        int arrived
    int lf_team_size()
    void lf_barrier_init(lf_barrier* b)
    long lf_ticks()
    long lf_team_unit_begin(long hidden)
    long lf_team_unit_end(long hidden)
    void lf_barrier_wait(lf_barrier* b, int n_threads)
    int lf_split_choose(long key)
    void lf_split_record(long key, int choice, long ticks, long steps)
    void lf_split_ended(long key)
    long lf_split_budget(long key, int choice)
    long lf_load_long(const long* p)
    void lf_team_arrive(long* arrived)
    long lf_team_arrived(const long* arrived)
    void lf_team_open(long* join_at, long step)
    long lf_team_wait_open(const long* join_at)
    void lf_store_long(long* p, long v)
    int lf_team_rank()
    enum: LF_SPLIT_ABORT_LAG
    long lf_split_key(long batch, long hidden, long input_size, long n_threads, long tag)
