/*
 * Max pooling over disjoint windows without padding, for MaxPool2d (layers/pooling.py).
 *
 * dims = (N, C, H, W, kh, kw, sh, sw, OH, OW), strides at least the kernel, so a
 * pixel lies in at most one window. One block per plane (n, c). Forward: the
 * maximum as the NumPy path's chain of np.maximum takes it (m = m >= v or m is
 * NaN ? m : v: the first NaN propagates), and argmax, the offset p kw + q of the
 * first value equal to it (or of the first NaN): PyTorch's choice on ties.
 * Backward: each window's pixel at argmax gets dout and the others +0, as the NumPy
 * path writes them and PyTorch scatters dout (a selection, not dout times 0/1, which
 * would turn an infinite or NaN dout into NaN on the pixels that lost); pixels in no
 * window get 0.
 */
#include "ckernels.h"

#include <string.h>

#ifdef HAVE_AVX512
#include <immintrin.h>

/* The 2x2 max pooling of float planes on AVX-512 (what it computes: above; bit for
 * bit as the portable loop below): 16 windows at a time, each pair of rows loaded
 * as 32 pixels and split into even and odd columns by one permute each. */
static const int EVEN[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
static const int ODD[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
static const int LOW[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
static const int HIGH[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
static __mmask16 first_lanes(ptrdiff_t n) {
    return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}
__attribute__((target("avx512f"))) static void maxpool2x2_avx512_f32(
    const float *plane, float *out, unsigned char *arg, ptrdiff_t W, ptrdiff_t OH,
    ptrdiff_t OW) {
    const __m512i even = _mm512_loadu_si512(EVEN), odd = _mm512_loadu_si512(ODD);
    for (ptrdiff_t i = 0; i < OH; i++) {
        const float *r0 = plane + 2 * i * W, *r1 = r0 + W;
        for (ptrdiff_t j0 = 0; j0 < OW; j0 += 16) {
            ptrdiff_t len = OW - j0 < 16 ? OW - j0 : 16;
            __mmask16 lo = first_lanes(2 * len), hi = first_lanes(2 * len - 16);
            __m512 top0 = _mm512_maskz_loadu_ps(lo, r0 + 2 * j0);
            __m512 top1 = _mm512_maskz_loadu_ps(hi, r0 + 2 * j0 + 16);
            __m512 bottom0 = _mm512_maskz_loadu_ps(lo, r1 + 2 * j0);
            __m512 bottom1 = _mm512_maskz_loadu_ps(hi, r1 + 2 * j0 + 16);
            __m512 a = _mm512_permutex2var_ps(top0, even, top1);
            __m512 b = _mm512_permutex2var_ps(top0, odd, top1);
            __m512 c = _mm512_permutex2var_ps(bottom0, even, bottom1);
            __m512 e = _mm512_permutex2var_ps(bottom0, odd, bottom1);
            /* the larger, the earlier on ties; then the first NaN, if any */
            __m512 v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(b, a, _CMP_GT_OQ), a, b);
            v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, v, _CMP_GT_OQ), v, c);
            v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(e, v, _CMP_GT_OQ), v, e);
            __mmask16 a_nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
            __mmask16 b_nan = _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
            __mmask16 c_nan = _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
            __m512 nan = _mm512_mask_blend_ps(c_nan, e, c);
            nan = _mm512_mask_blend_ps(b_nan, nan, b);
            nan = _mm512_mask_blend_ps(a_nan, nan, a);
            v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(nan, nan, _CMP_UNORD_Q), v, nan);
            /* argmax: the first of a, b, c equal to v or NaN, else e */
            __m512i won = _mm512_set1_epi32(3);
            won = _mm512_mask_mov_epi32(won, _mm512_cmp_ps_mask(c, v, _CMP_EQ_OQ) | c_nan,
                                        _mm512_set1_epi32(2));
            won = _mm512_mask_mov_epi32(won, _mm512_cmp_ps_mask(b, v, _CMP_EQ_OQ) | b_nan,
                                        _mm512_set1_epi32(1));
            won = _mm512_mask_mov_epi32(won, _mm512_cmp_ps_mask(a, v, _CMP_EQ_OQ) | a_nan,
                                        _mm512_setzero_si512());
            _mm512_mask_storeu_ps(out + i * OW + j0, first_lanes(len), v);
            unsigned char bytes[16];
            _mm_storeu_si128((__m128i *)bytes, _mm512_cvtepi32_epi8(won));
            memcpy(arg + i * OW + j0, bytes, (size_t)len);
        }
    }
}
/* Backward: each window's pixel at argmax gets dout, the other three +0 (selected, as
 * the portable loop), interleaved back by permutes. */
