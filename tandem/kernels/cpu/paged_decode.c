/* Decode attention over the paged KV cache, float32, for the CPU backend.
 *
 * One work item per (sequence, KV heads): the item streams those heads' K and V straight
 * out of the sequence's cache blocks (no gathered copy) and keeps an online softmax for
 * each of the `group` query heads that share each (GQA), so every K/V byte is read once
 * per step. With 2+ sequences a thread, an item takes all of a sequence's KV heads
 * (tandem_heads_per_item), so it reads each block's rows whole and in order instead of one
 * head's 256 bytes of every token: 48 sequences x 6 layers of 2 KV heads of 64, blocks
 * shuffled, 2 threads on the AVX2 box: 5.3 against 7.0 ms at 200 tokens, 17.6 against 20.9
 * at 600 (best of five; 16 sequences at 600: 4.9 against 6.4; 4 and 6 at 1000: 2.20 and
 * 4.30 against 2.47 and 4.95). Below that, one KV head an item, so that a few sequences
 * still spread over the threads (3 sequences at 1000: 1.82 ms, against 2.08 as whole rows).
 *
 * head_dim of 2, 4, 8 or 16 vectors (64 or 128 with AVX-512 or AVX2) takes the vector path:
 * the scores of VL tokens at once, summed across lanes by one transposing tree instead of
 * one sum per token, and the output accumulated in registers. Against the per-token loop
 * it replaced (scratch benchmark, 2-core AVX-512 box, 48 sequences x 8/2 heads of 64):
 * 0.28 against 0.47 ms a layer at 200 tokens of context, 2.4 against 4.9 at 1000.
 *
 * Layout (see tandem/kernels/reference/attention.py, the spec this is tested against):
 *   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   query:            row r, head h at query + r * q_row_stride + h * head_dim
 *   out:              row r, head h at out + r * out_row_stride + h * head_dim
 *   block_tables:     sequence s's j-th block at block_tables[s * bt_stride + j]
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "vec.h"

#define TANDEM_MAX_GROUP 64
#define TANDEM_MAX_HEAD_DIM 256
#define TANDEM_MAX_BLOCK 256

/* VL dot products at once: part[j] holds token j's lane-wise products; the result's lane
 * j is their sum (a transposing tree of shuffles and adds, no sum per token). */
