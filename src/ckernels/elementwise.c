/*
 * Element-wise kernels: one pass over memory where the NumPy path (the
 * reference) makes 4 to 50. Each activation's forward and backward
 * (layers/activations.py) and the SGD and Adam steps (optim.py); and run(), the
 * module function that calls them and the row and packed kernels (softmax.c,
 * relu_packed.c), on two threads when large (threads.c).
 *
 * Why it is written the way it is:
 * - The exponentials come from glibc's libmvec (declared in ckernels.h). No
 *   -ffast-math: NaN, infinities and signed zeros must come out as in the
 *   NumPy path.
 * - Each chunk loop is built for AVX-512, AVX2 and baseline x86-64 (CLONES),
 *   and the CPU that runs it picks its variant.
 * - Every element goes through the same vector code: the loops run over
 *   fixed chunks of CHUNK elements, and the last partial chunk is copied into
 *   a zero-padded buffer and run through the same chunk code. A scalar
 *   remainder loop would call libm's scalar exp for a few elements, which can
 *   round differently; then a block boundary could change a result, and
 *   the blocks of a two-thread call must give the one-call result bit for bit.
 */
#include "ckernels.h"

#include <string.h>

/* The chunk loops' typed arguments (KERNEL_ARGS in ckernels.h, typed); of the
 * NPARAMS scalars ps, p = ps[0] is the layer's alpha or beta. */
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
 * point, the kernel that run() calls, need not be. Unused arguments (NULL)
 * point at `out` instead, which is never read through them: the pointer
 * arithmetic stays defined.
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
    void name##_##SUFFIX(KERNEL_ARGS) {                                                   \
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

/* LeakyRelu(alpha = p): the mask !(x > 0) (x <= 0, or NaN: its slope is alpha, as
 * PyTorch's) and x or alpha x; backward dout or alpha dout. */
#define leaky_relu_BODY(T, F) m_out[i] = !(x[i] > 0); out[i] = x[i] > 0 ? x[i] : p * x[i];
#define leaky_relu_grad_BODY(T, F) out[i] = g[i] * (m_in[i] ? p : (T)1);
BOTH(leaky_relu)
BOTH(leaky_relu_grad)

/* The layers that keep their slope dy/dx (Elu, Silu, Gelu) compute it in the
 * forward pass, into out2, beside the output; backward is then dout times it. */
#define slope_grad_BODY(T, F) out[i] = g[i] * x[i];
BOTH(slope_grad)

/* Elu(alpha = p): max(x, 0) + alpha expm1(min(x, 0)); slope alpha exp(x) where x <= 0,
 * else 1 (NaN included, as PyTorch's). exp only of the non-positive part, which cannot
 * overflow. */
#define elu_BODY(T, F)                                                                    \
    T lo = x[i] > 0 ? (T)0 : x[i];                                                        \
    out[i] = (x[i] > 0 ? x[i] : (T)0) + p * MATH(expm1, F)(lo);                           \
    out2[i] = x[i] <= 0 ? p * MATH(exp, F)(lo) : (T)1;
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
/* functional.py's constants for the double Phi and phi (see GELU_PHI_). */
#define SQRT_HALF 0.7071067811865476
#define SQRT_HALF_LOW (-4.833646656726457e-17)
#define MINUS_SQRT_HALF_HIGH (-0.7071067839860916)
#define MINUS_SQRT_HALF_LOW 2.7995440410322203e-09
#define TWO_OVER_SQRT_PI 1.1283791670955126
#define INV_SQRT_2PI 0.3989422804014327

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
 * phi(x) = exp(-x^2/2) / sqrt(2 pi), |x| clipped at 40, where phi is 0 in float64.
 * GELU_PHI_##F computes cdf = Phi(x) and pdf = phi(x): GELU_PHI_ in double, GELU_PHI_f
 * in float. */
#define gelu_BODY(T, F)                                                                   \
    GELU_PHI_##F(T)                                                                       \
    out[i] = x[i] * cdf;                                                                  \
    out2[i] = cdf + x[i] * pdf;
/* In double, -x / sqrt 2 and x^2 are carried to twice the precision (Dekker's exact
 * products, sqrt(1/2)'s own rounding), their low parts entering by the first-order terms:
 * rounding them alone put Phi 1,857 ulps off at x = -37 and phi 700 off at x = -38. One
 * exponential serves both: the correction's exp(-h^2), h = -x / sqrt 2 rounded, is phi's
 * exp(-x^2 / 2) to within rounding, far below what a term of 1e-13 of Phi needs (the NumPy
 * path, functional.ncdf and npdf, computes each on its own). */
