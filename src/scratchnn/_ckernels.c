/*
 * Fused kernels: one pass over memory where the NumPy path (the reference)
 * makes 4 to 50. Each activation's forward and backward (layers/activations.py),
 * Softmax by rows, the SGD and Adam steps (optim.py), and Conv2d's im2col and
 * col2im (layers/convolution.py); large calls run on two threads (see "Two
 * threads" below).
 *
 * Optional: setup.py builds this file as the extension module
 * scratchnn._ckernels when a C compiler and Python's headers are there, and
 * scratchnn/_fused.py calls it. Without it, or with SCRATCHNN_KERNELS=0,
 * every layer runs its NumPy passes. The arrays come in through the buffer
 * protocol, so no NumPy header is needed either.
 *
 * Why it is written the way it is:
 * - The exponentials come from glibc's libmvec (SIMD exp, expm1, log1p, tanh,
 *   erfc, within a few ulp), which gcc calls from a `#pragma omp simd` loop
 *   when the scalar function is declared `omp declare simd`. No -ffast-math:
 *   NaN, infinities and signed zeros must come out as in the NumPy path.
 * - target_clones builds each chunk loop for AVX-512, AVX2 and baseline
 *   x86-64, and picks one at load time for the CPU it runs on, so a build
 *   never uses an instruction the running CPU lacks.
 * - Every element goes through the same vector code: the loops run over
 *   fixed chunks of CHUNK elements, and the last partial chunk is copied into
 *   a zero-padded buffer and run through the same chunk code. A scalar
 *   remainder loop would call libm's scalar exp for a few elements, which can
 *   round differently; then a block boundary could change a result, and
 *   the blocks of a two-thread call must give the one-call result bit for bit.
 * - Inputs are never written; outputs are arrays from the caller (the
 *   optimisers' steps update their parameter and state arrays in place).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern float expm1f(float);
#pragma omp declare simd notinbranch
extern double expm1(double);
#pragma omp declare simd notinbranch
extern float log1pf(float);
#pragma omp declare simd notinbranch
extern double log1p(double);
#pragma omp declare simd notinbranch
extern float tanhf(float);
#pragma omp declare simd notinbranch
extern double tanh(double);
#pragma omp declare simd notinbranch
extern float erfcf(float);
#pragma omp declare simd notinbranch
extern double erfc(double);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* 16 floats fill one AVX-512 register, two AVX2 ones; 16 doubles two and four. */
#define CHUNK 16

/* The arguments every kernel takes, used or not: three inputs (x, dout and one
 * more kept array h), a mask input, three outputs (the optimisers' steps read
 * them too: parameter and state arrays), a mask output and up to NPARAMS
 * scalars ps, of which p = ps[0] is the layer's alpha or beta. */
#define NPARAMS 6
#define ARGS(T) const T *restrict x, const T *restrict g, const T *restrict h,             \
                const unsigned char *restrict m_in, T *restrict out, T *restrict out2,     \
                T *restrict out3, unsigned char *restrict m_out, const T *restrict ps

/*
 * DEFINE(name, T, F, SUFFIX) defines the entry point name_SUFFIX over n
 * elements from name##_BODY(T, F), the code for element i (F is the math
 * functions' suffix: f for float, nothing for double).
 *
 * The chunk loop is a separate function, kept out of line, so that the full
 * chunks and the zero-padded last chunk run through one compiled copy of it:
 * two inlined copies may be vectorised differently (one was left scalar, calling
 * libm instead of libmvec). It is cloned for the CPU (CLONES), the entry
 * point need not be. Unused arguments (NULL) point at `out` instead, which is
 * never read through them: the pointer arithmetic stays defined.
 */
#define DEFINE(name, T, F, SUFFIX)                                                        \
    CLONES __attribute__((noinline)) static void name##_chunks_##SUFFIX(ARGS(T),          \
                                                                        ptrdiff_t chunks) { \
        const T p = ps[0];                                                                \
        (void)p;                                                                          \
        for (ptrdiff_t c = 0; c < chunks; c++) {                                          \
            _Pragma("omp simd") for (int i = 0; i < CHUNK; i++) { name##_BODY(T, F) }     \
            x += CHUNK, g += CHUNK, h += CHUNK, m_in += CHUNK;                            \
            out += CHUNK, out2 += CHUNK, out3 += CHUNK, m_out += CHUNK;                   \
        }                                                                                 \
    }                                                                                     \
    static void name##_##SUFFIX(const void *vx, const void *vg, const void *vh,            \
                                const void *vm_in, void *vout, void *vout2, void *vout3,  \
                                void *vm_out, const double *params, ptrdiff_t n) {        \
        const T *x = vx, *g = vg, *h = vh;                                                \
        const unsigned char *m_in = vm_in;                                                \
        T *out = vout, *out2 = vout2, *out3 = vout3, ps[NPARAMS];                         \
        for (int k = 0; k < NPARAMS; k++) ps[k] = (T)params[k];                           \
        unsigned char *m_out = vm_out;                                                    \
        unsigned char *spare = (unsigned char *)out;                                      \
        x = x ? x : out, g = g ? g : out, h = h ? h : out;                                \
        m_in = m_in ? m_in : spare, out2 = out2 ? out2 : out, out3 = out3 ? out3 : out;   \
        m_out = m_out ? m_out : spare;                                                    \
        ptrdiff_t full = n / CHUNK * CHUNK, rest = n - full;                              \
        name##_chunks_##SUFFIX(x, g, h, m_in, out, out2, out3, m_out, ps, full / CHUNK);  \
        if (rest == 0) return;                                                            \
        /* Outputs are copied in too: the optimisers' steps read them. */                 \
        T bx[CHUNK] = {0}, bg[CHUNK] = {0}, bh[CHUNK] = {0};                              \
        T bo[CHUNK] = {0}, bo2[CHUNK] = {0}, bo3[CHUNK] = {0};                            \
        unsigned char bm_in[CHUNK] = {0}, bm_out[CHUNK];                                  \
        memcpy(bx, x + full, rest * sizeof(T));                                           \
        memcpy(bg, g + full, rest * sizeof(T));                                           \
        memcpy(bh, h + full, rest * sizeof(T));                                           \
        memcpy(bo, out + full, rest * sizeof(T));                                         \
        memcpy(bo2, out2 + full, rest * sizeof(T));                                       \
        memcpy(bo3, out3 + full, rest * sizeof(T));                                       \
        memcpy(bm_in, m_in + full, rest);                                                 \
        name##_chunks_##SUFFIX(bx, bg, bh, bm_in, bo, bo2, bo3, bm_out, ps, 1);           \
        memcpy(out + full, bo, rest * sizeof(T));                                         \
        if (out2 != out) memcpy(out2 + full, bo2, rest * sizeof(T));                      \
        if (out3 != out) memcpy(out3 + full, bo3, rest * sizeof(T));                      \
        if (m_out != spare) memcpy(m_out + full, bm_out, rest);                           \
    }

