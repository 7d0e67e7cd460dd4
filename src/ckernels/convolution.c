/*
 * Convolution: im2col and col2im, for Conv2d (layers/convolution.py).
 *
 * dims = (N, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW). im2col fills col, of
 * shape (C, kh, kw, N, OH, OW), from x (N, C, H, W), reading zeros outside the
 * image (the padding) without a padded copy; one block per row (c, p, q) of
 * col. col2im sums dcol, of col's shape, back into dx (N, C, H, W): one block
 * per channel c, whose N planes stay in cache while its kh kw rows of dcol
 * stream by, the kernel offsets added in the NumPy path's order (p, then q,
 * onto zeros), so the sums are bit for bit the same.
 */
#include "ckernels.h"

#include <string.h>

#define CONV(T, SUFFIX)                                                                   \
    static void im2col_block_##SUFFIX(const struct job *j, ptrdiff_t b) {                 \
        const ptrdiff_t *d = j->dims;                                                     \
        ptrdiff_t N = d[0], C = d[1], H = d[2], W = d[3], kh = d[4], kw = d[5];           \
        ptrdiff_t sh = d[6], sw = d[7], ph = d[8], pw = d[9], OH = d[10], OW = d[11];     \
        ptrdiff_t c = b / (kh * kw), p = b / kw % kh, q = b % kw;                         \
        const T *x = (const T *)j->x;                                                     \
        T *dst = (T *)j->out + b * N * OH * OW;                                           \
        /* the columns j whose x = j sw + q - pw lies in [0, W) */                        \
        ptrdiff_t j0 = pw - q > 0 ? (pw - q + sw - 1) / sw : 0;                           \
        ptrdiff_t j1 = W + pw - q > 0 ? (W + pw - q + sw - 1) / sw : 0;                   \
        j1 = j1 < OW ? j1 : OW, j0 = j0 < j1 ? j0 : j1;                                   \
        if (sh == 1 && sw == 1 && OW == W) {                                              \
            /* The usual "same" convolution: col's plane is x's plane shifted by */       \
            /* (p - ph) rows and (q - pw) columns, one contiguous copy; then zeros */     \
            /* over the rows and columns that fall outside the image. */                  \
            ptrdiff_t i0 = ph - p > 0 ? ph - p : 0, i1 = H + ph - p;                       \
            i1 = i1 < OH ? i1 : OH, i0 = i0 < i1 ? i0 : i1;                                \
            /* No row or no column inside the image: all zeros, and nothing is read */    \
            /* (j0 clamped to j1 is then no column of x, and first + shift may lie */     \
            /* outside the plane). */                                                     \
            int inside = i1 > i0 && j1 > j0;                                              \
            ptrdiff_t first = inside ? i0 * OW + j0 : 0;                                  \
            ptrdiff_t last = inside ? (i1 - 1) * OW + j1 : 0;                             \
            ptrdiff_t shift = (p - ph) * W + q - pw;                                       \
            for (ptrdiff_t n = 0; n < N; n++, dst += OH * OW) {                           \
                const T *plane = x + (n * C + c) * H * W;                                 \
                memset(dst, 0, first * sizeof(T));                                        \
                if (last > first) memcpy(dst + first, plane + first + shift,               \
                                         (last - first) * sizeof(T));                     \
                memset(dst + last, 0, (OH * OW - last) * sizeof(T));                      \
                for (ptrdiff_t i = i0; i < i1; i++) {                                     \
                    for (ptrdiff_t jj = 0; jj < j0; jj++) dst[i * OW + jj] = 0;           \
                    for (ptrdiff_t jj = j1; jj < OW; jj++) dst[i * OW + jj] = 0;          \
                }                                                                         \
            }                                                                             \
            return;                                                                       \
        }                                                                                 \
        for (ptrdiff_t n = 0; n < N; n++) {                                               \
            const T *plane = x + (n * C + c) * H * W;                                     \
            for (ptrdiff_t i = 0; i < OH; i++, dst += OW) {                               \
                ptrdiff_t y = i * sh + p - ph;                                            \
                if (y < 0 || y >= H) {                                                    \
                    memset(dst, 0, OW * sizeof(T));                                       \
                    continue;                                                             \
                }                                                                         \
                const T *src = plane + y * W;                                             \
                for (ptrdiff_t jj = 0; jj < j0; jj++) dst[jj] = 0;                        \
                /* rows are short (OW): a loop, not a memcpy call per row */              \
                if (sw == 1)                                                              \
                    for (ptrdiff_t jj = j0; jj < j1; jj++) dst[jj] = src[jj + q - pw];    \
                else                                                                      \
                    for (ptrdiff_t jj = j0; jj < j1; jj++) dst[jj] = src[jj * sw + q - pw]; \
                for (ptrdiff_t jj = j1; jj < OW; jj++) dst[jj] = 0;                       \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    static void col2im_block_##SUFFIX(const struct job *j, ptrdiff_t c) {                 \
        const ptrdiff_t *d = j->dims;                                                     \
        ptrdiff_t N = d[0], C = d[1], H = d[2], W = d[3], kh = d[4], kw = d[5];           \
        ptrdiff_t sh = d[6], sw = d[7], ph = d[8], pw = d[9], OH = d[10], OW = d[11];     \
        const T *dcol = (const T *)j->x;                                                  \
        T *dx = (T *)j->out;                                                              \
        for (ptrdiff_t n = 0; n < N; n++)                                                 \
            memset(dx + (n * C + c) * H * W, 0, H * W * sizeof(T));                       \
        /* Channel c's planes (N of them, in cache) take its kh kw rows of dcol, each  */  \
        /* read once from start to end. */                                               \
        for (ptrdiff_t p = 0; p < kh; p++)                                                \
            for (ptrdiff_t q = 0; q < kw; q++) {                                          \
                const T *src = dcol + ((c * kh + p) * kw + q) * N * OH * OW;              \
                ptrdiff_t j0 = pw - q > 0 ? (pw - q + sw - 1) / sw : 0;                   \
                ptrdiff_t j1 = W + pw - q > 0 ? (W + pw - q + sw - 1) / sw : 0;           \
                j1 = j1 < OW ? j1 : OW;                                                   \
                for (ptrdiff_t n = 0; n < N; n++) {                                       \
                    T *plane = dx + (n * C + c) * H * W;                                  \
                    for (ptrdiff_t i = 0; i < OH; i++) {                                  \
                        ptrdiff_t y = i * sh + p - ph;                                    \
                        if (y < 0 || y >= H) continue;                                    \
                        T *row = plane + y * W;                                           \
                        const T *from = src + (n * OH + i) * OW;                          \
                        if (sw == 1)                                                      \
                            for (ptrdiff_t jj = j0; jj < j1; jj++) row[jj + q - pw] += from[jj]; \
                        else                                                              \
                            for (ptrdiff_t jj = j0; jj < j1; jj++)                        \
                                row[jj * sw + q - pw] += from[jj];                        \
                    }                                                                     \
                }                                                                         \
            }                                                                             \
    }
CONV(float, f32)
CONV(double, f64)

/* conv(which, src, dst, dims, threads) -> bool: im2col (which = 0, src x, dst col)
 * or col2im (which = 1, src dcol, dst dx) over C-contiguous float32 or float64
 * buffers of one format and the sizes dims implies; False, touching nothing,
 * when they are not. */
PyObject *conv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long which;
    Py_ssize_t threads;
    struct job j = {0};
    if (!read_call(args, nargs, 5, 3, 12, "conv(which, src, dst, dims (12 ints), threads)",
                   &which, &threads, &j))
        return NULL;
    const ptrdiff_t *d = j.dims;
    for (int k = 0; k < 12; k++)
        if (d[k] < (k >= 6 && k < 8 ? 1 : 0)) return PyBool_FromLong(0);  /* strides >= 1 */
    ptrdiff_t image = d[0] * d[1] * d[2] * d[3];
    ptrdiff_t columns = d[1] * d[4] * d[5] * d[0] * d[10] * d[11];
    Py_buffer src = {0}, dst = {0};
    int fits = take(args[1], &src, 0, NULL, -1) && src.obj != NULL
               && (strcmp(src.format, "f") == 0 || strcmp(src.format, "d") == 0)
               && take(args[2], &dst, 1, src.format, (which ? image : columns) * src.itemsize)
               && dst.obj != NULL && src.len == (which ? columns : image) * src.itemsize;
    if (fits) {
        int f32 = src.itemsize == 4;
        j.task = which ? (f32 ? col2im_block_f32 : col2im_block_f64)
                       : (f32 ? im2col_block_f32 : im2col_block_f64);
        j.x = src.buf, j.out = dst.buf;
        j.blocks = which ? d[1] : d[1] * d[4] * d[5];
        run_tasks(&j, threads);
    }
    release((Py_buffer *[]){&src, &dst}, 2);
    return PyBool_FromLong(fits);
}

