/* One decode step of a Llama-family model in float32, in one call: the CPU fast path for
 * decode steps of a few rows (tandem/runner/cpu_decode.py drives it; the model's PyTorch
 * forward, tandem/models/llama.py, is the spec it is tested against).
 *
 * A batch-1 decode step on CPU reads every weight once (85 MB for the embedded model) and
 * does little else, so it is bound by memory bandwidth, but through PyTorch each of its
 * ~70 ops costs a Python call, a dispatch and (for the matmuls) an OpenMP fork and join.
 * Here the whole step is one OpenMP parallel region:
 *
 *   every thread:  res = embed[id];  h = rmsnorm(res)          (its own copy of res and h)
 *   per layer:     qkv = h Wqkv^T                     split over output rows    | barrier
 *                  rotary(q, k); k, v -> cache slot   split over (row, kv head) | barrier
 *                  attention over the paged cache     split over (row, kv head) | barrier
 *                  delta = attn Wo^T                  split over output rows    | barrier
 *                  res += delta; h = rmsnorm(res)     every thread, redundantly
 *                  act = silu(h Wg^T) * (h Wu^T)      split over output rows    | barrier
 *                  delta = act Wd^T                   split over output rows    | barrier
 *                  res += delta; h = rmsnorm(res)     every thread, redundantly
 *   logits = h Wlm^T                                  split over vocabulary rows
 *
 * Norms and residual adds are recomputed by every thread instead of shared, which saves a
 * barrier each. Every row is a one-token query at its own position: rows may belong to one
 * sequence (speculative decoding's verify rows), since all of a step's K/V is in the cache
 * before any row attends.
 *
 * The matmuls run on the weights' packed panels (gemm.c, layers/cpu_gemm.py: the same
 * copy the PyTorch forward's linears use), each thread over its share of the panels and
 * every row against each panel, so at any row count the weights stream once a step; the
 * gate/up panels store silu(gate) * up directly.
 *
 * Layouts (row-major, contiguous): qkv_proj's outputs | q heads | k heads | v heads |,
 * gate_up_proj's | gate | up | (two segments, gemm.c); the embedding (vocab, hidden);
 * k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; cos/sin caches
 * [max_positions, head_dim] (both halves equal, rotate-half layout).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TANDEM_DECODE_MAX_GROUP 64
#define TANDEM_DECODE_MAX_HEAD_DIM 256
#define TANDEM_DECODE_MAX_BLOCK 256

typedef struct {
    int64_t num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size;
    int64_t vocab_size, block_size;
    float eps, attn_scale;
    const float *embed;      /* (vocab, hidden) */
    const float *final_norm; /* (hidden,) */
    const float *lm_head;    /* panels of (vocab, hidden) */
    const float *cos_cache, *sin_cache;
    /* per layer, num_layers pointers each; qkv, o_proj, gate_up, down are panels */
    const float *const *input_norm, *const *qkv, *const *o_proj, *const *post_norm;
    const float *const *gate_up, *const *down;
    float *const *k_cache, *const *v_cache;
} tandem_llama_f32;

/* Panels (gemm.c): [p0, p1) of a weight's segments of `seg` outputs, rows of x
 * ldx apart, into y (ldy apart); silu_mul pairs gate and up panels. */
void tandem_gemm_panels_f32(const float *wp, int64_t in, int64_t seg,
                            const float *x, int64_t ldx, int64_t rows, float *y, int64_t ldy,
                            int64_t p0, int64_t p1, int silu_mul);
int64_t tandem_panel_width(void);

/* This thread's share [*lo, *hi) of n panels. */
static void split(int64_t n, int nt, int t, int64_t *lo, int64_t *hi)
{
    const int64_t per = (n + nt - 1) / nt;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* res (+)= delta; h = weight * res / sqrt(mean(res^2) + eps), for each row. */
static void add_rms_norm(float *res, const float *delta, const float *weight, float *h,
                         int64_t rows, int64_t dim, float eps)
{
    for (int64_t r = 0; r < rows; ++r) {
        float *x = res + r * dim;
        if (delta != NULL)
            for (int64_t i = 0; i < dim; ++i) x[i] += delta[r * dim + i];
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; ++i) h[r * dim + i] = weight[i] * (x[i] * inv);
    }
}