__attribute__((target("avx512f"))) static void maxpool2x2_grad_avx512_f32(
    const float *g, const unsigned char *arg, float *dx, ptrdiff_t W, ptrdiff_t OH,
    ptrdiff_t OW) {
    const __m512i low = _mm512_loadu_si512(LOW), high = _mm512_loadu_si512(HIGH);
    for (ptrdiff_t i = 0; i < OH; i++) {
        float *r0 = dx + 2 * i * W, *r1 = r0 + W;
        for (ptrdiff_t j0 = 0; j0 < OW; j0 += 16) {
            ptrdiff_t len = OW - j0 < 16 ? OW - j0 : 16;
            __mmask16 lo = first_lanes(2 * len), hi = first_lanes(2 * len - 16);
            __m512 gv = _mm512_maskz_loadu_ps(first_lanes(len), g + i * OW + j0);
            unsigned char bytes[16] = {0};
            memcpy(bytes, arg + i * OW + j0, (size_t)len);
            __m512i won = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
            __m512 w[4];
            for (int k = 0; k < 4; k++) {
                __mmask16 is_k = _mm512_cmpeq_epi32_mask(won, _mm512_set1_epi32(k));
                w[k] = _mm512_maskz_mov_ps(is_k, gv);
            }
            _mm512_mask_storeu_ps(r0 + 2 * j0, lo, _mm512_permutex2var_ps(w[0], low, w[1]));
            _mm512_mask_storeu_ps(r0 + 2 * j0 + 16, hi, _mm512_permutex2var_ps(w[0], high, w[1]));
            _mm512_mask_storeu_ps(r1 + 2 * j0, lo, _mm512_permutex2var_ps(w[2], low, w[3]));
            _mm512_mask_storeu_ps(r1 + 2 * j0 + 16, hi, _mm512_permutex2var_ps(w[2], high, w[3]));
        }
    }
}
#endif

