/*
 * The module scratchnn._ckernels: its functions, the argument checks they share,
 * and the switch of the AVX-512 paths. What each file computes: ckernels.h.
 */
#include "ckernels.h"

#include <string.h>

int use_avx512;  /* set when the module loads; avx512() switches it for the tests */

/* Takes the buffer of `arg` if it is a C-contiguous array of `format` items
 * (any when NULL) with `size` bytes (any when negative), writable for
 * outputs: 1 when it fits or `arg` is None, 0 (holding nothing) when not. */
int take(PyObject *arg, Py_buffer *view, int writable, const char *format,
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

/* The front that conv(), pool() and batchnorm() share: `nargs` must be `want`,
 * with `which` first, `threads` last and at `dims_at` a tuple of `ndims` ints,
 * read into j->dims. 0, with Python's error set (TypeError naming `usage`),
 * when the call is not so. */
int read_call(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_ssize_t dims_at,
              Py_ssize_t ndims, const char *usage, long *which, Py_ssize_t *threads,
              struct job *j) {
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
void release(Py_buffer *const *views, int n) {
    for (int k = 0; k < n; k++)
        if (views[k]->obj != NULL) PyBuffer_Release(views[k]);
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
#ifdef HAVE_AVX512
        use_avx512 = want && __builtin_cpu_supports("avx512f");
#endif
    }
    return PyBool_FromLong(use_avx512);
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
    PyModuleDef_HEAD_INIT, "_ckernels", "scratchnn's compiled kernels (sources: src/ckernels/).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ckernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f");
#endif
    init_threads();
    init_packed();
    PyObject *names = kernel_names();
    if (names == NULL) goto fail;
    if (PyModule_AddObject(m, "NAMES", names) != 0) {
        Py_DECREF(names);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
