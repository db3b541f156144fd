/* Float32 matrix products y = x W^T for the CPU backend, on weights packed once into
 * panels: the linear layers' matmul (layers/cpu_gemm.py, `tandem_linear_f32`) and the
 * fused decode step's (decode_step.c, `tandem_gemm_panels_f32` inside its own parallel
 * region). The spec is torch.nn.functional.linear (tests/unit/test_cpu_gemm.py).
 *
 * Panel layout (layers/cpu_gemm.py `pack_panels` writes it): W (out, in) is cut into
 * panels of PW consecutive output rows, each stored transposed, (in, PW) row-major, so one
 * step along `in` reads PW weights from one contiguous run. A weight made of `nseg` equal
 * segments (gate | up of a merged MLP projection) pads each segment to whole panels, so
 * panel p of the gate and panel p of the up segment hold the same output columns; padding
 * weights are zero.
 *
 * The kernel is an outer product: a tile of TR input rows x one panel keeps TR * 2 vector
 * accumulators; per step along `in` it loads the panel's two vectors and broadcasts one x
 * value per row (2 + TR loads for 2 * TR fused multiply-adds), and stores whole vectors at
 * the end: no sum across lanes. A panel (in x PW floats) stays in L1/L2 while every row
 * tile passes it, so W streams from memory once per call. One row is the batch-1 decode
 * case: a single sequential stream per thread, two accumulator pairs to cover the FMA
 * latency, bound by memory bandwidth as it should be.
 *
 * Measured on the 2-core AVX-512 box (Zen 5): 480-490 GFLOP/s at 48 rows x K 512, about
 * the two cores' FMA peak; oneDNN's reordered-weight kernels 380-480, MKL (`F.linear`)
 * 120-200.
 *
 * Vectors (vec.h) are GCC/Clang vector extensions of the widest width the build targets:
 * 16 floats with AVX-512 (32 registers: TR 12), 8 with AVX, 4 otherwise (16 registers:
 * TR 6).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

#if VL == 16
#define TR 12
#else
#define TR 6
#endif
#define PW (2 * VL)

int64_t tandem_panel_width(void) { return PW; }

/* Ask for the cache lines of `n` panel rows (n * PW floats from p). */
static inline __attribute__((always_inline)) void prefetch_rows(const float *p, int n)
{
    for (int j = 0; j < n * PW; j += 16) __builtin_prefetch(p + j);
}

/* acc[i] (two vectors each) = x row i (i < n, rows ldx apart) times the panel wp, over
 * `in`. n is a constant at every call, so the loops unroll and acc stays in registers.
 * pf (or NULL): the next panel, fetched into the caches alongside (one step's worth of
 * it per step), so a pass that streams W from memory does not wait at each panel. */
static inline __attribute__((always_inline)) void tile(const int n, const float *wp,
                                                       int64_t in, const float *x,
                                                       int64_t ldx, vf acc[][2],
                                                       const float *pf)
{
    for (int i = 0; i < n; ++i) acc[i][0] = acc[i][1] = (vf){0};
    if (n == 1) { /* two pairs of chains over even and odd steps: FMA latency covered */
        vf b0 = (vf){0}, b1 = (vf){0};
        int64_t k = 0;
        for (; k + 2 <= in; k += 2) {
            if (pf != NULL) prefetch_rows(pf + k * PW, 2);
            acc[0][0] += *(const vfu *)(wp + k * PW) * x[k];
            acc[0][1] += *(const vfu *)(wp + k * PW + VL) * x[k];
            b0 += *(const vfu *)(wp + (k + 1) * PW) * x[k + 1];
            b1 += *(const vfu *)(wp + (k + 1) * PW + VL) * x[k + 1];
        }
        for (; k < in; ++k) {
            acc[0][0] += *(const vfu *)(wp + k * PW) * x[k];
            acc[0][1] += *(const vfu *)(wp + k * PW + VL) * x[k];
        }
        acc[0][0] += b0;
        acc[0][1] += b1;
        return;
    }
    for (int64_t k = 0; k < in; ++k) {
        const vf w0 = *(const vfu *)(wp + k * PW), w1 = *(const vfu *)(wp + k * PW + VL);
        if (pf != NULL) prefetch_rows(pf + k * PW, 1);
        for (int i = 0; i < n; ++i) {
            const float b = x[i * ldx + k];
            acc[i][0] += w0 * b;
            acc[i][1] += w1 * b;
        }
    }
}

/* Store a tile: columns [0, valid) of each of its n rows at y + i * ldy. */
static inline __attribute__((always_inline)) void store(const int n, vf acc[][2],
                                                        float *y, int64_t ldy, int valid)
{
    for (int i = 0; i < n; ++i) {
        float *yi = y + i * ldy;
        if (valid == PW) {
            *(vfu *)yi = acc[i][0];
            *(vfu *)(yi + VL) = acc[i][1];
        } else {
            float tmp[PW];
            memcpy(tmp, &acc[i][0], VL * 4);
            memcpy(tmp + VL, &acc[i][1], VL * 4);
            memcpy(yi, tmp, (size_t)valid * 4);
        }
    }
}

/* act = silu(gate) * up for a tile's n rows, `valid` columns, at y + i * ldy. */
static inline __attribute__((always_inline)) void store_silu_mul(const int n, vf g[][2],
                                                                 vf u[][2], float *y,
                                                                 int64_t ldy, int valid)
{
    vf act[TR][2];
    for (int i = 0; i < n; ++i)
        for (int h = 0; h < 2; ++h) act[i][h] = g[i][h] / (1.0f + vexp(-g[i][h])) * u[i][h];
    store(n, act, y, ldy, valid);
}