#define BOTH(name) DEFINE(name, float, f, f32) DEFINE(name, double, , f64)

#define MATH(fn, F) fn##F

/* A NaN fails every comparison, so `c ? a : b` with the comparison chosen
 * below keeps NaN wherever the NumPy path's np.minimum/np.maximum/np.clip
 * propagate it (C's fmin/fmax would drop it). */

/* sigmoid(x) = 1/(1+e) for x >= 0, e/(1+e) for x < 0, with e = exp(-|x|) <= 1. */
#define SIGMOID(T, F, v) ({                                                               \
        T e_ = MATH(exp, F)(-MATH(fabs, F)(v));                                           \
        ((v) >= 0 ? (T)1 : e_) / ((T)1 + e_); })

/* A copy, for arrays a layer keeps for backward: one pass on two threads. */
#define copy_BODY(T, F) out[i] = x[i];
BOTH(copy)

/* Sigmoid forward: out = sigmoid(x). Backward (x = y, the kept output): dout (1 - y) y. */
#define sigmoid_BODY(T, F) out[i] = SIGMOID(T, F, x[i]);
#define sigmoid_grad_BODY(T, F) out[i] = g[i] * ((T)1 - x[i]) * x[i];
BOTH(sigmoid)
BOTH(sigmoid_grad)

/* Tanh forward (libmvec's tanh); backward from the kept output y: dout (1 - y^2). */
#define tanh_BODY(T, F) out[i] = MATH(tanh, F)(x[i]);
BOTH(tanh)

#define tanh_grad_BODY(T, F) out[i] = g[i] * ((T)1 - x[i] * x[i]);
BOTH(tanh_grad)

/* Relu: the mask (x <= 0) and x or +0; backward dout or +0 by the mask. NaN
 * passes forward; under the mask an infinite or NaN dout still gives 0. */
#define relu_BODY(T, F) m_out[i] = x[i] <= 0; out[i] = x[i] <= 0 ? (T)0 : x[i];
#define relu_grad_BODY(T, F) out[i] = m_in[i] ? (T)0 : g[i];
BOTH(relu)
BOTH(relu_grad)

/* LeakyRelu(alpha = p): the mask (x <= 0) and x or alpha x; backward dout or alpha dout. */
#define leaky_relu_BODY(T, F) m_out[i] = x[i] <= 0; out[i] = x[i] > 0 ? x[i] : p * x[i];
#define leaky_relu_grad_BODY(T, F) out[i] = g[i] * (m_in[i] ? p : (T)1);
BOTH(leaky_relu)
BOTH(leaky_relu_grad)

/* The layers that keep their slope dy/dx (Elu, Silu, Gelu) compute it in the
 * forward pass, into out2, beside the output; backward is then dout times it. */
#define slope_grad_BODY(T, F) out[i] = g[i] * x[i];
BOTH(slope_grad)

/* Elu(alpha = p): max(x, 0) + alpha expm1(min(x, 0)); slope 1, or alpha exp(x) where
 * x <= 0. exp only of the non-positive part, which cannot overflow. */
#define elu_BODY(T, F)                                                                    \
    T lo = x[i] > 0 ? (T)0 : x[i];                                                        \
    out[i] = (x[i] > 0 ? x[i] : (T)0) + p * MATH(expm1, F)(lo);                           \
    out2[i] = x[i] > 0 ? (T)1 : p * MATH(exp, F)(lo);
BOTH(elu)

/* Softplus(beta = p): max(x, 0) + log1p(exp(-beta |x|)) / beta; backward from the
 * kept output y: dout (-expm1(-beta y)). */
#define softplus_BODY(T, F)                                                               \
    T t = MATH(log1p, F)(MATH(exp, F)(MATH(fabs, F)(x[i]) * -p)) / p;                     \
    out[i] = t + (x[i] > 0 ? x[i] : (T)0);
#define softplus_grad_BODY(T, F) out[i] = g[i] * -MATH(expm1, F)(x[i] * -p);
BOTH(softplus)
BOTH(softplus_grad)

/* Silu: x s with s = sigmoid(x); slope s (1 + x (1 - s)). */
#define silu_BODY(T, F)                                                                   \
    T s = SIGMOID(T, F, x[i]);                                                            \
    out[i] = x[i] * s;                                                                    \
    out2[i] = s * ((T)1 + x[i] * ((T)1 - s));
BOTH(silu)

