# Fused float/double wrappers over scipy.linalg.cython_blas, for row-major (C-order) operands.
# BLAS is column-major: a row-major (m, n) matrix is a column-major (n, m) one, so each wrapper
# swaps operands instead of copying. Callers keep every dimension below 2**31 (BLAS takes int).
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv


cdef inline void gemm_rm(char transb, int m, int n, int k, floating alpha,
                         const floating* a, int lda, const floating* b, int ldb,
                         floating beta, floating* c, int ldc) noexcept nogil:
    # row-major C(m, n) = alpha * A(m, k) @ op(B) + beta * C, with op(B) = B.T when transb == 'T'
    # (B stored (n, k)) or B when 'N' (B stored (k, n)); as column-major: C.T = op(B).T @ A.T
    cdef char nt = b'N'
    if floating is float:
        sgemm(&transb, &nt, &n, &m, &k, &alpha, <float*> b, &ldb, <float*> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&transb, &nt, &n, &m, &k, &alpha, <double*> b, &ldb, <double*> a, &lda, &beta, c, &ldc)


cdef inline void gemm_rm_tn(int m, int n, int k, floating alpha,
                            const floating* a, int lda, const floating* b, int ldb,
                            floating beta, floating* c, int ldc) noexcept nogil:
    # row-major C(m, n) = alpha * A.T @ B + beta * C, with A stored (k, m) and B stored (k, n):
    # the weight-gradient shape (sum over time and batch rows)
    cdef char nt = b'N'
    cdef char tt = b'T'
    if floating is float:
        sgemm(&nt, &tt, &n, &m, &k, &alpha, <float*> b, &ldb, <float*> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&nt, &tt, &n, &m, &k, &alpha, <double*> b, &ldb, <double*> a, &lda, &beta, c, &ldc)


cdef inline void gemv_rm(char trans, int rows, int cols, floating alpha,
                         const floating* a, int lda, const floating* x,
                         floating beta, floating* y) noexcept nogil:
    # row-major A(rows, cols): y = alpha * A @ x + beta * y when trans == 'N', A.T @ x when 'T'.
    # The row-major A is the column-major A.T, so the BLAS transpose flag flips.
    cdef char tb = b'T' if trans == c'N' else c'N'
    cdef int one = 1
    if floating is float:
        sgemv(&tb, &cols, &rows, &alpha, <float*> a, &lda, <float*> x, &one, &beta, y, &one)
    else:
        dgemv(&tb, &cols, &rows, &alpha, <double*> a, &lda, <double*> x, &one, &beta, y, &one)