#define GELU_PHI_(T)                                                                      \
    T a = fabs(x[i]);                                                                     \
    a = a > 40 ? 40.0 : a;                                                                \
    T square = a * a;                                                                     \
    T a_big = a * 134217729.0;                                                            \
    T a_high = a_big - (a_big - a), a_low = a - a_high;                                   \
    T square_low = a_high * a_high - square;                                              \
    square_low += 2.0 * (a_high * a_low);                                                 \
    square_low += a_low * a_low;                                                          \
    T E = exp(square * -0.5) * (1.0 - 0.5 * square_low); /* exp(-x^2/2), = exp(-h^2) */  \
    T pdf = E * INV_SQRT_2PI;                                                             \
    T c = x[i] < -40 ? -40.0 : (x[i] > 40 ? 40.0 : x[i]);                                 \
    T high = c * -SQRT_HALF;                                                              \
    T c_big = c * 134217729.0;                                                            \
    T c_high = c_big - (c_big - c), c_low = c - c_high;                                   \
    T low = c_high * MINUS_SQRT_HALF_HIGH - high;                                         \
    low += c_high * MINUS_SQRT_HALF_LOW;                                                  \
    low += c_low * MINUS_SQRT_HALF_HIGH;                                                  \
    low += c_low * MINUS_SQRT_HALF_LOW;                                                   \
    low -= c * SQRT_HALF_LOW;                                                             \
    T cdf = (erfc(x[i] * -SQRT_HALF) - E * low * TWO_OVER_SQRT_PI) * 0.5;
/* In float32, one exponential serves Phi and phi: libmvec's erfcf took 1 ns an element
 * on a Zen 4 core, three times its expf. erfc(y) = exp(-y^2) R(y) for y = |x| / sqrt 2 >= 0,
 * R Cody's middle-interval rational (functional.py's coefficients, Horner as _rational
 * there: within 5e-10 of erfc up to y = 10.5, beyond which exp(-y^2) is 0 in float32),
 * and exp(-y^2) = exp(-x^2 / 2) exactly: x^2 split as s + e, exp(-s/2) (1 - e/2), so that
 * the left tail keeps its relative accuracy (s alone is off by up to 2^-24 s, 100 ulps of
 * the exponential at |x| = 14). e is Dekker's exact product error, from |x| split into
 * two 12-bit halves (no fma: the AVX2 clone may run where there is none).
 * erfc(-y) = 2 - erfc(y). The NumPy path (activations._gelu_one_exponential) computes the
 * same, operation for operation. */
#define GELU_PHI_f(T)                                                                     \
    T a = fabsf(x[i]);                                                                    \
    a = a > 40 ? 40.0f : a;                                                               \
    T s = a * a;                                                                          \
    T big = a * 4097.0f;                                                                  \
    T hi = big - (big - a), lo = a - hi;                                                  \
    T e = ((hi * hi - s) + hi * lo * 2.0f) + lo * lo;                                     \
    T E = expf(s * -0.5f) * (1.0f - e * 0.5f);                                            \
    T y = a * (T)ONE_OVER_SQRT_2;                                                         \
    T num = y * (T)2.15311535474403846e-8 + (T)5.64188496988670089e-1;                   \
    num = num * y + (T)8.88314979438837594e00;                                            \
    num = num * y + (T)6.61191906371416295e01;                                            \
    num = num * y + (T)2.98635138197400131e02;                                            \
    num = num * y + (T)8.81952221241769090e02;                                            \
    num = num * y + (T)1.71204761263407058e03;                                            \
    num = num * y + (T)2.05107837782607147e03;                                            \
    num = num * y + (T)1.23033935479799725e03;                                            \
    T den = y + (T)1.57449261107098347e01;                                                \
    den = den * y + (T)1.17693950891312499e02;                                            \
    den = den * y + (T)5.37181101862009858e02;                                            \
    den = den * y + (T)1.62138957456669019e03;                                            \
    den = den * y + (T)3.29079923573345963e03;                                            \
    den = den * y + (T)4.36261909014324716e03;                                            \
    den = den * y + (T)3.43936767414372164e03;                                            \
    den = den * y + (T)1.23033935480374942e03;                                            \
    T half_tail = E * (num / den) * 0.5f; /* erfc(|x| / sqrt 2) / 2 */                    \
    T cdf = x[i] < 0 ? half_tail : 1.0f - half_tail;                                      \
    T pdf = E / (T)SQRT_2_PI;
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

/* ---- The module function run() ---- */

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
    BITWISE(relu_packed), BITWISE(relu_packed_grad), ROW(relu_stream), ROW(relu_grad_stream),
    BITWISE(relu_packed_stream), BITWISE(relu_packed_stream_grad),
};
#define N_KERNELS ((Py_ssize_t)(sizeof(KERNELS) / sizeof(KERNELS[0])))

/* run(kernel, out, x, g, h, mask_in, out2, out3, mask_out, params, threads, block)
 * -> bool: False, touching nothing, when an array is not what the kernel takes
 * (another dtype, not C-contiguous, another size); then the caller runs NumPy.
 * params is a tuple of up to NPARAMS floats. With threads = 2 and more than
 * `block` elements, the caller and the worker share the blocks (threads.c);
 * `block` is rounded up to a multiple of CHUNK. */
PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

PyObject *kernel_names(void) {
    PyObject *names = PyTuple_New(N_KERNELS);
    if (names == NULL) return NULL;
    for (Py_ssize_t i = 0; i < N_KERNELS; i++) {
        PyObject *name = PyUnicode_FromString(KERNELS[i].name);
        if (name == NULL) {
            Py_DECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    return names;
}