/* Rows r..r+n of one panel (or, with `up`, a gate panel and its up panel). */
static inline __attribute__((always_inline)) void rows_n(const int n, const float *wp,
                                                         const float *up, int64_t in,
                                                         const float *x, int64_t ldx,
                                                         float *y, int64_t ldy, int valid,
                                                         int fetch)
{
    vf acc[TR][2];
    tile(n, wp, in, x, ldx, acc, fetch ? wp + in * PW : NULL);
    if (up == NULL) {
        store(n, acc, y, ldy, valid);
    } else {
        vf acc_up[TR][2];
        tile(n, up, in, x, ldx, acc_up, fetch ? up + in * PW : NULL);
        store_silu_mul(n, acc, acc_up, y, ldy, valid);
    }
}

/* Every row against one panel: TR rows at a time, then the rest in one tile; the first tile also
 * fetches the next panel when `fetch`. */
static void panel_all_rows(const float *wp, const float *up, int64_t in, const float *x,
                           int64_t ldx, int64_t rows, float *y, int64_t ldy, int valid,
                           int fetch)
{
    int64_t r = 0;
#define TANDEM_ROWS(n)                                                                   \
    do {                                                                                 \
        rows_n(n, wp, up, in, x + r * ldx, ldx, y + r * ldy, ldy, valid, fetch && r == 0); \
        r += n;                                                                          \
    } while (0)
    while (r + TR <= rows) TANDEM_ROWS(TR);
    switch (rows - r) { /* the last rows in one tile */
#if TR > 6
    case 11: TANDEM_ROWS(11); break;
    case 10: TANDEM_ROWS(10); break;
    case 9: TANDEM_ROWS(9); break;
    case 8: TANDEM_ROWS(8); break;
    case 7: TANDEM_ROWS(7); break;
    case 6: TANDEM_ROWS(6); break;
#endif
    case 5: TANDEM_ROWS(5); break;
    case 4: TANDEM_ROWS(4); break;
    case 3: TANDEM_ROWS(3); break;
    case 2: TANDEM_ROWS(2); break;
    case 1: TANDEM_ROWS(1); break;
    default: break;
    }
#undef TANDEM_ROWS
}

/* Panels [p0, p1) of a packed weight of segments of `seg` outputs each, against
 * `rows` rows of x (ldx apart), on the calling thread: y[r * ldy + c] for the panels'
 * output columns c. silu_mul (two segments): p0, p1 count gate panels; each is paired
 * with its up panel and y gets silu(gate) * up, `seg` columns wide. */
void tandem_gemm_panels_f32(const float *wp, int64_t in, int64_t seg,
                            const float *x, int64_t ldx, int64_t rows, float *y, int64_t ldy,
                            int64_t p0, int64_t p1, int silu_mul)
{
    const int64_t pps = (seg + PW - 1) / PW; /* panels per segment */
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t s = p / pps, col = (p % pps) * PW;
        const int valid = seg - col < PW ? (int)(seg - col) : PW;
        const float *panel = wp + p * in * PW;
        const float *up = silu_mul ? wp + (p + pps) * in * PW : NULL;
        panel_all_rows(panel, up, in, x, ldx, rows, y + s * seg + col, ldy, valid, p + 1 < p1);
    }
}

/* y (rows, nseg * seg) = x (rows, in) W^T (+ bias), x and y contiguous, W packed, on
 * num_threads OpenMP threads; with silu_mul (nseg 2, no bias) y is (rows, seg),
 * silu(gate) * up. Items are (row block, panel block) pairs, row blocks outermost, split
 * statically so a thread walks its items in order; a row block (rows x in floats) stays
 * within half of a 1 MB L2 while its panels pass it. One row block: the panels are split
 * evenly over the threads. */
void tandem_linear_f32(const float *x, int64_t rows, int64_t in, const float *wp,
                       int64_t seg, int64_t nseg, const float *bias, float *y,
                       int num_threads, int silu_mul)
{
    const int64_t pps = (seg + PW - 1) / PW, out = silu_mul ? seg : seg * nseg;
    const int64_t panels = silu_mul ? pps : nseg * pps; /* gate panels only with silu_mul */
    /* row blocks of at most 128 Ki floats (512 KB), as even as whole tiles allow */
    int64_t most = (128 * 1024) / (in > 0 ? in : 1) / TR * TR;
    if (most < TR) most = TR;
    const int64_t nrb = (rows + most - 1) / most;
    const int64_t rb = ((rows + nrb - 1) / nrb + TR - 1) / TR * TR;
    int64_t pb = nrb == 1 ? (panels + num_threads - 1) / num_threads : 4;
    if (pb < 1) pb = 1;
    const int64_t npb = (panels + pb - 1) / pb, items = nrb * npb;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t r0 = (item / npb) * rb, p0 = (item % npb) * pb;
        const int64_t r1 = r0 + rb < rows ? r0 + rb : rows, p1 = p0 + pb < panels ? p0 + pb : panels;
        if (r0 >= r1) continue;
        tandem_gemm_panels_f32(wp, in, seg, x + r0 * in, in, r1 - r0, y + r0 * out, out,
                               p0, p1, silu_mul);
        if (bias != NULL && !silu_mul)
            for (int64_t p = p0; p < p1; ++p) {
                const int64_t c0 = (p / pps) * seg + (p % pps) * PW;
                const int64_t c1 = c0 + PW < (p / pps + 1) * seg ? c0 + PW : (p / pps + 1) * seg;
                for (int64_t r = r0; r < r1; ++r)
                    for (int64_t c = c0; c < c1; ++c) y[r * out + c] += bias[c];
            }
    }
}
