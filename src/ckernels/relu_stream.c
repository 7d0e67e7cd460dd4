/*
 * Relu for arrays too large for the caches: the same values and mask as relu and
 * relu_grad (elementwise.c), with the float output (forward) and dx (backward)
 * written by non-temporal stores. An ordinary store first reads the line it writes
 * into the cache, so a Relu forward and backward moves 27 bytes per float element
 * where 18 must move; a non-temporal store writes the line without reading it, as
 * glibc's memcpy does above its own size threshold. For arrays that fit in the
 * caches this is slower (the next layer reads its input back from memory):
 * layers/activations.py chooses these kernels from a size up (_fused.STREAM_FROM).
 * Without AVX-512 they are relu and relu_grad themselves.
 */
#include "ckernels.h"

#include <stdint.h>

#ifdef HAVE_AVX512
#include <immintrin.h>

/* Elements before `out + i` is 64-byte aligned (a stream store needs it), at most n. */
static ptrdiff_t head(const void *out, size_t itemsize, ptrdiff_t n) {
    ptrdiff_t misaligned = (ptrdiff_t)((uintptr_t)out & 63);
    if (misaligned % (ptrdiff_t)itemsize) return n;  /* never aligned: all ordinary stores */
    ptrdiff_t k = misaligned ? (64 - misaligned) / (ptrdiff_t)itemsize : 0;
    return k < n ? k : n;
}

__attribute__((target("avx512f"))) static void relu_stream_avx512_f32(
    const float *x, float *out, unsigned char *mask, ptrdiff_t n) {
    ptrdiff_t i = 0, start = head(out, sizeof(float), n);
    for (; i < start; i++) mask[i] = x[i] <= 0, out[i] = x[i] <= 0 ? 0.0f : x[i];
    const __m512 zero = _mm512_setzero_ps();
    const __m512i one = _mm512_set1_epi32(1);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 m = _mm512_cmp_ps_mask(v, zero, _CMP_LE_OQ);  /* x <= 0, NaN not */
        _mm512_stream_ps(out + i, _mm512_mask_mov_ps(v, m, zero));
        _mm_storeu_si128((__m128i *)(mask + i), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(m, one)));
    }
    for (; i < n; i++) mask[i] = x[i] <= 0, out[i] = x[i] <= 0 ? 0.0f : x[i];
    _mm_sfence();  /* the stores are weakly ordered: visible before the call returns */
}

__attribute__((target("avx512f"))) static void relu_grad_stream_avx512_f32(
    const float *g, const unsigned char *mask, float *out, ptrdiff_t n) {
    ptrdiff_t i = 0, start = head(out, sizeof(float), n);
    for (; i < start; i++) out[i] = mask[i] ? 0.0f : g[i];
    for (; i + 16 <= n; i += 16) {
        __m512i m = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mask + i)));
        __mmask16 pass = _mm512_testn_epi32_mask(m, m);  /* mask 0: dout passes */
        _mm512_stream_ps(out + i, _mm512_maskz_mov_ps(pass, _mm512_loadu_ps(g + i)));
    }
    for (; i < n; i++) out[i] = mask[i] ? 0.0f : g[i];
    _mm_sfence();
}

__attribute__((target("avx512f"))) static void relu_stream_avx512_f64(
    const double *x, double *out, unsigned char *mask, ptrdiff_t n) {
    ptrdiff_t i = 0, start = head(out, sizeof(double), n);
    for (; i < start; i++) mask[i] = x[i] <= 0, out[i] = x[i] <= 0 ? 0.0 : x[i];
    const __m512d zero = _mm512_setzero_pd();
    const __m512i one = _mm512_set1_epi64(1);
    for (; i + 8 <= n; i += 8) {
        __m512d v = _mm512_loadu_pd(x + i);
        __mmask8 m = _mm512_cmp_pd_mask(v, zero, _CMP_LE_OQ);
        _mm512_stream_pd(out + i, _mm512_mask_mov_pd(v, m, zero));
        _mm_storel_epi64((__m128i *)(mask + i), _mm512_cvtepi64_epi8(_mm512_maskz_mov_epi64(m, one)));
    }
    for (; i < n; i++) mask[i] = x[i] <= 0, out[i] = x[i] <= 0 ? 0.0 : x[i];
    _mm_sfence();
}

__attribute__((target("avx512f"))) static void relu_grad_stream_avx512_f64(
    const double *g, const unsigned char *mask, double *out, ptrdiff_t n) {
    ptrdiff_t i = 0, start = head(out, sizeof(double), n);
    for (; i < start; i++) out[i] = mask[i] ? 0.0 : g[i];
    for (; i + 8 <= n; i += 8) {
        __m512i m = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(mask + i)));
        __mmask8 pass = _mm512_testn_epi64_mask(m, m);
        _mm512_stream_pd(out + i, _mm512_maskz_mov_pd(pass, _mm512_loadu_pd(g + i)));
    }
    for (; i < n; i++) out[i] = mask[i] ? 0.0 : g[i];
    _mm_sfence();
}

#endif

#define STREAM(T, SUFFIX)                                                                 \
    void relu_stream_##SUFFIX(KERNEL_ARGS) {                                              \
        if (AVX512(relu_stream_avx512_##SUFFIX(vx, vout, vm_out, n))) return;             \
        relu_##SUFFIX(vx, vg, vh, vm_in, vout, vout2, vout3, vm_out, params, n);          \
    }                                                                                     \
    void relu_grad_stream_##SUFFIX(KERNEL_ARGS) {                                         \
        if (AVX512(relu_grad_stream_avx512_##SUFFIX(vg, vm_in, vout, n))) return;         \
        relu_grad_##SUFFIX(vx, vg, vh, vm_in, vout, vout2, vout3, vm_out, params, n);     \
    }
STREAM(float, f32)
STREAM(double, f64)