/* The constants as the NumPy path computes them (math.sqrt(2 / math.pi) and so on),
 * not as exact decimals: Gelu's left tail turns an ulp of x / sqrt 2 into about
 * x^2 ulps of the result, so the two paths must start from the same double. */
#define SQRT_2_OVER_PI sqrt(2.0 / M_PI)
#define ONE_OVER_SQRT_2 (1.0 / sqrt(2.0))
#define SQRT_2_PI sqrt(2.0 * M_PI)

/* Gelu, tanh form: x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), x clipped to
 * [-100, 100] inside u only (it has saturated there; the clip keeps x^3 finite). */
#define GELU_U2(T, c)                                                                     \
    T c = x[i] > 100 ? (T)100 : x[i];                                                     \
    c = c < -100 ? (T)-100 : c;                                                           \
    T u2 = (c + c * c * (T)0.044715 * c) * (T)(2.0 * SQRT_2_OVER_PI);
/* x s with s = sigmoid(2u); slope s + x 2 s (1 - s) du, du = sqrt(2/pi) (1 + 3 0.044715
 * x^2): x multiplies last, since s (1 - s) is exactly 0 wherever x is large enough
 * to overflow. */
#define gelu_tanh_BODY(T, F)                                                              \
    GELU_U2(T, c)                                                                         \
    T s = SIGMOID(T, F, u2);                                                              \
    T du = (c * c * (T)(3 * 0.044715) + (T)1) * (T)SQRT_2_OVER_PI;                        \
    out[i] = x[i] * s;                                                                    \
    out2[i] = s + x[i] * (((T)1 - s) * s * (T)2 * du);
BOTH(gelu_tanh)

/* Gelu, exact: x Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2; slope Phi + x phi with
 * phi(x) = exp(-x^2/2) / sqrt(2 pi), |x| clipped at 40, where phi is 0 in float64. */
#define gelu_BODY(T, F)                                                                   \
    T cdf = MATH(erfc, F)(x[i] * (T)-ONE_OVER_SQRT_2) * (T)0.5;                           \
    T a = MATH(fabs, F)(x[i]);                                                            \
    a = a > 40 ? (T)40 : a;                                                               \
    T pdf = MATH(exp, F)(a * a * (T)-0.5) / (T)SQRT_2_PI;                                 \
    out[i] = x[i] * cdf;                                                                  \
    out2[i] = cdf + x[i] * pdf;
BOTH(gelu)

/* The optimisers' steps, in place: out is the parameter, g its gradient, out2 and
 * out3 the state; the same operations in the same order as their NumPy paths
 * (optim.py), each rounded as there.
 * SGD(lr = p): p <- p - lr g. */
#define sgd_BODY(T, F) out[i] = out[i] - g[i] * p;
BOTH(sgd)
/* Adam, with ps = (beta1, 1 - beta1, beta2, 1 - beta2, 1 / (c2 step), eps / step):
 * m <- beta1 m + (1 - beta1) g; v <- beta2 v + ((1 - beta2) g) g;
 * p <- p - m / (sqrt(v) / (c2 step) + eps / step). */
#define adam_BODY(T, F)                                                                   \
    T m = out2[i] * ps[0] + g[i] * ps[1];                                                 \
    T v = out3[i] * ps[2] + g[i] * ps[3] * g[i];                                          \
    out2[i] = m, out3[i] = v;                                                             \
    out[i] = out[i] - m / (MATH(sqrt, F)(v) * ps[4] + ps[5]);
BOTH(adam)

/* Relu with its mask packed to one bit per element, as np.packbits packs it (the
 * first element in the high bit, the last byte padded with zeros): the relu
 * kernels above run on pieces of PIECE elements with a bool mask on the stack,
 * which is packed (forward) or unpacked (backward) beside them, in cache. */
#define PIECE 1024

static void pack_bits(const unsigned char *restrict bools, unsigned char *restrict bits,
                      ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i += 8) {
        uint64_t eight = 0;  /* 8 bools of 0 or 1, the first in the low byte */
        if (n - i >= 8)
            memcpy(&eight, bools + i, 8);  /* a constant size: one load, no call */
        else
            memcpy(&eight, bools + i, (size_t)(n - i));
        /* The multiply moves bool k to bit 63 - k without carries (distinct bit
         * positions for every partial product below bit 56). */
        bits[i / 8] = (unsigned char)((eight * 0x8040201008040201ULL) >> 56);
    }
}

static void unpack_bits(const unsigned char *restrict bits, unsigned char *restrict bools,
                        ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i += 8) {
        /* The byte in all 8 lanes, lane k keeping bit 7 - k; adding 0x7f sets a
         * lane's top bit exactly where that bit was set (no carry between lanes). */
        uint64_t lanes = (bits[i / 8] * 0x0101010101010101ULL) & 0x0102040810204080ULL;
        lanes = ((lanes + 0x7f7f7f7f7f7f7f7fULL) >> 7) & 0x0101010101010101ULL;
        if (n - i >= 8)
            memcpy(bools + i, &lanes, 8);
        else
            memcpy(bools + i, &lanes, (size_t)(n - i));
    }
}

/* On CPUs with AVX-512 the packed kernels need no bool array at all: a vector
 * compare yields the mask bits directly (element k in bit k), which a table
 * reverses within each byte into np.packbits' order (element 0 in the high
 * bit); backward turns the bytes back into a mask register that selects 0
 * or dout. The same values and bits as the portable code below. */
static unsigned char REVERSED[256];  /* each byte with its bits in reverse order */
static int use_avx512;              /* set once, when the module loads */

