/*
 * Softmax by rows, for Softmax and SoftmaxWithLoss (layers/activations.py,
 * layers/losses.py): kernels that run() calls with whole rows. Like the
 * element-wise kernels (elementwise.c), every exp of a row goes through the
 * same vector code, the last partial chunk through a padded copy.
 */
#include "ckernels.h"

#include <string.h>

/* Softmax along rows of `p` elements (the last axis): the kernel gets whole rows.
 * y = exp(x - max) / sum(exp(x - max)), the sum over the row, and where out2 is
 * given, log y = (x - max) - log(sum) into it (SoftmaxWithLoss's cross-entropy,
 * finite where y underflows); backward from the kept output y:
 * dx = y (dout - sum(dout y)). Every lane of a NaN or +inf row comes out NaN,
 * as on the NumPy path (its max, then x - max, is NaN there). */
#define ROWS(T, F, SUFFIX)                                                                \
    CLONES static void softmax_rows_##SUFFIX(KERNEL_ARGS) {                               \
        (void)vg, (void)vh, (void)vm_in, (void)vout3, (void)vm_out;                       \
        const T *x = vx;                                                                  \
        T *out = vout, *log_y = vout2;                                                    \
        ptrdiff_t cols = (ptrdiff_t)params[0];                                            \
        for (ptrdiff_t r = 0; r < n; r += cols) {                                         \
            const T *restrict xr = x + r;                                                 \
            T *restrict yr = out + r;                                                     \
            T m = xr[0], sum = 0;                                                         \
            _Pragma("omp simd reduction(max:m)") for (ptrdiff_t j = 0; j < cols; j++)     \
                m = xr[j] > m ? xr[j] : m;                                                \
            /* The last partial chunk goes through a padded copy (its padding left \
             * out of the sum): a scalar remainder loop would call libm's slow      \
             * scalar exp, most of the time for short rows (10 classes). */         \
            ptrdiff_t full = cols / CHUNK * CHUNK;                                        \
            _Pragma("omp simd reduction(+:sum)") for (ptrdiff_t j = 0; j < full; j++) {   \
                yr[j] = MATH(exp, F)(xr[j] - m);                                          \
                sum += yr[j];                                                             \
            }                                                                             \
            if (full < cols) {                                                            \
                int len = (int)(cols - full);                                             \
                T shifted[CHUNK], e[CHUNK];                                               \
                for (int j = 0; j < CHUNK; j++) shifted[j] = m; /* exp(m - m) = 1: fast */ \
                memcpy(shifted, xr + full, len * sizeof(T));                              \
                _Pragma("omp simd reduction(+:sum)") for (int j = 0; j < CHUNK; j++) {    \
                    e[j] = MATH(exp, F)(shifted[j] - m);                                  \
                    sum += j < len ? e[j] : (T)0;                                         \
                }                                                                         \
                memcpy(yr + full, e, len * sizeof(T));                                    \
            }                                                                             \
            _Pragma("omp simd") for (ptrdiff_t j = 0; j < cols; j++) yr[j] = yr[j] / sum; \
            if (log_y == NULL) continue;                                                  \
            T log_sum = MATH(log, F)(sum);                                                \
            T *restrict lr = log_y + r;                                                   \
            _Pragma("omp simd") for (ptrdiff_t j = 0; j < cols; j++)                      \
                lr[j] = (xr[j] - m) - log_sum;                                            \
        }                                                                                 \
    }                                                                                     \
    CLONES static void softmax_rows_grad_##SUFFIX(KERNEL_ARGS) {                          \
        (void)vh, (void)vm_in, (void)vout2, (void)vout3, (void)vm_out;                    \
        const T *y = vx, *g = vg;                                                         \
        T *out = vout;                                                                    \
        ptrdiff_t cols = (ptrdiff_t)params[0];                                            \
        for (ptrdiff_t r = 0; r < n; r += cols) {                                         \
            const T *restrict yr = y + r, *restrict gr = g + r;                           \
            T *restrict dr = out + r;                                                     \
            T dot = 0;                                                                    \
            _Pragma("omp simd reduction(+:dot)") for (ptrdiff_t j = 0; j < cols; j++)     \
                dot += gr[j] * yr[j];                                                     \
            _Pragma("omp simd") for (ptrdiff_t j = 0; j < cols; j++)                      \
                dr[j] = yr[j] * (gr[j] - dot);                                            \
        }                                                                                 \
    }                                                                                     \
    /* The kernels that run() calls. (Cloned functions stay in this file: gcc exports */  \
    /* the symbol that picks a clone, whatever -fvisibility says.) */                     \
    void softmax_##SUFFIX(KERNEL_ARGS) {                                                  \
        softmax_rows_##SUFFIX(vx, vg, vh, vm_in, vout, vout2, vout3, vm_out, params, n);  \
    }                                                                                     \
    void softmax_grad_##SUFFIX(KERNEL_ARGS) {                                             \
        softmax_rows_grad_##SUFFIX(vx, vg, vh, vm_in, vout, vout2, vout3, vm_out, params, n); \
    }
ROWS(float, f, f32)
ROWS(double, , f64)

