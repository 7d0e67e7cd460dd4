/* A stand-in for cuBLAS's C library with its real prototypes (cublas_api.h, CUDA 12), for
 * tests/test_gpu_products.py: loaded by ctypes, it checks what scratchnn.kernels.products passes
 * through ctypes as the real library would receive it. Its "device" memory is the host's
 * (the tests' stand-in CuPy keeps its arrays there). The products are computed plainly,
 * column-major, as cuBLAS defines them. Statuses: 0 success, 1 not initialised,
 * 7 invalid value. */
#include <stddef.h>
#include <stdlib.h>

typedef struct {
    void *stream;
    void *workspace;
    size_t workspace_bytes;
    int math_mode;
    int products;
} stub_handle;

int cublasCreate_v2(stub_handle **handle) {
    if (handle == NULL) return 7;
    *handle = calloc(1, sizeof(stub_handle));
    return *handle == NULL ? 1 : 0;
}

int cublasSetStream_v2(stub_handle *handle, void *stream) {
    if (handle == NULL) return 1;
    handle->stream = stream;
    handle->workspace = NULL; /* as cuBLAS: the default workspace again */
    handle->workspace_bytes = 0;
    return 0;
}

int cublasSetWorkspace_v2(stub_handle *handle, void *workspace, size_t bytes) {
    if (handle == NULL) return 1;
    /* (cuBLAS wants 256-byte alignment; CuPy's blocks are 512-byte aligned, the tests'
     * stand-in's NumPy arrays need not be) */
    if (workspace == NULL || bytes == 0) return 7;
    handle->workspace = workspace;
    handle->workspace_bytes = bytes;
    return 0;
}

int cublasSetMathMode(stub_handle *handle, int mode) {
    if (handle == NULL) return 1;
    if (mode != 0 && mode != 3) return 7;
    handle->math_mode = mode;
    return 0;
}

/* What the tests read back: the stream, the workspace's size, the math mode, the count. */
void *stub_stream(stub_handle *handle) { return handle->stream; }
size_t stub_workspace_bytes(stub_handle *handle) { return handle->workspace_bytes; }
int stub_math_mode(stub_handle *handle) { return handle->math_mode; }
int stub_products(stub_handle *handle) { return handle->products; }

#define GEMM(NAME, T)                                                                        \
    int NAME(stub_handle *handle, int transa, int transb, int m, int n, int k,               \
             const T *alpha, const T *A, int lda, const T *B, int ldb, const T *beta, T *C,  \
             int ldc) {                                                                      \
        if (handle == NULL) return 1;                                                        \
        if (handle->workspace == NULL) return 7; /* scratchnn always sets its own */         \
        if ((transa != 0 && transa != 1) || (transb != 0 && transb != 1)) return 7;         \
        if (m < 0 || n < 0 || k < 0) return 7;                                               \
        if (lda < (transa ? k : m) || lda < 1) return 7;                                     \
        if (ldb < (transb ? n : k) || ldb < 1) return 7;                                     \
        if (ldc < m || ldc < 1) return 7;                                                    \
        for (int j = 0; j < n; j++) {                                                        \
            for (int i = 0; i < m; i++) {                                                    \
                double sum = 0.0;                                                            \
                for (int p = 0; p < k; p++) {                                                \
                    double a = transa ? A[p + (size_t)i * lda] : A[i + (size_t)p * lda];     \
                    double b = transb ? B[j + (size_t)p * ldb] : B[p + (size_t)j * ldb];     \
                    sum += a * b;                                                            \
                }                                                                            \
                T *c = &C[i + (size_t)j * ldc];                                              \
                *c = (T)(*alpha * sum + (*beta == 0 ? 0 : *beta * *c));                      \
            }                                                                                \
        }                                                                                    \
        handle->products++;                                                                  \
        return 0;                                                                            \
    }

GEMM(cublasSgemm_v2, float)
GEMM(cublasDgemm_v2, double)