#if VL == 16
#define TANDEM_LEVELS 4
static const vi lane_a[4] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
    {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
    {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
#elif VL == 8
#define TANDEM_LEVELS 3
static const vi lane_a[3] = {{0, 1, 2, 3, 8, 9, 10, 11}, {0, 1, 4, 5, 8, 9, 12, 13},
                             {0, 2, 4, 6, 8, 10, 12, 14}};
#else
#define TANDEM_LEVELS 2
static const vi lane_a[2] = {{0, 1, 4, 5}, {0, 2, 4, 6}};
#endif

static inline __attribute__((always_inline)) vf sum_lanes(vf part[VL])
{
    int width = VL;
    for (int level = 0; level < TANDEM_LEVELS; ++level) {
        const vi a = lane_a[level], b = a + (VL >> (level + 1)); /* the other half */
        width /= 2;
        for (int j = 0; j < width; ++j)
            part[j] = __builtin_shuffle(part[2 * j], part[2 * j + 1], a)
                      + __builtin_shuffle(part[2 * j], part[2 * j + 1], b);
    }
    return part[0];
}

/* Online softmax over one block's n scores p for one query head: p becomes exp(p - m'),
 * m and l (the running max and sum) move on; returns the factor that rescales the head's
 * accumulated output. */
static inline float softmax_block(float *p, int64_t n, float *m, float *l)
{
    float block_max = -INFINITY;
    for (int64_t t = 0; t < n; ++t) block_max = p[t] > block_max ? p[t] : block_max;
    const float m_new = block_max > *m ? block_max : *m;
    const float alpha = expf(*m - m_new); /* 0 on the first block */
    int64_t t = 0;
    for (; t + VL <= n; t += VL) { /* vexp: the block's scores are finite */
        vfu *pt = (vfu *)(p + t);
        *pt = vexp(*pt - m_new);
    }
    for (; t < n; ++t) p[t] = expf(p[t] - m_new);
    float sum = 0.0f;
    for (t = 0; t < n; ++t) sum += p[t];
    *l = *l * alpha + sum;
    *m = m_new;
    return alpha;
}

/* Ask for the K and V rows of this head (d floats at offset `head` in each token's ts) of
 * the block holding token `start`, if any: the blocks are scattered, so the hardware
 * prefetchers cannot run ahead into the next one. Issued a block ahead, its rows come in
 * while the group's heads work on the current one. On the 2-core AVX2 box (Zen 3, 48
 * sequences x 200 tokens x 6 layers of 2 KV heads of 64, blocks shuffled, two threads) the
 * attention took 9.4 ms against 10.0 (three runs each; the same loop with its data in L2:
 * ~2.5x faster, so it stays bound by these scattered 256-byte reads, ~6 GB/s against
 * ~17 GB/s of sequential reads), and whole decode steps of 32-48 rows at 200-600 tokens of
 * context 2-10% less. Two or more blocks ahead, or the cache in 2 MB pages, measured no
 * better. */
static inline void prefetch_block(const float *k_cache, const float *v_cache,
                                  const int32_t *table, int64_t start, int64_t len,
                                  int64_t block_size, int64_t ts, int64_t head, int64_t d)
{
    if (start >= len) return;
    const int64_t block = table[start / block_size];
    const int64_t n = len - start < block_size ? len - start : block_size;
    const float *kb = k_cache + block * block_size * ts + head;
    const float *vb = v_cache + block * block_size * ts + head;
    for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < d; i += 16) { /* a 64-byte line */
            __builtin_prefetch(kb + t * ts + i);
            __builtin_prefetch(vb + t * ts + i);
        }
}

/* The item (see tandem_attend_item_f32). nc > 0 (a constant at each call): head_dim is
 * nc * VL, and q, the tile's partial products and the output accumulators stay in
 * registers: per block and query head, the scores VL tokens at a time (sum_lanes), then
 * the values accumulated two tokens at a time into two register sets. nc == 0: any
 * head_dim, a dot product and an accumulation per (token, query head). */
static inline __attribute__((always_inline)) void attend(
    const int nc, const float *q, const float *k_cache, const float *v_cache,
    const int32_t *table, int64_t len, int64_t kh, int64_t nkh, int64_t group_size,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, float *o)
{
    const int64_t d = nc ? nc * VL : head_dim, ts = num_kv_heads * d;
    const int64_t group = nkh * group_size; /* query heads: g reads KV head kh + g / size */
    float acc[TANDEM_MAX_GROUP * TANDEM_MAX_HEAD_DIM] __attribute__((aligned(64)));
    float p[TANDEM_MAX_BLOCK + VL] __attribute__((aligned(64)));
    float m[TANDEM_MAX_GROUP], l[TANDEM_MAX_GROUP];
    for (int64_t g = 0; g < group; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int64_t i = 0; i < d; ++i) acc[g * d + i] = 0.0f;
    }
    prefetch_block(k_cache, v_cache, table, 0, len, block_size, ts, kh * d, nkh * d);
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t block = table[start / block_size];
        const int64_t n = len - start < block_size ? len - start : block_size;
        prefetch_block(k_cache, v_cache, table, start + block_size, len, block_size, ts,
                       kh * d, nkh * d);
        for (int64_t g = 0; g < group; ++g) {
            const float *kb = k_cache + block * block_size * ts + (kh + g / group_size) * d;
            const float *vb = v_cache + block * block_size * ts + (kh + g / group_size) * d;
            const float *qg = q + g * d;
            float *a = acc + g * d;
            if (nc == 0) {
                for (int64_t t = 0; t < n; ++t) {
                    const float *k = kb + t * ts;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < d; ++i) dot += qg[i] * k[i];
                    p[t] = dot * scale;
                }
                const float alpha = softmax_block(p, n, &m[g], &l[g]);
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) a[i] *= alpha;
                for (int64_t t = 0; t < n; ++t) {
                    const float *v = vb + t * ts;
                    const float pt = p[t];
#pragma omp simd
                    for (int64_t i = 0; i < d; ++i) a[i] += pt * v[i];
                }
                continue;
            }
            vf qv[16];
            for (int c = 0; c < nc; ++c) qv[c] = *(const vfu *)(qg + c * VL) * scale;
            for (int64_t t0 = 0; t0 < n; t0 += VL) {
                vf part[VL];
                for (int j = 0; j < VL; ++j) {
                    part[j] = (vf){0};
                    if (t0 + j < n) {
                        const float *k = kb + (t0 + j) * ts;
                        for (int c = 0; c < nc; ++c) part[j] += qv[c] * *(const vfu *)(k + c * VL);
                    }
                }
                *(vf *)(p + t0) = sum_lanes(part);
            }
            const float alpha = softmax_block(p, n, &m[g], &l[g]);
            vf a0[16], a1[16];
            for (int c = 0; c < nc; ++c) {
                a0[c] = *(vf *)(a + c * VL) * alpha;
                a1[c] = (vf){0};
            }
            int64_t t = 0;
            for (; t + 2 <= n; t += 2) {
                const float *v0 = vb + t * ts, *v1 = v0 + ts;
                const float p0 = p[t], p1 = p[t + 1];
                for (int c = 0; c < nc; ++c) {
                    a0[c] += p0 * *(const vfu *)(v0 + c * VL);
                    a1[c] += p1 * *(const vfu *)(v1 + c * VL);
                }
            }
            if (t < n)
                for (int c = 0; c < nc; ++c) a0[c] += p[t] * *(const vfu *)(vb + t * ts + c * VL);
            for (int c = 0; c < nc; ++c) *(vf *)(a + c * VL) = a0[c] + a1[c];
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.0f / l[g];
        for (int64_t i = 0; i < d; ++i) o[g * d + i] = acc[g * d + i] * inv;
    }
}