#define MAXPOOL2X2_f32(...) AVX512(maxpool2x2_avx512_f32(__VA_ARGS__))
#define MAXPOOL2X2_GRAD_f32(...) AVX512(maxpool2x2_grad_avx512_f32(__VA_ARGS__))
#define MAXPOOL2X2_f64(...) 0
#define MAXPOOL2X2_GRAD_f64(...) 0
#define POOL(T, SUFFIX)                                                                   \
    CLONES static void maxpool_block_##SUFFIX(const struct job *j, ptrdiff_t b) {         \
        const ptrdiff_t *d = j->dims;                                                     \
        ptrdiff_t H = d[2], W = d[3], kh = d[4], kw = d[5], sh = d[6], sw = d[7];         \
        ptrdiff_t OH = d[8], OW = d[9], K = kh * kw;                                      \
        const T *plane = (const T *)j->x + b * H * W;                                     \
        T *out = (T *)j->out + b * OH * OW;                                               \
        unsigned char *arg = (unsigned char *)j->m_out + b * OH * OW;                     \
        if (kh == 2 && kw == 2 && sh == 2 && sw == 2) {                                   \
            if (MAXPOOL2X2_##SUFFIX(plane, out, arg, W, OH, OW)) return;                  \
            /* The usual 2x2 pooling: 16 windows at a time copied apart (a, b above,  \
             * c, e below; rows are short, 14 windows at 28 pixels), then vector      \
             * selects: the larger, the earlier on ties, then the first NaN if any,   \
             * as the chain of np.maximum gives it. (Written so: gcc leaves NaN tests \
             * of intermediate maxima unvectorised.) */                               \
            for (ptrdiff_t i = 0; i < OH; i++) {                                          \
                const T *r0 = plane + 2 * i * W, *r1 = r0 + W;                            \
                for (ptrdiff_t j0 = 0; j0 < OW; j0 += CHUNK) {                            \
                    int len = OW - j0 < CHUNK ? (int)(OW - j0) : CHUNK;                   \
                    T a[CHUNK] = {0}, bb[CHUNK] = {0}, c[CHUNK] = {0}, e[CHUNK] = {0}, m[CHUNK]; \
                    unsigned char won[CHUNK];                                             \
                    for (int t = 0; t < len; t++) {                                       \
                        ptrdiff_t k = 2 * (j0 + t);                                       \
                        a[t] = r0[k], bb[t] = r0[k + 1], c[t] = r1[k], e[t] = r1[k + 1];  \
                    }                                                                     \
                    _Pragma("omp simd") for (int t = 0; t < CHUNK; t++) {                 \
                        T v = bb[t] > a[t] ? bb[t] : a[t];                                \
                        v = c[t] > v ? c[t] : v;                                          \
                        v = e[t] > v ? e[t] : v;                                          \
                        T nan = a[t] != a[t] ? a[t] : bb[t] != bb[t] ? bb[t]              \
                                : c[t] != c[t] ? c[t] : e[t];                             \
                        v = nan != nan ? nan : v;                                         \
                        m[t] = v;                                                         \
                        won[t] = (unsigned char)(a[t] == v || a[t] != a[t]     ? 0        \
                                                 : bb[t] == v || bb[t] != bb[t] ? 1       \
                                                 : c[t] == v || c[t] != c[t]   ? 2 : 3);  \
                    }                                                                     \
                    memcpy(out + i * OW + j0, m, len * sizeof(T));                        \
                    memcpy(arg + i * OW + j0, won, len);                                  \
                }                                                                         \
            }                                                                             \
            return;                                                                       \
        }                                                                                 \
        for (ptrdiff_t i = 0; i < OH; i++)                                                \
            for (ptrdiff_t jj = 0; jj < OW; jj++) {                                       \
                const T *w0 = plane + i * sh * W + jj * sw;                               \
                T m = w0[0];                                                              \
                for (ptrdiff_t p = 0; p < kh; p++)                                        \
                    for (ptrdiff_t q = p == 0; q < kw; q++) {                             \
                        T v = w0[p * W + q];                                              \
                        m = (m >= v || m != m) ? m : v;                                   \
                    }                                                                     \
                ptrdiff_t won = K - 1;                                                    \
                for (ptrdiff_t p = 0, k = 0; p < kh && won == K - 1; p++)                 \
                    for (ptrdiff_t q = 0; q < kw && k < K - 1; q++, k++) {                \
                        T v = w0[p * W + q];                                              \
                        if (m != m ? v != v : v == m) {                                   \
                            won = k;                                                      \
                            break;                                                        \
                        }                                                                 \
                    }                                                                     \
                out[i * OW + jj] = m;                                                     \
                arg[i * OW + jj] = (unsigned char)won;                                    \
            }                                                                             \
    }                                                                                     \
    CLONES static void maxpool_grad_block_##SUFFIX(const struct job *j, ptrdiff_t b) {    \
        const ptrdiff_t *d = j->dims;                                                     \
        ptrdiff_t H = d[2], W = d[3], kh = d[4], kw = d[5], sh = d[6], sw = d[7];         \
        ptrdiff_t OH = d[8], OW = d[9];                                                   \
        const T *g = (const T *)j->x + b * OH * OW;                                       \
        const unsigned char *arg = (const unsigned char *)j->m_in + b * OH * OW;          \
        T *dx = (T *)j->out + b * H * W;                                                  \
        if (!(sh == kh && sw == kw && OH * kh == H && OW * kw == W))                      \
            memset(dx, 0, H * W * sizeof(T)); /* pixels in no window */                   \
        if (kh == 2 && kw == 2 && sh == 2 && sw == 2) {                                   \
            if (MAXPOOL2X2_GRAD_##SUFFIX(g, arg, dx, W, OH, OW)) return;                  \
            /* 16 windows at a time in vector registers, then put in place. */           \
            for (ptrdiff_t i = 0; i < OH; i++) {                                          \
                T *r0 = dx + 2 * i * W, *r1 = r0 + W;                                     \
                for (ptrdiff_t j0 = 0; j0 < OW; j0 += CHUNK) {                            \
                    int len = OW - j0 < CHUNK ? (int)(OW - j0) : CHUNK;                   \
                    T gv[CHUNK] = {0}, a[CHUNK], bb[CHUNK], c[CHUNK], e[CHUNK];           \
                    unsigned char won[CHUNK] = {0};                                       \
                    memcpy(gv, g + i * OW + j0, len * sizeof(T));                         \
                    memcpy(won, arg + i * OW + j0, len);                                  \
                    _Pragma("omp simd") for (int t = 0; t < CHUNK; t++) {                 \
                        a[t] = won[t] == 0 ? gv[t] : (T)0;                                \
                        bb[t] = won[t] == 1 ? gv[t] : (T)0;                               \
                        c[t] = won[t] == 2 ? gv[t] : (T)0;                                \
                        e[t] = won[t] == 3 ? gv[t] : (T)0;                                \
                    }                                                                     \
                    for (int t = 0; t < len; t++) {                                       \
                        ptrdiff_t k = 2 * (j0 + t);                                       \
                        r0[k] = a[t], r0[k + 1] = bb[t], r1[k] = c[t], r1[k + 1] = e[t];  \
                    }                                                                     \
                }                                                                         \
            }                                                                             \
            return;                                                                       \
        }                                                                                 \
        for (ptrdiff_t i = 0; i < OH; i++)                                                \
            for (ptrdiff_t jj = 0; jj < OW; jj++) {                                       \
                T gv = g[i * OW + jj];                                                    \
                ptrdiff_t won = arg[i * OW + jj];                                         \
                T *w0 = dx + i * sh * W + jj * sw;                                        \
                for (ptrdiff_t p = 0; p < kh; p++)                                        \
                    for (ptrdiff_t q = 0; q < kw; q++)                                    \
                        w0[p * W + q] = p * kw + q == won ? gv : (T)0;                    \
            }                                                                             \
    }
