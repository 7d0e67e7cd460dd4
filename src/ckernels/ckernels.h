/*
 * What the files of scratchnn._ckernels share: the build switches, the job that
 * a call hands to the two threads, and the Python front every binding uses.
 *
 * The extension's files, one concept each:
 *   module.c       the module: its functions, the shared argument checks, the CPU switch
 *   threads.c      the caller and one worker thread sharing a call's blocks
 *   elementwise.c  one loop per activation and optimiser step, and run()
 *   softmax.c      Softmax by rows (with log-softmax), forward and backward
 *   relu_packed.c  Relu with its mask packed to one bit per element
 *   relu_stream.c  Relu's large outputs written with non-temporal stores
 *   convolution.c  im2col and col2im for Conv2d, and conv()
 *   pooling.c      max pooling over disjoint windows for MaxPool2d, and pool()
 *   batchnorm.c    BatchNorm's training pass over NCHW images, and batchnorm()
 *
 * Optional: setup.py builds these files as the extension module
 * scratchnn._ckernels when a C compiler and Python's headers are there, and
 * scratchnn/_fused.py calls it. Without it, or with SCRATCHNN_KERNELS=0,
 * every layer runs its NumPy passes, which stay the reference. The arrays come
 * in through the buffer protocol, so no NumPy header is needed either.
 * Inputs are never written; outputs are arrays from the caller (the
 * optimisers' steps update their parameter and state arrays in place).
 *
 * Only PyInit__ckernels is exported: setup.py compiles with -fvisibility=hidden,
 * so the names below stay inside the module.
 */
#ifndef SCRATCHNN_CKERNELS_H
#define SCRATCHNN_CKERNELS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stddef.h>

/* The math functions gcc may call from glibc's libmvec (SIMD exp, expm1, log1p,
 * tanh, erfc, within a few ulp) in a `#pragma omp simd` loop: gcc does so when
 * the scalar function is declared `omp declare simd`. */
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
/* gcc on x86-64: target_clones builds each hot loop for AVX-512, AVX2 and
 * baseline x86-64 and picks one at load time for the CPU it runs on, so a build
 * never uses an instruction the running CPU lacks; and the hand-written
 * AVX-512 paths (packed Relu, 2x2 max pooling) are compiled. */
#define HAVE_AVX512 1
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* 16 floats fill one AVX-512 register, two AVX2 ones; 16 doubles two and four. */
#define CHUNK 16

/* A kernel's scalar parameters: the layer's alpha or beta, or an optimiser's constants. */
#define NPARAMS 6

/* The C math function fn for float (F = f) or double (F empty). */
#define MATH(fn, F) fn##F

/* ---- The element-wise kernels (elementwise.c, softmax.c, relu_packed.c) ----
 *
 * Every one takes the same arguments, used or not: three inputs (x, dout and
 * one more kept array h), a mask input, three outputs (the optimisers' steps
 * read them too: parameter and state arrays), a mask output, NPARAMS scalars
 * and the number of elements. */
#define KERNEL_ARGS                                                                       \
    const void *vx, const void *vg, const void *vh, const void *vm_in, void *vout,        \
        void *vout2, void *vout3, void *vm_out, const double *params, ptrdiff_t n
typedef void (*kernel_fn)(KERNEL_ARGS);
/* name_f32 over floats and name_f64 over doubles */
#define DECLARE_KERNEL(name) void name##_f32(KERNEL_ARGS); void name##_f64(KERNEL_ARGS);
/* elementwise.c: the activations, forward and backward, and the optimisers' steps */
DECLARE_KERNEL(copy) DECLARE_KERNEL(sigmoid) DECLARE_KERNEL(sigmoid_grad)
DECLARE_KERNEL(tanh) DECLARE_KERNEL(tanh_grad) DECLARE_KERNEL(relu) DECLARE_KERNEL(relu_grad)
DECLARE_KERNEL(leaky_relu) DECLARE_KERNEL(leaky_relu_grad) DECLARE_KERNEL(slope_grad)
DECLARE_KERNEL(elu) DECLARE_KERNEL(softplus) DECLARE_KERNEL(softplus_grad)
DECLARE_KERNEL(silu) DECLARE_KERNEL(gelu_tanh) DECLARE_KERNEL(gelu)
DECLARE_KERNEL(sgd) DECLARE_KERNEL(adam)
/* softmax.c, relu_packed.c */
DECLARE_KERNEL(softmax) DECLARE_KERNEL(softmax_grad)
DECLARE_KERNEL(relu_packed) DECLARE_KERNEL(relu_packed_grad)
/* relu_stream.c and relu_packed.c: Relu with non-temporal stores, for arrays beyond the caches */
DECLARE_KERNEL(relu_stream) DECLARE_KERNEL(relu_grad_stream)
DECLARE_KERNEL(relu_packed_stream) DECLARE_KERNEL(relu_packed_stream_grad)
/* Fills the bit-reversal table of the packed Relu; once, when the module loads. */
void init_packed(void);
/* The kernels' names, in the order run() numbers them: a new tuple. */
PyObject *kernel_names(void);

/* ---- A call's work, as the two threads share it (threads.c) ---- */
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
/* The most blocks one call may have (the two ends are counted in 32 bits each). */
#define MAX_BLOCKS ((1LL << 31) - 1)
/* Runs j over its blocks on the caller and the worker; 0 if the worker is in
 * use or cannot be started (the caller then runs the job alone). */
int run_on_two_threads(const struct job *j);
/* Runs j's task over its blocks without the GIL, on two threads where asked. */
void run_tasks(struct job *j, Py_ssize_t threads);
/* Readies the worker's start in a forked child; once, when the module loads. */
void init_threads(void);
PyObject *get_worker_blocks(PyObject *self, PyObject *unused);

/* ---- The Python front (module.c) ---- */
/* Whether the AVX-512 paths run: the CPU has AVX-512 and the tests left them on. */
extern int use_avx512;
/* AVX512(call): runs call and is true where the AVX-512 path exists and the
 * CPU has it; false (nothing run) elsewhere. */
#ifdef HAVE_AVX512
#define AVX512(call) (use_avx512 ? ((call), 1) : 0)
#else
#define AVX512(call) 0
#endif
int take(PyObject *arg, Py_buffer *view, int writable, const char *format, Py_ssize_t size);
int read_call(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_ssize_t dims_at,
              Py_ssize_t ndims, const char *usage, long *which, Py_ssize_t *threads,
              struct job *j);
void release(Py_buffer *const *views, int n);

/* The module's functions, one per file that computes them. */
PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *conv(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *pool(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *batchnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