/* x * cos + rotate_half(x) * sin, rotate_half(| a | b |) = | -b | a |. */
static void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t d)
{
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) {
        out[i] = x[i] * cos[i] - x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

/* One (row, kv head) item before attention: rotate the head's k and its group's q (q in
 * place in the row's qkv), store k and v at the row's slot. */
static void rotate_store_item(const tandem_llama_f32 *m, int64_t layer, float *qkv_row,
                              int64_t pos, int64_t slot, int64_t kh)
{
    const int64_t d = m->head_dim, group = m->num_heads / m->num_kv_heads;
    const int64_t token_stride = m->num_kv_heads * d;
    const float *cos = m->cos_cache + pos * d, *sin = m->sin_cache + pos * d;
    const float *k = qkv_row + (m->num_heads + kh) * d;
    const float *v = qkv_row + (m->num_heads + m->num_kv_heads + kh) * d;
    rotate(k, cos, sin, m->k_cache[layer] + slot * token_stride + kh * d, d);
    memcpy(m->v_cache[layer] + slot * token_stride + kh * d, v, (size_t)d * sizeof(float));
    float tmp[TANDEM_DECODE_MAX_HEAD_DIM];
    for (int64_t g = 0; g < group; ++g) {
        float *q = qkv_row + (kh * group + g) * d;
        rotate(q, cos, sin, tmp, d);
        memcpy(q, tmp, (size_t)d * sizeof(float));
    }
}

/* An item of attention: KV heads kh .. kh + nkh - 1 of a row, their groups' rotated
 * queries over the row's cached context (kernels/cpu/paged_decode.c, the same library). */
void tandem_attend_item_f32(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *table, int64_t len, int64_t kh, int64_t nkh,
                            int64_t group, int64_t num_kv_heads, int64_t head_dim,
                            int64_t block_size, float scale, float *o);
int64_t tandem_heads_per_item(int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                              int64_t threads);

static void attend_item(const tandem_llama_f32 *m, int64_t layer, const float *qkv_row,
                        const int32_t *table, int64_t len, int64_t kh, int64_t nkh,
                        float *out_row)
{
    const int64_t d = m->head_dim, group = m->num_heads / m->num_kv_heads;
    tandem_attend_item_f32(qkv_row + kh * group * d, m->k_cache[layer], m->v_cache[layer],
                           table, len, kh, nkh, group, m->num_kv_heads, d, m->block_size,
                           m->attn_scale, out_row + kh * group * d);
}

static size_t round64(size_t n) { return (n + 63) / 64 * 64; }

/* The first index of the largest of x[lo, hi), NaN counting as the largest (torch.argmax's
 * rule); -1 when the range is empty. */
static int64_t first_max(const float *x, int64_t lo, int64_t hi)
{
    if (lo >= hi) return -1;
    int64_t best = lo;
    float best_v = x[lo];
    if (best_v != best_v) return lo;
    for (int64_t i = lo + 1; i < hi; ++i) {
        const float v = x[i];
        if (v > best_v) {
            best_v = v;
            best = i;
        } else if (v != v) {
            return i;
        }
    }
    return best;
}

/* The step for `rows` sequences (one new token each): input_ids, positions, slots (rows,)
 * int64; block_tables (rows, bt_stride) int32; seq_lens (rows,) int32, the context length
 * after this token. Writes the token's K/V into every layer's cache and the logits
 * (rows, vocab) into `logits`. With `argmax_ids` (else NULL), also each row's greedy token:
 * the first maximum of its first `argmax_cols` logits, NaN the largest (torch.argmax), each
 * thread over its share of the vocabulary, then the shares in order. Returns 0, or -1 if
 * it refused the shapes (nothing done). */
int tandem_llama_decode_f32(const tandem_llama_f32 *m, int64_t rows, const int64_t *input_ids,
                            const int64_t *positions, const int64_t *slots,
                            const int32_t *block_tables, int64_t bt_stride,
                            const int32_t *seq_lens, float *logits, int num_threads,
                            int64_t argmax_cols, int64_t *argmax_ids)
{
    const int64_t dim = m->hidden_size, d = m->head_dim, inter = m->intermediate_size;
    const int64_t q_size = m->num_heads * d, qkv_size = q_size + 2 * m->num_kv_heads * d;
    const int64_t pw = tandem_panel_width();
#define panels(n) (((n) + pw - 1) / pw)
    if (rows < 1 || d > TANDEM_DECODE_MAX_HEAD_DIM
        || d % 2 || m->num_heads % m->num_kv_heads
        || m->num_heads / m->num_kv_heads > TANDEM_DECODE_MAX_GROUP
        || m->block_size > TANDEM_DECODE_MAX_BLOCK || num_threads < 1
        || (argmax_ids != NULL && (argmax_cols < 1 || argmax_cols > m->vocab_size)))
        return -1;
    /* shared: qkv (rows, qkv_size) | attn (rows, q_size) | act (rows, inter) |
     * delta (rows, dim); then per thread: res, h (rows, dim) each */
    const size_t shared[4] = {round64(rows * qkv_size * 4), round64(rows * q_size * 4),
                              round64(rows * inter * 4), round64(rows * dim * 4)};
    const size_t own = 2 * round64(rows * dim * 4);
    /* and each thread's argmax candidates (num_threads, rows) */
    const size_t cand = round64(num_threads * rows * 8);
    char *work = aligned_alloc(64, shared[0] + shared[1] + shared[2] + shared[3]
                                       + own * num_threads + cand);
    if (work == NULL) return -1;
    float *qkv = (float *)work, *attn = (float *)(work + shared[0]);
    float *act = (float *)(work + shared[0] + shared[1]);
    float *delta = (float *)(work + shared[0] + shared[1] + shared[2]);
    char *own_base = work + shared[0] + shared[1] + shared[2] + shared[3];
    int64_t *candidates = (int64_t *)(own_base + own * num_threads);
    for (int64_t i = 0; i < num_threads * rows; ++i)
        candidates[i] = -1;  /* a team smaller than asked leaves some unset */

    const int64_t nkh = tandem_heads_per_item(rows, m->num_kv_heads,
                                              m->num_heads / m->num_kv_heads, num_threads);
    const int64_t per_row = m->num_kv_heads / nkh;
#pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        float *res = (float *)(own_base + t * own);
        float *h = (float *)(own_base + t * own + own / 2);
        for (int64_t r = 0; r < rows; ++r)
            memcpy(res + r * dim, m->embed + input_ids[r] * dim, (size_t)dim * sizeof(float));
        add_rms_norm(res, NULL, m->input_norm[0], h, rows, dim, m->eps);
        int64_t lo, hi;
        for (int64_t layer = 0; layer < m->num_layers; ++layer) {
            split(panels(qkv_size), nt, t, &lo, &hi);
            tandem_gemm_panels_f32(m->qkv[layer], dim, qkv_size, h, dim, rows, qkv,
                                   qkv_size, lo, hi, 0);
#pragma omp barrier
            const int64_t items = rows * m->num_kv_heads;
            for (int64_t item = t; item < items; item += nt) {
                const int64_t r = item / m->num_kv_heads;
                rotate_store_item(m, layer, qkv + r * qkv_size, positions[r], slots[r],
                                  item % m->num_kv_heads);
            }
#pragma omp barrier
            /* items of one KV head or of all of a row's (tandem_heads_per_item), handed
             * out as threads come free: rows differ in length */
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < rows * per_row; ++item) {
                const int64_t r = item / per_row;
                attend_item(m, layer, qkv + r * qkv_size, block_tables + r * bt_stride,
                            seq_lens[r], item % per_row * nkh, nkh, attn + r * q_size);
            }
            split(panels(dim), nt, t, &lo, &hi);
            tandem_gemm_panels_f32(m->o_proj[layer], q_size, dim, attn, q_size, rows, delta,
                                   dim, lo, hi, 0);
#pragma omp barrier
            add_rms_norm(res, delta, m->post_norm[layer], h, rows, dim, m->eps);
            /* act = silu(gate) * up: this thread's share of the gate panels, each with
             * its up panel */
            split(panels(inter), nt, t, &lo, &hi);
            tandem_gemm_panels_f32(m->gate_up[layer], dim, inter, h, dim, rows, act, inter,
                                   lo, hi, 1);
#pragma omp barrier
            split(panels(dim), nt, t, &lo, &hi);
            tandem_gemm_panels_f32(m->down[layer], inter, dim, act, inter, rows, delta, dim,
                                   lo, hi, 0);
#pragma omp barrier
            add_rms_norm(res, delta,
                         layer + 1 < m->num_layers ? m->input_norm[layer + 1] : m->final_norm,
                         h, rows, dim, m->eps);
        }
        split(panels(m->vocab_size), nt, t, &lo, &hi);
        tandem_gemm_panels_f32(m->lm_head, dim, m->vocab_size, h, dim, rows, logits,
                               m->vocab_size, lo, hi, 0);
        if (argmax_ids != NULL) {  /* over this thread's columns */
            const int64_t c0 = lo * pw, c1 = hi * pw < argmax_cols ? hi * pw : argmax_cols;
            for (int64_t r = 0; r < rows; ++r)
                candidates[t * rows + r] = first_max(logits + r * m->vocab_size, c0, c1);
        }
    }
    if (argmax_ids != NULL)  /* the threads' shares ascend with t: keep the first maximum */
        for (int64_t r = 0; r < rows; ++r) {
            const float *row = logits + r * m->vocab_size;
            int64_t best = -1;
            for (int t = 0; t < num_threads; ++t) {
                const int64_t i = candidates[t * rows + r];
                const int nan_best = best >= 0 && row[best] != row[best];
                if (i >= 0 && !nan_best && (best < 0 || row[i] != row[i] || row[i] > row[best]))
                    best = i;
            }
            argmax_ids[r] = best;
        }
    free(work);
    return 0;
#undef panels
}