POOL(float, f32)
POOL(double, f64)

/* pool(which, src, dst, argmax, dims, threads) -> bool: max pooling forward (which =
 * 0: src x, dst out, argmax written) or backward (1: src dout, argmax read, dst dx),
 * over C-contiguous float32 or float64 buffers of one format and uint8 argmax, of
 * the sizes dims implies; False, touching nothing, when they are not or when the
 * windows are not disjoint, whole and at most 256 pixels. */
PyObject *pool(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long which;
    Py_ssize_t threads;
    struct job j = {0};
    if (!read_call(args, nargs, 6, 4, 10, "pool(which, src, dst, argmax, dims (10 ints), threads)",
                   &which, &threads, &j))
        return NULL;
    const ptrdiff_t *d = j.dims;
    ptrdiff_t N = d[0], C = d[1], H = d[2], W = d[3], kh = d[4], kw = d[5];
    ptrdiff_t sh = d[6], sw = d[7], OH = d[8], OW = d[9];
    int shape_ok = N >= 0 && C >= 0 && kh >= 1 && kw >= 1 && kh * kw <= 256 && sh >= kh
                   && sw >= kw && OH >= 1 && OW >= 1 && (OH - 1) * sh + kh <= H
                   && (OW - 1) * sw + kw <= W && OH == (H - kh) / sh + 1
                   && OW == (W - kw) / sw + 1;
    if (!shape_ok) return PyBool_FromLong(0);
    ptrdiff_t image = N * C * H * W, pooled = N * C * OH * OW;
    Py_buffer src = {0}, dst = {0}, arg = {0};
    int fits = take(args[1], &src, 0, NULL, -1) && src.obj != NULL
               && (strcmp(src.format, "f") == 0 || strcmp(src.format, "d") == 0)
               && src.len == (which ? pooled : image) * src.itemsize
               && take(args[2], &dst, 1, src.format, (which ? image : pooled) * src.itemsize)
               && dst.obj != NULL && take(args[3], &arg, !which, "B", pooled) && arg.obj != NULL;
    if (fits) {
        int f32 = src.itemsize == 4;
        j.task = which ? (f32 ? maxpool_grad_block_f32 : maxpool_grad_block_f64)
                       : (f32 ? maxpool_block_f32 : maxpool_block_f64);
        j.x = src.buf, j.out = dst.buf;
        if (which) j.m_in = arg.buf; else j.m_out = arg.buf;
        j.blocks = N * C;
        run_tasks(&j, threads);
    }
    release((Py_buffer *[]){&src, &dst, &arg}, 3);
    return PyBool_FromLong(fits);
}

