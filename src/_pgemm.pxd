# The packed-panel float32 GEMM of lf_pgemm.h (see there for the layout and why).
cdef extern from "lf_pgemm.h" nogil:
    void lf_prefetch(const void* p, size_t bytes)
    void* lf_malloc64(size_t bytes)
    size_t lf_pack_len(size_t n, size_t k)
    void* lf_ws_get(int slot, size_t bytes)
    void lf_ws_release(int slot, void* p)
    size_t lf_ws_max()
    float* lf_ws_aligned(int slot, size_t n_floats, void** raw)
    void lf_pack_w(const float* w, size_t ldw, size_t n, size_t k, float* packed)
    void lf_pack_w_for(const float* w, size_t ldw, size_t n, size_t k, float* packed, int shared)
    void lf_pack_wt(const float* wt, size_t ldw, size_t n, size_t k, float* packed)
    void lf_pack_wt_for(const float* wt, size_t ldw, size_t n, size_t k, float* packed, int shared)
    int lf_pgemm_available()
    int lf_isa()
    int lf_set_kernel(int isa, int mr, size_t kc, size_t kc_narrow)
    void lf_pgemm(size_t m, size_t col0, size_t n_cols, size_t k, const float* a, size_t lda,
                  const float* packed, float* c, size_t ldc, int accumulate)
    void lf_pgemm_at(size_t m, size_t n, size_t k, const float* at, size_t ldat,
                     const float* packed, float* c, size_t ldc)
    void lf_pgemm_at2(size_t m, size_t k, const float* at, size_t ldat, size_t n1,
                      const float* b1, size_t ldb1, float* c1, size_t ldc1, size_t n2,
                      const float* b2, size_t ldb2, float* c2, size_t ldc2, float* colsum)
    void lf_pgemv_gates(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                        const float* packed, float* c, int backwards)
    void lf_pgemv_dir(size_t col0, size_t n_cols, size_t k, const float* a, const float* packed,
                      float* c, int backwards)
    void lf_pgemv(size_t col0, size_t n_cols, size_t k, const float* a, const float* packed,
                  float* c)
    void lf_pgemv_gates_tiles(size_t hidden, size_t u0, size_t u1, size_t k, const float* a,
                              const float* packed, float* c, int backwards, size_t tk,
                              const float* ta, size_t tlda, const float* t_packed, size_t tv0,
                              size_t tv1, float* tc, size_t tldc, size_t tile_from, size_t tk0,
                              size_t tk1)
    void lf_gemv_rows(size_t n, size_t k, const float* w, size_t ldw, const float* x, size_t ldx,
                      size_t nx, float* y, size_t ldy)
