/* Vectors for the CPU kernels: GCC/Clang vector extensions of the widest width the build
 * targets (16 floats with AVX-512, 8 with AVX, else 4), and an exp over them. */
#ifndef TANDEM_VEC_H
#define TANDEM_VEC_H
#include <stdint.h>

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4))); /* unaligned access */

/* a where mask (lanes of -1 or 0, a vector comparison's result), else b. */
static inline vf vsel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* exp(x) lane by lane: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' degree-7
 * polynomial, times 2^n built in the exponent bits. Within 2 ulp of expf for x in
 * [-87, 88]; inputs are clamped to [-87.3, 88.7] first, so exp(-inf) gives ~1e-38 rather
 * than 0 (callers that need the exact 0 use expf). NaN stays NaN. */
static inline vf vexp(vf x)
{
    const vf hi = (vf){0} + 88.7f, lo = (vf){0} + -87.3f;
    x = vsel(x > hi, hi, x);
    x = vsel(x < lo, lo, x);
    const vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi);
    vf fn = __builtin_convertvector(n, vf);
    const vi above = fn > t; /* truncation went up (t < 0): floor is one less */
    n += above;
    fn += __builtin_convertvector(above, vf);
    const vf r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = (n + 127) << 23;
    return p * (vf)bits;
}
#endif