static void init_packed(void) {
    for (int b = 0; b < 256; b++) {
        unsigned char r = 0;
        for (int k = 0; k < 8; k++) r |= (unsigned char)(((b >> k) & 1) << (7 - k));
        REVERSED[b] = r;
    }
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f");
#endif
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define HAVE_AVX512 1
/* Each loop runs whole vectors and the last partial one through the same body:
 * `live` masks the lanes past n out of every load, store and mask bit. */
__attribute__((target("avx512f"))) static void relu_packed_avx512_f32(
    const float *x, float *out, unsigned char *bits, ptrdiff_t n) {
    const __m512 zero = _mm512_setzero_ps();
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(live, x + i);
        /* x <= 0, NaN not; the bits past n stay 0, as np.packbits pads */
        __mmask16 m = _mm512_cmp_ps_mask(v, zero, _CMP_LE_OQ) & live;
        _mm512_mask_storeu_ps(out + i, live, _mm512_mask_mov_ps(v, m, zero));
        bits[i / 8] = REVERSED[m & 0xff];
        if (n - i > 8) bits[i / 8 + 1] = REVERSED[m >> 8];
    }
}
__attribute__((target("avx512f"))) static void relu_packed_grad_avx512_f32(
    const float *g, float *out, const unsigned char *bits, ptrdiff_t n) {
    const __m512 zero = _mm512_setzero_ps();
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        unsigned high = n - i > 8 ? REVERSED[bits[i / 8 + 1]] : 0;
        __mmask16 m = (__mmask16)(REVERSED[bits[i / 8]] | high << 8);
        __m512 v = _mm512_maskz_loadu_ps(live, g + i);
        _mm512_mask_storeu_ps(out + i, live, _mm512_mask_mov_ps(v, m, zero));
    }
}
__attribute__((target("avx512f"))) static void relu_packed_avx512_f64(
    const double *x, double *out, unsigned char *bits, ptrdiff_t n) {
    const __m512d zero = _mm512_setzero_pd();
    for (ptrdiff_t i = 0; i < n; i += 8) {
        __mmask8 live = n - i >= 8 ? 0xff : (__mmask8)((1u << (n - i)) - 1);
        __m512d v = _mm512_maskz_loadu_pd(live, x + i);
        __mmask8 m = _mm512_cmp_pd_mask(v, zero, _CMP_LE_OQ) & live;
        _mm512_mask_storeu_pd(out + i, live, _mm512_mask_mov_pd(v, m, zero));
        bits[i / 8] = REVERSED[m];
    }
}
__attribute__((target("avx512f"))) static void relu_packed_grad_avx512_f64(
    const double *g, double *out, const unsigned char *bits, ptrdiff_t n) {
    const __m512d zero = _mm512_setzero_pd();
    for (ptrdiff_t i = 0; i < n; i += 8) {
        __mmask8 live = n - i >= 8 ? 0xff : (__mmask8)((1u << (n - i)) - 1);
        __m512d v = _mm512_maskz_loadu_pd(live, g + i);
        _mm512_mask_storeu_pd(out + i, live, _mm512_mask_mov_pd(v, REVERSED[bits[i / 8]], zero));
    }
}

/* The 2x2 max pooling of float planes (see "Max pooling" below for what it computes,
 * bit for bit as the portable loop): 16 windows at a time, each pair of rows loaded
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
/* Backward: each window's four pixels get dout times (offset == argmax), as the
 * portable loop writes them (so -0.0 and NaN alike), interleaved back by permutes. */
__attribute__((target("avx512f"))) static void maxpool2x2_grad_avx512_f32(
    const float *g, const unsigned char *arg, float *dx, ptrdiff_t W, ptrdiff_t OH,
    ptrdiff_t OW) {
    const __m512i low = _mm512_loadu_si512(LOW), high = _mm512_loadu_si512(HIGH);
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
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
                w[k] = _mm512_mul_ps(gv, _mm512_mask_blend_ps(is_k, zero, one));
            }
            _mm512_mask_storeu_ps(r0 + 2 * j0, lo, _mm512_permutex2var_ps(w[0], low, w[1]));
            _mm512_mask_storeu_ps(r0 + 2 * j0 + 16, hi, _mm512_permutex2var_ps(w[0], high, w[1]));
            _mm512_mask_storeu_ps(r1 + 2 * j0, lo, _mm512_permutex2var_ps(w[2], low, w[3]));
            _mm512_mask_storeu_ps(r1 + 2 * j0 + 16, hi, _mm512_permutex2var_ps(w[2], high, w[3]));
        }
    }
}
#endif

/* AVX512(call): runs call and is true where the AVX-512 path exists and the
 * CPU has it; false (nothing run) elsewhere. */
#ifdef HAVE_AVX512
#define AVX512(call) (use_avx512 ? ((call), 1) : 0)
#else
#define AVX512(call) 0
#endif

