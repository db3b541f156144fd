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
 * Layouts (row-major, contiguous): weights (out_features, in_features) as PyTorch stores
 * them; qkv_proj rows | q heads | k heads | v heads |; gate_up_proj rows | gate | up |;
 * k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; cos/sin caches
 * [max_positions, head_dim] (both halves equal, rotate-half layout).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TANDEM_DECODE_MAX_ROWS 8
#define TANDEM_DECODE_MAX_GROUP 64
#define TANDEM_DECODE_MAX_HEAD_DIM 256
#define TANDEM_DECODE_MAX_BLOCK 256

typedef struct {
    int64_t num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size;
    int64_t vocab_size, block_size;
    float eps, attn_scale;
    const float *embed;      /* (vocab, hidden) */
    const float *final_norm; /* (hidden,) */
    const float *lm_head;    /* (vocab, hidden); the embedding when tied */
    const float *cos_cache, *sin_cache;
    /* per layer, num_layers pointers each */
    const float *const *input_norm, *const *qkv, *const *o_proj, *const *post_norm;
    const float *const *gate_up, *const *down;
    float *const *k_cache, *const *v_cache;
} tandem_llama_f32;

/* This thread's share [*lo, *hi) of n output rows, in multiples of 8. */
static void split_rows(int64_t n, int nt, int t, int64_t *lo, int64_t *hi)
{
    int64_t per = ((n + nt - 1) / nt + 7) / 8 * 8;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* y[r * ldy + o] = w[o, :] . x[r * in + :] for o in [lo, hi), r < rows. Eight weight rows
 * at a time (eight independent sums, eight streams in flight: 28-29 GB/s on this 2-core
 * box against 24-28 with four), then four, then one; the later input rows re-read them
 * from L1. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v)
{
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(_mm_hadd_ps(a, a));
}
#endif

static void gemv(const float *w, int64_t in, const float *x, int64_t rows, float *y,
                 int64_t ldy, int64_t lo, int64_t hi)
{
    int64_t o = lo;
#if defined(__AVX2__) && defined(__FMA__)
    if (in % 8 == 0)
        for (; o + 8 <= hi; o += 8) {
            const float *w0 = w + o * in;
            for (int64_t r = 0; r < rows; ++r) {
                const float *xr = x + r * in;
                __m256 a[8];
                for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
                for (int64_t i = 0; i < in; i += 8) {
                    const __m256 xv = _mm256_loadu_ps(xr + i);
                    for (int j = 0; j < 8; ++j)
                        a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j * in + i), xv, a[j]);
                }
                float *yr = y + r * ldy + o;
                for (int j = 0; j < 8; ++j) yr[j] = hsum8(a[j]);
            }
        }
    if (in % 8 == 0)
        for (; o + 4 <= hi; o += 4) {
            const float *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
            for (int64_t r = 0; r < rows; ++r) {
                const float *xr = x + r * in;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                for (int64_t i = 0; i < in; i += 8) {
                    const __m256 xv = _mm256_loadu_ps(xr + i);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
                }
                float *yr = y + r * ldy + o;
                yr[0] = hsum8(a0), yr[1] = hsum8(a1), yr[2] = hsum8(a2), yr[3] = hsum8(a3);
            }
        }
#endif
    for (; o + 4 <= hi; o += 4) {
        const float *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        for (int64_t r = 0; r < rows; ++r) {
            const float *xr = x + r * in;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t i = 0; i < in; ++i) {
                a0 += w0[i] * xr[i];
                a1 += w1[i] * xr[i];
                a2 += w2[i] * xr[i];
                a3 += w3[i] * xr[i];
            }
            float *yr = y + r * ldy + o;
            yr[0] = a0, yr[1] = a1, yr[2] = a2, yr[3] = a3;
        }
    }
    for (; o < hi; ++o)
        for (int64_t r = 0; r < rows; ++r) {
            const float *wo = w + o * in, *xr = x + r * in;
            float a = 0.0f;
#pragma omp simd reduction(+ : a)
            for (int64_t i = 0; i < in; ++i) a += wo[i] * xr[i];
            y[r * ldy + o] = a;
        }
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