/* One item: KV heads kh .. kh + nkh - 1 of a sequence, and their nkh * group query heads
 * q (contiguous, nkh * group x head_dim, query head j reading KV head kh + j / group) over
 * the sequence's `len` cached tokens (paged by `table`), online softmax a block at a time;
 * writes the nkh * group x head_dim outputs at o. Also decode_step.c's.
 * head_dim of 2, 4, 8 or 16 vectors takes the vector path, any other the scalar one. */
void tandem_attend_item_f32(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *table, int64_t len, int64_t kh, int64_t nkh,
                            int64_t group, int64_t num_kv_heads, int64_t head_dim,
                            int64_t block_size, float scale, float *o)
{
    const int64_t nc = head_dim % VL == 0 ? head_dim / VL : 0;
#define TANDEM_ATTEND(n) attend(n, q, k_cache, v_cache, table, len, kh, nkh, group, \
                                    num_kv_heads, head_dim, block_size, scale, o)
    switch (nc) {
    case 2: TANDEM_ATTEND(2); return;
    case 4: TANDEM_ATTEND(4); return;
    case 8: TANDEM_ATTEND(8); return;
    case 16: TANDEM_ATTEND(16); return;
    default: TANDEM_ATTEND(0);
    }
#undef TANDEM_ATTEND
}

/* KV heads a work item covers: one while there are fewer than 2 sequences a thread, else
 * as many as divide num_kv_heads within 64 query heads (all of a sequence's, mostly). */
int64_t tandem_heads_per_item(int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                              int64_t threads)
{
    if (num_seqs < 2 * threads) return 1;
    int64_t nkh = num_kv_heads;
    while (nkh * group > TANDEM_MAX_GROUP || num_kv_heads % nkh) --nkh;
    return nkh;
}

void tandem_paged_decode_f32(const float *query, int64_t q_row_stride, const int64_t *rows,
                             const float *k_cache, const float *v_cache,
                             const int32_t *block_tables, int64_t bt_stride,
                             const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             float scale, float *out, int64_t out_row_stride)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t nkh = tandem_heads_per_item(num_seqs, num_kv_heads, group,
                                              omp_get_max_threads());
    const int64_t per_seq = num_kv_heads / nkh;

#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_seqs * per_seq; ++item) {
        const int64_t s = item / per_seq, kh = item % per_seq * nkh;
        tandem_attend_item_f32(query + rows[s] * q_row_stride + kh * group * head_dim,
                               k_cache, v_cache, block_tables + s * bt_stride, seq_lens[s],
                               kh, nkh, group, num_kv_heads, head_dim, block_size, scale,
                               out + rows[s] * out_row_stride + kh * group * head_dim);
    }
}