#define PACKED(T, SUFFIX)                                                                 \
    static void relu_packed_##SUFFIX(const void *vx, const void *vg, const void *vh,      \
                                     const void *vm_in, void *vout, void *vout2,          \
                                     void *vout3, void *vm_out, const double *params,     \
                                     ptrdiff_t n) {                                       \
        (void)vg, (void)vh, (void)vm_in, (void)vout2, (void)vout3;                        \
        const T *x = vx;                                                                  \
        T *out = vout;                                                                    \
        unsigned char bools[PIECE], *bits = vm_out;                                       \
        if (AVX512(relu_packed_avx512_##SUFFIX(x, out, bits, n))) return;          \
        for (ptrdiff_t s = 0; s < n; s += PIECE) {                                        \
            ptrdiff_t len = n - s < PIECE ? n - s : PIECE;                                \
            relu_##SUFFIX(x + s, NULL, NULL, NULL, out + s, NULL, NULL, bools, params, len); \
            pack_bits(bools, bits + s / 8, len);                                          \
        }                                                                                 \
    }                                                                                     \
    static void relu_packed_grad_##SUFFIX(const void *vx, const void *vg, const void *vh, \
                                          const void *vm_in, void *vout, void *vout2,     \
                                          void *vout3, void *vm_out,                      \
                                          const double *params, ptrdiff_t n) {            \
        (void)vx, (void)vh, (void)vout2, (void)vout3, (void)vm_out;                       \
        const T *g = vg;                                                                  \
        T *out = vout;                                                                    \
        const unsigned char *bits = vm_in;                                                \
        unsigned char bools[PIECE];                                                       \
        if (AVX512(relu_packed_grad_avx512_##SUFFIX(g, out, bits, n))) return;     \
        for (ptrdiff_t s = 0; s < n; s += PIECE) {                                        \
            ptrdiff_t len = n - s < PIECE ? n - s : PIECE;                                \
            unpack_bits(bits + s / 8, bools, len);                                        \
            relu_grad_##SUFFIX(NULL, g + s, NULL, bools, out + s, NULL, NULL, NULL, params,  \
                               len);                                                      \
        }                                                                                 \
    }
PACKED(float, f32)
PACKED(double, f64)

/* Softmax along rows of `p` elements (the last axis): the kernel gets whole rows.
 * y = exp(x - max) / sum(exp(x - max)), the sum over the row, and where out2 is
 * given, log y = (x - max) - log(sum) into it (SoftmaxWithLoss's cross-entropy,
 * finite where y underflows); backward from the kept output y:
 * dx = y (dout - sum(dout y)). Every lane of a NaN or +inf row comes out NaN,
 * as on the NumPy path (its max, then x - max, is NaN there). */
#define ROWS(T, F, SUFFIX)                                                                \
    CLONES static void softmax_##SUFFIX(const void *vx, const void *vg, const void *vh,   \
                                        const void *vm_in, void *vout, void *vout2,       \
                                        void *vout3, void *vm_out, const double *params,  \
                                        ptrdiff_t n) {                                    \
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
    CLONES static void softmax_grad_##SUFFIX(const void *vx, const void *vg,              \
                                             const void *vh, const void *vm_in,           \
                                             void *vout, void *vout2, void *vout3,        \
                                             void *vm_out, const double *params,          \
                                             ptrdiff_t n) {                               \
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
    }
ROWS(float, f, f32)
ROWS(double, , f64)

/* ---- Two threads: the caller and one worker share a call's blocks ----
 *
 * A call on `threads` = 2 splits its n elements into blocks of `block`
 * elements (a multiple of CHUNK, so every element goes through the same chunk
 * code as in one call: the results are bit for bit those of one call) and
 * the caller and a single worker thread take free blocks until none is left:
 * the caller from the front, the worker from the back, both ends held in one
 * atomic word. A thread slowed by other work on its core simply takes fewer;
 * when both run at one speed each takes the same half of the arrays call after
 * call, so a layer's backward finds the blocks its forward wrote (and the
 * caller's input) still in that core's cache. PyTorch splits its element-wise loops the same way
 * over its OpenMP threads from 32768 elements; a pool in C costs a few
 * microseconds per call where handing blocks to a Python thread cost tens.
 *
 * The worker spins for SPIN_NS after each job (a layer's backward usually
 * follows its forward within microseconds), then sleeps on a condition
 * variable. One caller at a time uses it (`busy`); a second caller, from
 * another Python thread, runs on its own thread. After fork() the child has
 * no worker: it starts a new one when it needs one.
 */
typedef void (*kernel_fn)(const void *, const void *, const void *, const void *, void *,
                          void *, void *, void *, const double *, ptrdiff_t);

struct job {
    /* Runs block b of the job: element-wise kernels by default (task NULL). */
    void (*task)(const struct job *, ptrdiff_t b);
    ptrdiff_t dims[12];  /* the task's sizes (im2col, col2im) */
    kernel_fn fn;
    const char *x, *g, *h, *m_in;
    char *out, *out2, *out3, *m_out;
    ptrdiff_t itemsize, n, block, blocks;
    int bits;  /* masks hold a bit per element: a block starts at byte start / 8 */
    double params[NPARAMS];
};

#define SPIN_NS 200000L

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static struct job job;
static atomic_long posted;       /* jobs posted so far */
static atomic_long claimed;      /* the last job a thread claimed for the worker's part */
static atomic_long finished;     /* the last job the worker finished */
/* Blocks taken from the front (high 32 bits) and from the back (low 32 bits). */
static atomic_llong ends_taken;
#define FRONT_BLOCK (1LL << 32)
#define MAX_BLOCKS ((1LL << 31) - 1)
static atomic_int sleeping;
static atomic_flag busy = ATOMIC_FLAG_INIT;
static int worker_running;       /* guarded by `busy` */

/* Element offset `start` of an array, or NULL where the kernel does not use it. */
#define AT(p, start, size) ((p) ? (p) + (start) * (size) : NULL)

static atomic_long worker_blocks; /* blocks the worker has run, for the tests */

/* Runs free blocks of j, from the front or the back, until none is left;
 * returns how many it ran. */
static long take_blocks(const struct job *j, int from_back) {
    for (long taken = 0;; taken++) {
        long long ends = atomic_load(&ends_taken), front, back;
        do {
            front = ends >> 32, back = ends & 0xffffffffLL;
            if (front + back >= j->blocks) return taken;
        } while (!atomic_compare_exchange_weak(&ends_taken, &ends,
                                               ends + (from_back ? 1 : FRONT_BLOCK)));
        ptrdiff_t b = from_back ? j->blocks - 1 - back : front;
        if (j->task != NULL) {
            j->task(j, b);
            continue;
        }
        ptrdiff_t start = b * j->block;
        ptrdiff_t stop = start + j->block < j->n ? start + j->block : j->n;
        ptrdiff_t s = j->itemsize;
        ptrdiff_t m = j->bits ? start / 8 : start;  /* blocks are multiples of CHUNK */
        j->fn(AT(j->x, start, s), AT(j->g, start, s), AT(j->h, start, s), AT(j->m_in, m, 1),
              AT(j->out, start, s), AT(j->out2, start, s), AT(j->out3, start, s),
              AT(j->m_out, m, 1), j->params, stop - start);
    }
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void pause_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *unused) {
    (void)unused;
    long done = atomic_load(&posted);
    for (;;) {
        long deadline = now_ns() + SPIN_NS;
        for (int spins = 0; atomic_load(&posted) == done; spins++) {
            pause_cpu();
            if ((spins & 63) == 63 && now_ns() > deadline) {
                pthread_mutex_lock(&lock);
                /* sleeping is set before posted is read again: a caller that posts
                 * after this read sees sleeping and signals under the lock. */
                atomic_store(&sleeping, 1);
                while (atomic_load(&posted) == done) pthread_cond_wait(&wake, &lock);
                atomic_store(&sleeping, 0);
                pthread_mutex_unlock(&lock);
            }
        }
        done = atomic_load(&posted);
        long expected = done - 1;
        /* Claim the job unless the caller has already finished every block and
         * taken it back; then the worker must not touch `job` at all. */
        if (atomic_compare_exchange_strong(&claimed, &expected, done)) {
            atomic_fetch_add(&worker_blocks, take_blocks(&job, 1));
            atomic_store(&finished, done);
        }
    }
    return NULL;
}

static void forget_worker(void) {
    /* In a forked child the worker thread does not exist. */
    pthread_mutex_t fresh_lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_wake = PTHREAD_COND_INITIALIZER;
    lock = fresh_lock;
    wake = fresh_wake;
    atomic_store(&sleeping, 0);
    /* A call in flight on another thread of the parent has no thread here:
     * its job counts as claimed and finished. */
    atomic_store(&claimed, atomic_load(&posted));
    atomic_store(&finished, atomic_load(&posted));
    atomic_flag_clear(&busy);
    worker_running = 0;
}

/* Runs j over its blocks on the caller and the worker; 0 if the worker is in
 * use or cannot be started (the caller then runs the job in one call). */
static int run_on_two_threads(const struct job *j) {
    if (atomic_flag_test_and_set(&busy)) return 0;
    if (!worker_running) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) {
            atomic_flag_clear(&busy);
            return 0;
        }
        worker_running = 1;
    }
    job = *j;
    atomic_store(&ends_taken, 0);
    long mine = atomic_load(&posted) + 1;
    atomic_store(&posted, mine);
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&lock);
        pthread_cond_signal(&wake);
        pthread_mutex_unlock(&lock);
    }
    take_blocks(j, 0);
    long expected = mine - 1;
    if (!atomic_compare_exchange_strong(&claimed, &expected, mine)) {
        /* The worker claimed the job: wait until it has finished its block. */
        while (atomic_load(&finished) != mine) pause_cpu();
    }
    atomic_flag_clear(&busy);
    return 1;
}

