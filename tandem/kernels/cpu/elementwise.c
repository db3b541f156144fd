/* RMSNorm (with the residual add) and rotary embedding in float32 for the CPU backend:
 * kernels/cpu/elementwise.py calls them for the PyTorch forward's prefill and mixed steps,
 * where the reference's five to seven torch ops a call each read and write the whole
 * activation. The spec is kernels/reference/elementwise.py (tests/unit/test_cpu_elementwise.py).
 * Rows are split over num_threads OpenMP threads. */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

/* y = w * r / sqrt(mean(r^2) + eps), r = x (+ res_in, then stored to res_out), row by row;
 * x and res_in rows ldx apart, y and res_out contiguous rows of dim. */
void tandem_rms_norm_f32(const float *x, int64_t ldx, const float *res_in, float *res_out,
                         const float *w, float *y, int64_t rows, int64_t dim, float eps,
                         int num_threads)
{
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * ldx;
        float *yr = y + r * dim;
        float ss = 0.0f;
        if (res_in != NULL) {
            const float *ri = res_in + r * dim;
            float *ro = res_out + r * dim;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < dim; ++i) {
                const float v = xr[i] + ri[i];
                ro[i] = v;
                ss += v * v;
            }
            xr = ro;
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
        }
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* out = x * cos + rotate_half(x) * sin for each of `heads` heads of each row (rotate_half(|
 * a | b |) = | -b | a |); x rows ldx apart, heads head_dim apart; out contiguous (rows,
 * heads, head_dim); cos/sin (max_positions, head_dim) rows at positions[r]. */
static void rotate_rows(const int64_t *positions, const float *x, int64_t ldx, int64_t heads,
                        float *out, const float *cos, const float *sin, int64_t r,
                        int64_t head_dim)
{
    const int64_t half = head_dim / 2;
    const float *c = cos + positions[r] * head_dim, *s = sin + positions[r] * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
        const float *xh = x + r * ldx + h * head_dim;
        float *oh = out + (r * heads + h) * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
            oh[i] = xh[i] * c[i] - xh[i + half] * s[i];
            oh[i + half] = xh[i + half] * c[i + half] + xh[i] * s[i + half];
        }
    }
}

void tandem_rotary_f32(const int64_t *positions, const float *q, int64_t ldq, int64_t q_heads,
                       float *q_out, const float *k, int64_t ldk, int64_t k_heads,
                       float *k_out, const float *cos, const float *sin, int64_t rows,
                       int64_t head_dim, int num_threads)
{
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; ++r) {
        rotate_rows(positions, q, ldq, q_heads, q_out, cos, sin, r, head_dim);
        rotate_rows(positions, k, ldk, k_heads, k_out, cos, sin, r, head_dim);
    }
}