/* One (row, KV head) item of attention: the group's rotated queries over the row's cached
 * context (kernels/cpu/paged_decode.c, the same library). */
void tandem_attend_item_f32(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *table, int64_t len, int64_t kh, int64_t group,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                            float scale, float *o);

static void attend_item(const tandem_llama_f32 *m, int64_t layer, const float *qkv_row,
                        const int32_t *table, int64_t len, int64_t kh, float *out_row)
{
    const int64_t d = m->head_dim, group = m->num_heads / m->num_kv_heads;
    tandem_attend_item_f32(qkv_row + kh * group * d, m->k_cache[layer], m->v_cache[layer],
                           table, len, kh, group, m->num_kv_heads, d, m->block_size,
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
    if (rows < 1 || rows > TANDEM_DECODE_MAX_ROWS || d > TANDEM_DECODE_MAX_HEAD_DIM
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
            split_rows(qkv_size, nt, t, &lo, &hi);
            gemv(m->qkv[layer], dim, h, rows, qkv, qkv_size, lo, hi);
#pragma omp barrier
            const int64_t items = rows * m->num_kv_heads;
            for (int64_t item = t; item < items; item += nt) {
                const int64_t r = item / m->num_kv_heads;
                rotate_store_item(m, layer, qkv + r * qkv_size, positions[r], slots[r],
                                  item % m->num_kv_heads);
            }
#pragma omp barrier
            for (int64_t item = t; item < items; item += nt) {
                const int64_t r = item / m->num_kv_heads;
                attend_item(m, layer, qkv + r * qkv_size, block_tables + r * bt_stride,
                            seq_lens[r], item % m->num_kv_heads, attn + r * q_size);
            }
#pragma omp barrier
            split_rows(dim, nt, t, &lo, &hi);
            gemv(m->o_proj[layer], q_size, attn, rows, delta, dim, lo, hi);
#pragma omp barrier
            add_rms_norm(res, delta, m->post_norm[layer], h, rows, dim, m->eps);
            /* gate rows [0, inter), up rows [inter, 2 inter): this thread's share of both,
             * then silu(gate) * up in place of its gate outputs */
            split_rows(inter, nt, t, &lo, &hi);
            const float *gu = m->gate_up[layer];
            for (int64_t o = lo; o < hi; o += 8) {
                const int64_t n = hi - o < 8 ? hi - o : 8;
                float gate[TANDEM_DECODE_MAX_ROWS * 8], up[TANDEM_DECODE_MAX_ROWS * 8];
                gemv(gu + o * dim, dim, h, rows, gate, 8, 0, n);  /* (rows, 8) */
                gemv(gu + (inter + o) * dim, dim, h, rows, up, 8, 0, n);
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t j = 0; j < n; ++j) {
                        const float g = gate[r * 8 + j];
                        act[r * inter + o + j] = g / (1.0f + expf(-g)) * up[r * 8 + j];
                    }
            }
#pragma omp barrier
            split_rows(dim, nt, t, &lo, &hi);
            gemv(m->down[layer], inter, act, rows, delta, dim, lo, hi);
#pragma omp barrier
            add_rms_norm(res, delta,
                         layer + 1 < m->num_layers ? m->input_norm[layer + 1] : m->final_norm,
                         h, rows, dim, m->eps);
        }
        split_rows(m->vocab_size, nt, t, &lo, &hi);
        gemv(m->lm_head, dim, h, rows, logits, m->vocab_size, lo, hi);
        if (argmax_ids != NULL)
            for (int64_t r = 0; r < rows; ++r)
                candidates[t * rows + r] = first_max(logits + r * m->vocab_size, lo,
                                                     hi < argmax_cols ? hi : argmax_cols);
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
}