/* ---- The Python module: run(kernel, out, x, g, h, mask_in, out2, out3, mask_out, params, threads, block) ---- */

/* One row per kernel: its name, its float and its double entry point. The
 * module exports the names in this order, as NAMES; run() takes the index. */
#define ROW(name) {#name, name##_f32, name##_f64, 0, 0}
/* A kernel over whole rows of `param` elements (softmax) */
#define ROWWISE(name) {#name, name##_f32, name##_f64, 1, 0}
/* A kernel whose masks are packed bits, uint8 arrays of ceil(n / 8) bytes */
#define BITWISE(name) {#name, name##_f32, name##_f64, 0, 1}
static const struct {
    const char *name;
    kernel_fn f32, f64;
    int rows, bits;
} KERNELS[] = {
    ROW(sigmoid), ROW(sigmoid_grad), ROW(tanh_grad), ROW(relu), ROW(relu_grad),
    ROW(leaky_relu), ROW(leaky_relu_grad), ROW(elu), ROW(softplus), ROW(softplus_grad),
    ROW(silu), ROW(gelu_tanh), ROW(gelu), ROW(slope_grad), ROW(copy), ROW(tanh),
    ROWWISE(softmax), ROWWISE(softmax_grad), ROW(sgd), ROW(adam),
    BITWISE(relu_packed), BITWISE(relu_packed_grad),
};
#define N_KERNELS ((Py_ssize_t)(sizeof(KERNELS) / sizeof(KERNELS[0])))

/* Takes the buffer of `arg` if it is a C-contiguous array of `format` items
 * (any when NULL) with `size` bytes (any when negative), writable for
 * outputs: 1 when it fits or `arg` is None, 0 (holding nothing) when not. */
static int take(PyObject *arg, Py_buffer *view, int writable, const char *format,
                Py_ssize_t size) {
    if (arg == Py_None) return 1;
    int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(arg, view, flags) != 0) {
        PyErr_Clear();  /* not an array the kernels can take: the NumPy path will */
        return 0;
    }
    if (view->format == NULL || (format != NULL && strcmp(view->format, format) != 0)
        || (size >= 0 && view->len != size)) {
        PyBuffer_Release(view);
        view->obj = NULL;
        return 0;
    }
    return 1;
}

