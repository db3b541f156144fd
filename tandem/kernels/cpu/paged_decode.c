/* Decode attention over the paged KV cache, float32, for the CPU backend.
 *
 * One work item per (sequence, KV head): the item streams that head's K and V straight out
 * of the sequence's cache blocks (no gathered copy) and keeps an online softmax for each of
 * the `group` query heads that share it (GQA), so every K/V byte is read once per step.
 *
 * Layout (see tandem/kernels/reference/attention.py, the spec this is tested against):
 *   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   query:            row r, head h at query + r * q_row_stride + h * head_dim
 *   out:              row r, head h at out + r * out_row_stride + h * head_dim
 *   block_tables:     sequence s's j-th block at block_tables[s * bt_stride + j]
 */
#include <math.h>
#include <stdint.h>

#include "vec.h"

#define TANDEM_MAX_GROUP 64
#define TANDEM_MAX_HEAD_DIM 256
#define TANDEM_MAX_BLOCK 256

/* One (sequence, KV head) item: the group's `group` query heads q (contiguous, group x
 * head_dim) over the sequence's `len` cached tokens (paged by `table`), online softmax a
 * block at a time; writes the group x head_dim outputs at o. Also decode_step.c's. */
void tandem_attend_item_f32(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *table, int64_t len, int64_t kh, int64_t group,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                            float scale, float *o)
{
    const int64_t token_stride = num_kv_heads * head_dim;
    float acc[TANDEM_MAX_GROUP][TANDEM_MAX_HEAD_DIM];
    float m[TANDEM_MAX_GROUP], l[TANDEM_MAX_GROUP];
    float p[TANDEM_MAX_BLOCK];
    for (int64_t g = 0; g < group; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) acc[g][d] = 0.0f;
    }
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t block = table[start / block_size];
        const int64_t n = len - start < block_size ? len - start : block_size;
        const float *kb = k_cache + block * block_size * token_stride + kh * head_dim;
        const float *vb = v_cache + block * block_size * token_stride + kh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
            const float *qg = q + g * head_dim;
            float block_max = -INFINITY;
            for (int64_t t = 0; t < n; ++t) {
                const float *k = kb + t * token_stride;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
                p[t] = dot * scale;
                if (p[t] > block_max) block_max = p[t];
            }
            const float m_new = block_max > m[g] ? block_max : m[g];
            const float alpha = expf(m[g] - m_new); /* 0 on the first block */
            float sum = 0.0f;
            int64_t t = 0;
            for (; t + VL <= n; t += VL) { /* vexp: the block's scores are finite */
                vfu *pt = (vfu *)(p + t);
                *pt = vexp(*pt - m_new);
            }
            for (; t < n; ++t) p[t] = expf(p[t] - m_new);
            for (t = 0; t < n; ++t) sum += p[t];
            l[g] = l[g] * alpha + sum;
            m[g] = m_new;
            float *a = acc[g];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] *= alpha;
            for (int64_t t = 0; t < n; ++t) {
                const float *v = vb + t * token_stride;
                const float pt = p[t];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) a[d] += pt * v[d];
            }
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.0f / l[g];
        for (int64_t d = 0; d < head_dim; ++d) o[g * head_dim + d] = acc[g][d] * inv;
    }
}

void tandem_paged_decode_f32(const float *query, int64_t q_row_stride, const int64_t *rows,
                             const float *k_cache, const float *v_cache,
                             const int32_t *block_tables, int64_t bt_stride,
                             const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             float scale, float *out, int64_t out_row_stride)
{
    const int64_t group = num_heads / num_kv_heads;

#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_seqs * num_kv_heads; ++item) {
        const int64_t s = item / num_kv_heads, kh = item % num_kv_heads;
        tandem_attend_item_f32(query + rows[s] * q_row_stride + kh * group * head_dim,
                               k_cache, v_cache, block_tables + s * bt_stride, seq_lens[s],
                               kh, group, num_kv_heads, head_dim, block_size, scale,
                               out + rows[s] * out_row_stride + kh * group * head_dim);
    }
}
