/*
 * Relu with its mask packed to one bit per element, as np.packbits packs it (the
 * first element in the high bit, the last byte padded with zeros), for
 * Relu(packed=True) (layers/activations.py): an eighth of the bool mask's memory.
 */
#include "ckernels.h"

#include <stdint.h>
#include <string.h>

/* The portable kernels: the relu kernels (elementwise.c) run on pieces of PIECE
 * elements with a bool mask on the stack, which is packed (forward) or unpacked
 * (backward) beside them, in cache. */
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
 * or dout. The same values and bits as the portable code. */
static unsigned char REVERSED[256];  /* each byte with its bits in reverse order */

void init_packed(void) {
    for (int b = 0; b < 256; b++) {
        unsigned char r = 0;
        for (int k = 0; k < 8; k++) r |= (unsigned char)(((b >> k) & 1) << (7 - k));
        REVERSED[b] = r;
    }
}

#ifdef HAVE_AVX512
#include <immintrin.h>
/* Each loop runs whole vectors and the last partial one through the same body:
 * `live` masks the lanes past n out of every load, store and mask bit. With
 * `stream` (arrays beyond the caches, as relu_stream.c), a whole vector to a
 * 64-byte aligned address is written by a non-temporal store; the layer's
 * outputs from 1 MiB up start on a 64-byte boundary (scratchnn/_buffers.py),
 * so every whole vector is; elsewhere the ordinary stores stay. */
#define STORE_PS(p, live, full, v)                                                        \
    (stream && (live) == (full) && !((uintptr_t)(p) & 63) ? _mm512_stream_ps((p), (v))    \
                                                           : _mm512_mask_storeu_ps((p), (live), (v)))
#define STORE_PD(p, live, full, v)                                                        \
    (stream && (live) == (full) && !((uintptr_t)(p) & 63) ? _mm512_stream_pd((p), (v))    \
                                                           : _mm512_mask_storeu_pd((p), (live), (v)))
__attribute__((target("avx512f"))) static void relu_packed_avx512_f32(
    const float *x, float *out, unsigned char *bits, ptrdiff_t n, int stream) {
    const __m512 zero = _mm512_setzero_ps();
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(live, x + i);
        /* x <= 0, NaN not; the bits past n stay 0, as np.packbits pads */
        __mmask16 m = _mm512_cmp_ps_mask(v, zero, _CMP_LE_OQ) & live;
        STORE_PS(out + i, live, 0xffff, _mm512_mask_mov_ps(v, m, zero));
        bits[i / 8] = REVERSED[m & 0xff];
        if (n - i > 8) bits[i / 8 + 1] = REVERSED[m >> 8];
    }
}
__attribute__((target("avx512f"))) static void relu_packed_grad_avx512_f32(
    const float *g, float *out, const unsigned char *bits, ptrdiff_t n, int stream) {
    const __m512 zero = _mm512_setzero_ps();
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        unsigned high = n - i > 8 ? REVERSED[bits[i / 8 + 1]] : 0;
        __mmask16 m = (__mmask16)(REVERSED[bits[i / 8]] | high << 8);
        __m512 v = _mm512_maskz_loadu_ps(live, g + i);
        STORE_PS(out + i, live, 0xffff, _mm512_mask_mov_ps(v, m, zero));
    }
}
__attribute__((target("avx512f"))) static void relu_packed_avx512_f64(
    const double *x, double *out, unsigned char *bits, ptrdiff_t n, int stream) {
    const __m512d zero = _mm512_setzero_pd();
    for (ptrdiff_t i = 0; i < n; i += 8) {
        __mmask8 live = n - i >= 8 ? 0xff : (__mmask8)((1u << (n - i)) - 1);
        __m512d v = _mm512_maskz_loadu_pd(live, x + i);
        __mmask8 m = _mm512_cmp_pd_mask(v, zero, _CMP_LE_OQ) & live;
        STORE_PD(out + i, live, 0xff, _mm512_mask_mov_pd(v, m, zero));
        bits[i / 8] = REVERSED[m];
    }
}
__attribute__((target("avx512f"))) static void relu_packed_grad_avx512_f64(
    const double *g, double *out, const unsigned char *bits, ptrdiff_t n, int stream) {
    const __m512d zero = _mm512_setzero_pd();
    for (ptrdiff_t i = 0; i < n; i += 8) {
        __mmask8 live = n - i >= 8 ? 0xff : (__mmask8)((1u << (n - i)) - 1);
        __m512d v = _mm512_maskz_loadu_pd(live, g + i);
        STORE_PD(out + i, live, 0xff, _mm512_mask_mov_pd(v, REVERSED[bits[i / 8]], zero));
    }
}

#endif

/* The packed kernels, and (SUFFIX, STREAM) their streaming twins for large arrays. */
#define PACKED(T, SUFFIX, NAME, STREAM)                                                   \
    void relu_packed##NAME##_##SUFFIX(KERNEL_ARGS) {                                      \
        (void)vg, (void)vh, (void)vm_in, (void)vout2, (void)vout3;                        \
        const T *x = vx;                                                                  \
        T *out = vout;                                                                    \
        unsigned char bools[PIECE], *bits = vm_out;                                       \
        if (AVX512(relu_packed_avx512_##SUFFIX(x, out, bits, n, STREAM))) {              \
            if (STREAM) FENCE();                                                          \
            return;                                                                       \
        }                                                                                 \
        for (ptrdiff_t s = 0; s < n; s += PIECE) {                                        \
            ptrdiff_t len = n - s < PIECE ? n - s : PIECE;                                \
            relu_##SUFFIX(x + s, NULL, NULL, NULL, out + s, NULL, NULL, bools, params, len); \
            pack_bits(bools, bits + s / 8, len);                                          \
        }                                                                                 \
    }                                                                                     \
    void relu_packed##NAME##_grad_##SUFFIX(KERNEL_ARGS) {                                 \
        (void)vx, (void)vh, (void)vout2, (void)vout3, (void)vm_out;                       \
        const T *g = vg;                                                                  \
        T *out = vout;                                                                    \
        const unsigned char *bits = vm_in;                                                \
        unsigned char bools[PIECE];                                                       \
        if (AVX512(relu_packed_grad_avx512_##SUFFIX(g, out, bits, n, STREAM))) {         \
            if (STREAM) FENCE();                                                          \
            return;                                                                       \
        }                                                                                 \
        for (ptrdiff_t s = 0; s < n; s += PIECE) {                                        \
            ptrdiff_t len = n - s < PIECE ? n - s : PIECE;                                \
            unpack_bits(bits + s / 8, bools, len);                                        \
            relu_grad_##SUFFIX(NULL, g + s, NULL, bools, out + s, NULL, NULL, NULL, params,  \
                               len);                                                      \
        }                                                                                 \
    }
#ifdef HAVE_AVX512
/* The non-temporal stores are weakly ordered: visible before the call returns. */
#define FENCE() _mm_sfence()
#else
#define FENCE() ((void)0)
#endif
PACKED(float, f32, , 0)
PACKED(double, f64, , 0)
PACKED(float, f32, _stream, 1)
PACKED(double, f64, _stream, 1)