/* run(kernel, out, x, g, h, mask_in, out2, out3, mask_out, params, threads, block)
 * -> bool: False, touching nothing, when an array is not what the kernel takes
 * (another dtype, not C-contiguous, another size); then the caller runs NumPy.
 * params is a tuple of up to NPARAMS floats. With threads = 2 and more than
 * `block` elements, the caller and the worker share the blocks (see above);
 * `block` is rounded up to a multiple of CHUNK. */
static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "run() takes 12 arguments");
        return NULL;
    }
    Py_ssize_t kernel = PyLong_AsSsize_t(args[0]);
    Py_ssize_t threads = PyLong_AsSsize_t(args[10]);
    Py_ssize_t block = PyLong_AsSsize_t(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (kernel < 0 || kernel >= N_KERNELS) {
        PyErr_SetString(PyExc_IndexError, "no such kernel");
        return NULL;
    }
    double params[NPARAMS] = {0};
    if (!PyTuple_Check(args[9]) || PyTuple_GET_SIZE(args[9]) > NPARAMS) {
        PyErr_SetString(PyExc_TypeError, "params must be a tuple of at most 6 floats");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(args[9]); k++) {
        params[k] = PyFloat_AsDouble(PyTuple_GET_ITEM(args[9], k));
        if (PyErr_Occurred()) return NULL;
    }
    block = block < CHUNK ? CHUNK : (block + CHUNK - 1) / CHUNK * CHUNK;
    Py_buffer views[8];
    for (int i = 0; i < 8; i++) views[i].obj = NULL, views[i].buf = NULL;  /* None: NULL */
    int fits = 0;
    /* out (args[1]) sets the dtype and the size; the others must match it. */
    if (args[1] != Py_None && take(args[1], &views[0], 1, NULL, -1)
        && (strcmp(views[0].format, "f") == 0 || strcmp(views[0].format, "d") == 0)) {
        const char *format = views[0].format;
        Py_ssize_t len = views[0].len, n = len / views[0].itemsize;
        int bits = KERNELS[kernel].bits;
        const char *mask_format = bits ? "B" : "?";
        Py_ssize_t mask_len = bits ? (n + 7) / 8 : n;
        fits = take(args[2], &views[1], 0, format, len)
               && take(args[3], &views[2], 0, format, len)
               && take(args[4], &views[3], 0, format, len)
               && take(args[5], &views[4], 0, mask_format, mask_len)
               && take(args[6], &views[5], 1, format, len)
               && take(args[7], &views[6], 1, format, len)
               && take(args[8], &views[7], 1, mask_format, mask_len);
        if (fits && KERNELS[kernel].rows) {
            /* Whole rows: params[0] is the row length; blocks hold whole rows. */
            Py_ssize_t cols = (Py_ssize_t)params[0];
            fits = params[0] == (double)cols && cols > 0 && n % cols == 0;
            if (fits) block = (block + cols - 1) / cols * cols;
        }
        if (fits) {
            struct job j = {
                .fn = views[0].itemsize == 4 ? KERNELS[kernel].f32 : KERNELS[kernel].f64,
                .x = views[1].buf, .g = views[2].buf, .h = views[3].buf, .m_in = views[4].buf,
                .out = views[0].buf, .out2 = views[5].buf, .out3 = views[6].buf,
                .m_out = views[7].buf, .itemsize = views[0].itemsize, .n = n, .block = block,
                .blocks = (n + block - 1) / block, .bits = bits,
            };
            memcpy(j.params, params, sizeof params);
            /* The loops read and write only these buffers: other threads may run. */
            Py_BEGIN_ALLOW_THREADS
            if (threads < 2 || j.blocks < 2 || j.blocks > MAX_BLOCKS || !run_on_two_threads(&j))
                j.fn(j.x, j.g, j.h, j.m_in, j.out, j.out2, j.out3, j.m_out, j.params, n);
            Py_END_ALLOW_THREADS
        }
    }
    for (int i = 0; i < 8; i++)
        if (views[i].obj != NULL) PyBuffer_Release(&views[i]);
    return PyBool_FromLong(fits);
}

/* ---- Convolution: im2col and col2im, for Conv2d (layers/convolution.py) ----
 *
 * dims = (N, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW). im2col fills col, of
 * shape (C, kh, kw, N, OH, OW), from x (N, C, H, W), reading zeros outside the
 * image (the padding) without a padded copy; one block per row (c, p, q) of
 * col. col2im sums dcol, of col's shape, back into dx (N, C, H, W): one block
 * per channel c, whose N planes stay in cache while its kh kw rows of dcol
 * stream by, the kernel offsets added in the NumPy path's order (p, then q,
 * onto zeros), so the sums are bit for bit the same. */
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
            ptrdiff_t first = i1 > i0 ? i0 * OW + j0 : 0;                                  \
            ptrdiff_t last = i1 > i0 ? (i1 - 1) * OW + j1 : 0;                             \
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

/* The front that conv(), pool() and batchnorm() share: `nargs` must be `want`,
 * with `which` first, `threads` last and at `dims_at` a tuple of `ndims` ints,
 * read into j->dims. 0, with Python's error set (TypeError naming `usage`),
 * when the call is not so. */
static int read_call(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                     Py_ssize_t dims_at, Py_ssize_t ndims, const char *usage, long *which,
                     Py_ssize_t *threads, struct job *j) {
    if (nargs != want || !PyTuple_Check(args[dims_at]) || PyTuple_GET_SIZE(args[dims_at]) != ndims) {
        PyErr_SetString(PyExc_TypeError, usage);
        return 0;
    }
    *which = PyLong_AsLong(args[0]);
    *threads = PyLong_AsSsize_t(args[want - 1]);
    for (Py_ssize_t k = 0; k < ndims; k++)
        j->dims[k] = PyLong_AsSsize_t(PyTuple_GET_ITEM(args[dims_at], k));
    return !PyErr_Occurred();
}

