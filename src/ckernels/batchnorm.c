/*
 * BatchNorm in training mode over NCHW images, for layers/normalization.py.
 *
 * dims = (N, C, HW). Every pass streams the images in memory order, one block
 * per image n (a channel at a time would jump 25 KB between its planes):
 * per-image, per-channel sums in double go to `partial` (N x C, or N x 2C),
 * and are combined over the images in order 0..N-1, so one or two threads
 * give the same results. stats is (C, 5) of the images' type. Forward reads
 * gamma and beta (stats[c][0..1]), finds the mean and the biased variance
 * (stats[c][2..3]) and inv_std = 1 / sqrt(var + eps) (stats[c][4]), then
 * writes xhat = (x - mean) inv_std and out = xhat gamma + beta. Backward reads
 * gamma and inv_std, writes sum(dout) and sum(dout xhat) into stats[c][2..3]
 * (dbeta, dgamma) and dx = ((dout - xhat sum(dout xhat) / m) - sum(dout) / m)
 * gamma inv_std. The element-wise steps are the NumPy path's, in its order;
 * its sums are float pairwise sums, these double ones.
 */
#include "ckernels.h"

#include <stdlib.h>

#define BATCHNORM(T, F, SUFFIX)                                                           \
    /* dims[3]: 0 for each channel's sum of x, 1 for its sum of (x - mean)^2 */           \
    CLONES static void batchnorm_sums_##SUFFIX(const struct job *j, ptrdiff_t n) {        \
        ptrdiff_t C = j->dims[1], HW = j->dims[2];                                        \
        const T *x = (const T *)j->x + n * C * HW, *stats = (const T *)j->out3;           \
        double *partial = (double *)(void *)j->m_out + n * C;                             \
        for (ptrdiff_t c = 0; c < C; c++) {                                               \
            const T *p = x + c * HW;                                                      \
            double total = 0;                                                             \
            if (j->dims[3] == 0) {                                                        \
                _Pragma("omp simd reduction(+:total)") for (ptrdiff_t k = 0; k < HW; k++) \
                    total += (double)p[k];                                                \
            } else {                                                                      \
                double mean = (double)stats[5 * c + 2];                                   \
                _Pragma("omp simd reduction(+:total)") for (ptrdiff_t k = 0; k < HW; k++) { \
                    double centred = (double)p[k] - mean;                                 \
                    total += centred * centred;                                           \
                }                                                                         \
            }                                                                             \
            partial[c] = total;                                                           \
        }                                                                                 \
    }                                                                                     \
    CLONES static void batchnorm_apply_##SUFFIX(const struct job *j, ptrdiff_t n) {       \
        ptrdiff_t C = j->dims[1], HW = j->dims[2];                                        \
        const T *x = (const T *)j->x + n * C * HW, *stats = (const T *)j->out3;           \
        T *xhat = (T *)j->out2 + n * C * HW, *out = (T *)j->out + n * C * HW;             \
        for (ptrdiff_t c = 0; c < C; c++) {                                               \
            const T *st = stats + 5 * c;                                                  \
            T gamma = st[0], beta = st[1], mean = st[2], inv_std = st[4];                 \
            _Pragma("omp simd") for (ptrdiff_t k = c * HW; k < (c + 1) * HW; k++) {       \
                T xh = (x[k] - mean) * inv_std;                                           \
                xhat[k] = xh;                                                             \
                out[k] = xh * gamma + beta;                                               \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    CLONES static void batchnorm_grad_sums_##SUFFIX(const struct job *j, ptrdiff_t n) {   \
        ptrdiff_t C = j->dims[1], HW = j->dims[2];                                        \
        const T *g = (const T *)j->x + n * C * HW, *xhat = (const T *)j->h + n * C * HW;  \
        double *partial = (double *)(void *)j->m_out + 2 * n * C;                         \
        for (ptrdiff_t c = 0; c < C; c++) {                                               \
            double sum_g = 0, sum_gx = 0;                                                 \
            _Pragma("omp simd reduction(+:sum_g, sum_gx)")                                \
            for (ptrdiff_t k = c * HW; k < (c + 1) * HW; k++) {                           \
                sum_g += (double)g[k];                                                    \
                sum_gx += (double)g[k] * (double)xhat[k];                                 \
            }                                                                             \
            partial[2 * c] = sum_g, partial[2 * c + 1] = sum_gx;                          \
        }                                                                                 \
    }                                                                                     \
    CLONES static void batchnorm_grad_apply_##SUFFIX(const struct job *j, ptrdiff_t n) {  \
        ptrdiff_t C = j->dims[1], HW = j->dims[2], m = j->dims[0] * HW;                   \
        const T *g = (const T *)j->x + n * C * HW, *xhat = (const T *)j->h + n * C * HW;  \
        const T *stats = (const T *)j->out3;                                              \
        T *dx = (T *)j->out + n * C * HW;                                                 \
        for (ptrdiff_t c = 0; c < C; c++) {                                               \
            const T *st = stats + 5 * c;                                                  \
            T a = st[3] / (T)m, b = st[2] / (T)m, scale = st[0] * st[4];                  \
            _Pragma("omp simd") for (ptrdiff_t k = c * HW; k < (c + 1) * HW; k++)         \
                dx[k] = ((g[k] - xhat[k] * a) - b) * scale;                               \
        }                                                                                 \
    }                                                                                     \
    /* The passes and, between them, the per-channel totals over the images. */          \
    static void batchnorm_##SUFFIX(struct job *j, int backward, Py_ssize_t threads) {     \
        ptrdiff_t N = j->dims[0], C = j->dims[1], m = N * j->dims[2];                     \
        T *stats = (T *)j->out3;                                                          \
        const double *partial = (const double *)(void *)j->m_out;                         \
        j->blocks = N;                                                                    \
        if (backward) {                                                                   \
            j->task = batchnorm_grad_sums_##SUFFIX;                                       \
            run_tasks(j, threads);                                                        \
            for (ptrdiff_t c = 0; c < C; c++) {                                           \
                double sum_g = 0, sum_gx = 0;                                             \
                for (ptrdiff_t n = 0; n < N; n++)                                         \
                    sum_g += partial[2 * (n * C + c)], sum_gx += partial[2 * (n * C + c) + 1]; \
                stats[5 * c + 2] = (T)sum_g, stats[5 * c + 3] = (T)sum_gx;                \
            }                                                                             \
            j->task = batchnorm_grad_apply_##SUFFIX;                                      \
            run_tasks(j, threads);                                                        \
            return;                                                                       \
        }                                                                                 \
        j->task = batchnorm_sums_##SUFFIX;                                                \
        for (int phase = 0; phase < 2; phase++) {                                         \
            j->dims[3] = phase;                                                           \
            run_tasks(j, threads);                                                        \
            for (ptrdiff_t c = 0; c < C; c++) {                                           \
                double total = 0;                                                         \
                for (ptrdiff_t n = 0; n < N; n++) total += partial[n * C + c];            \
                T value = (T)(total / (double)m);                                         \
                if (phase == 0) {                                                         \
                    stats[5 * c + 2] = value; /* the mean */                              \
                } else {                                                                  \
                    stats[5 * c + 3] = value; /* the biased variance */                   \
                    stats[5 * c + 4] = (T)1 / MATH(sqrt, F)(value + (T)j->params[0]);     \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        j->task = batchnorm_apply_##SUFFIX;                                               \
        run_tasks(j, threads);                                                            \
    }

BATCHNORM(float, f, f32)
BATCHNORM(double, , f64)

/* batchnorm(which, src, xhat, dst, stats, dims, eps, threads) -> bool: BatchNorm's
 * training forward (which = 0: src x, xhat and dst out written) or backward (1:
 * src dout, xhat read, dst dx), over C-contiguous float32 or float64 buffers of
 * one format: images of N C HW values, stats of C 5; False, touching nothing,
 * when they are not. */
PyObject *batchnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long which;
    Py_ssize_t threads;
    struct job j = {0};
    if (!read_call(args, nargs, 8, 5, 3,
                   "batchnorm(which, src, xhat, dst, stats, dims (3 ints), eps, threads)",
                   &which, &threads, &j))
        return NULL;
    double eps = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    ptrdiff_t N = j.dims[0], C = j.dims[1], HW = j.dims[2];
    if (N < 1 || C < 1 || HW < 1 || N * HW < 2) return PyBool_FromLong(0);
    double *partial = malloc((size_t)(2 * N * C) * sizeof(double));
    if (partial == NULL) return PyErr_NoMemory();
    Py_buffer src = {0}, xhat = {0}, dst = {0}, stats = {0};
    int fits = take(args[1], &src, 0, NULL, -1) && src.obj != NULL
               && (strcmp(src.format, "f") == 0 || strcmp(src.format, "d") == 0)
               && src.len == N * C * HW * src.itemsize
               && take(args[2], &xhat, !which, src.format, src.len) && xhat.obj != NULL
               && take(args[3], &dst, 1, src.format, src.len) && dst.obj != NULL
               && take(args[4], &stats, 1, src.format, 5 * C * src.itemsize) && stats.obj != NULL;
    if (fits) {
        j.x = src.buf, j.out = dst.buf, j.out3 = stats.buf, j.m_out = (char *)partial;
        if (which) j.h = xhat.buf; else j.out2 = xhat.buf;
        j.params[0] = eps;
        if (src.itemsize == 4) batchnorm_f32(&j, (int)which, threads);
        else batchnorm_f64(&j, (int)which, threads);
    }
    free(partial);
    release((Py_buffer *[]){&src, &xhat, &dst, &stats}, 4);
    return PyBool_FromLong(fits);
}