/* Releases the views that take() filled (obj set), of n. */
static void release(Py_buffer *const *views, int n) {
    for (int k = 0; k < n; k++)
        if (views[k]->obj != NULL) PyBuffer_Release(views[k]);
}

/* Runs j's blocks without the GIL: on the caller and the worker where asked and
 * there are blocks to share, else one after the other. */
static void run_tasks(struct job *j, Py_ssize_t threads) {
    Py_BEGIN_ALLOW_THREADS
    if (threads < 2 || j->blocks < 2 || j->blocks > MAX_BLOCKS || !run_on_two_threads(j))
        for (ptrdiff_t b = 0; b < j->blocks; b++) j->task(j, b);
    Py_END_ALLOW_THREADS
}

/* ---- BatchNorm in training mode over NCHW images, for layers/normalization.py ----
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
 * its sums are float pairwise sums, these double ones. */
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

/* conv(which, src, dst, dims, threads) -> bool: im2col (which = 0, src x, dst col)
 * or col2im (which = 1, src dcol, dst dx) over C-contiguous float32 or float64
 * buffers of one format and the sizes dims implies; False, touching nothing,
 * when they are not. */
static PyObject *conv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* ---- Max pooling over disjoint windows without padding, for MaxPool2d (layers/pooling.py) ----
 *
 * dims = (N, C, H, W, kh, kw, sh, sw, OH, OW), strides at least the kernel, so a
 * pixel lies in at most one window. One block per plane (n, c). Forward: the
 * maximum as the NumPy path's chain of np.maximum takes it (m = m >= v or m is
 * NaN ? m : v: the first NaN propagates), and argmax, the offset p kw + q of the
 * first value equal to it (or of the first NaN): PyTorch's choice on ties.
 * Backward: each window's pixels get dout times (offset == argmax), as the NumPy
 * path's np.multiply(g, argmax == k) writes them (so -0.0 and NaN alike);
 * pixels in no window get 0. */
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
                        a[t] = gv[t] * (T)(won[t] == 0);                                  \
                        bb[t] = gv[t] * (T)(won[t] == 1);                                 \
                        c[t] = gv[t] * (T)(won[t] == 2);                                  \
                        e[t] = gv[t] * (T)(won[t] == 3);                                  \
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
                        w0[p * W + q] = gv * (T)(p * kw + q == won);                      \
            }                                                                             \
    }
POOL(float, f32)
POOL(double, f64)

/* pool(which, src, dst, argmax, dims, threads) -> bool: max pooling forward (which =
 * 0: src x, dst out, argmax written) or backward (1: src dout, argmax read, dst dx),
 * over C-contiguous float32 or float64 buffers of one format and uint8 argmax, of
 * the sizes dims implies; False, touching nothing, when they are not or when the
 * windows are not disjoint, whole and at most 256 pixels. */
static PyObject *pool(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* batchnorm(which, src, xhat, dst, stats, dims, eps, threads) -> bool: BatchNorm's
 * training forward (which = 0: src x, xhat and dst out written) or backward (1:
 * src dout, xhat read, dst dx), over C-contiguous float32 or float64 buffers of
 * one format: images of N C HW values, stats of C 5; False, touching nothing,
 * when they are not. */
static PyObject *batchnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* avx512(on) -> bool: whether the kernels with an AVX-512 path (the packed Relu, the
 * 2x2 max pooling) take it; `on` (None: leave it) switches it, for the tests of the
 * portable path.
 * It stays off where the CPU lacks AVX-512. */
static PyObject *avx512(PyObject *self, PyObject *on) {
    (void)self;
    if (on != Py_None) {
        int want = PyObject_IsTrue(on);
        if (want < 0) return NULL;
        use_avx512 = 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
        use_avx512 = want && __builtin_cpu_supports("avx512f");
#endif
    }
    return PyBool_FromLong(use_avx512);
}

/* worker_blocks() -> int: how many blocks the worker thread has run so far. */
static PyObject *get_worker_blocks(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyLong_FromLong(atomic_load(&worker_blocks));
}

static PyMethodDef methods[] = {
    {"avx512", avx512, METH_O,
     "avx512(on) -> bool: the kernels' AVX-512 paths (on=None: query)"},
    {"worker_blocks", get_worker_blocks, METH_NOARGS,
     "worker_blocks() -> int: blocks the worker thread has run so far"},
    {"conv", (PyCFunction)(void (*)(void))conv, METH_FASTCALL,
     "conv(which, src, dst, dims, threads) -> bool: im2col (0) or col2im (1)"},
    {"batchnorm", (PyCFunction)(void (*)(void))batchnorm, METH_FASTCALL,
     "batchnorm(which, src, xhat, dst, stats, dims, eps, threads) -> bool: BatchNorm training"},
    {"pool", (PyCFunction)(void (*)(void))pool, METH_FASTCALL,
     "pool(which, src, dst, argmax, dims, threads) -> bool: max pooling (0) or its gradient (1)"},
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(kernel, out, x, g, h, mask_in, out2, out3, mask_out, params, threads, block) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ckernels", "Fused activation kernels (see _ckernels.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ckernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    pthread_atfork(NULL, NULL, forget_worker);
    init_packed();
    PyObject *names = PyTuple_New(N_KERNELS);
    if (names == NULL) goto fail;
    for (Py_ssize_t i = 0; i < N_KERNELS; i++) {
        PyObject *name = PyUnicode_FromString(KERNELS[i].name);
        if (name == NULL) {
            Py_DECREF(names);
            goto fail;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    if (PyModule_AddObject(m, "NAMES", names) != 0) {
        Py_DECREF(names);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
