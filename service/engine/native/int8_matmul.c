/* The int8 Linear for x86-64 CPUs with AVX2: float32 activations quantized
 * to int8 with one scale per row, times int8 weights with one scale per
 * output channel, in integers. It computes exactly what the engine's torch
 * path does (RowwiseInt8Linear: torch.round(x / scale), torch._int_mm, then
 * the two scales), bit for bit, in one call instead of a dozen tensor ops.
 *
 * Where the CPU has no int8 dot-product instructions (AVX512-VNNI, AMX),
 * torch._int_mm is 10-30x slower than this (bench/README.md). Both
 * operands are widened to int16 and multiplied with vpmaddwd, which is exact
 * for |values| <= 127 (a pair of products fits int32 with room to spare), so
 * the sums are the same integers as torch._int_mm's, in any order. Each
 * output depends on its own activation row and weight row only: the product
 * is batch-invariant by construction.
 *
 * Compiled with -ffp-contract=off: a fused multiply-add in the scaling
 * would round differently from torch's separate multiply and add.
 * Threads share torch's OpenMP runtime (the same libgomp.so.1 is already
 * loaded in the process).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Weight rows per tile (contiguous in memory: COLS * k bytes). */
#define COLS 4
/* Activation rows per pass over a thread's weight rows: each widened weight
 * vector is reused for this many rows while they stay in L2
 * (k = 4864: 32 rows are 311 KB of int16). */
#define ROW_BLOCK 32

static inline int32_t horizontal_sum(__m256i v) {
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(1, 0, 3, 2)));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(sum);
}

/* rows (1 or 2) activation rows times cols (1..COLS) weight rows. The
 * constant arguments of the calls below let the compiler unroll the loops
 * and keep the accumulators in registers. */
static inline __attribute__((always_inline)) void tile(const int16_t *a, const int8_t *w, float *out, int64_t k,
                                                       int64_t n, const float *row_scale, const float *weight_scale,
                                                       const float *bias, int rows, int cols) {
    __m256i acc[2][COLS];
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) acc[i][j] = _mm256_setzero_si256();
    /* The hardware prefetcher alone left batch-1 decode at about half the
     * memory bandwidth: fetch the next tile's bytes (the COLS * k after this
     * one) at the pace this one is read. */
    const char *next_tile = (const char *)w + (int64_t)cols * k;
    int64_t t = 0;
    for (; t + 16 <= k; t += 16) {
        _mm_prefetch(next_tile + t * cols, _MM_HINT_T0);
        __m256i wide[COLS];
        for (int j = 0; j < cols; ++j)
            wide[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j * k + t)));
        for (int i = 0; i < rows; ++i) {
            const __m256i row = _mm256_loadu_si256((const __m256i *)(a + i * k + t));
            for (int j = 0; j < cols; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(row, wide[j]));
        }
    }
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) {
            int32_t sum = horizontal_sum(acc[i][j]);
            for (int64_t r = t; r < k; ++r) sum += (int32_t)a[i * k + r] * (int32_t)w[j * k + r];
            /* torch: _int_mm(...).float() * (row_scale * weight_scale) + bias */
            float value = (float)sum * (row_scale[i] * weight_scale[j]);
            if (bias) value = value + bias[j];
            out[i * n + j] = value;
        }
}

#define TILE_CASE(ROWS, C) tile(a, w, out, k, n, row_scale, weight_scale, bias, ROWS, C)

static void rows_times_tile(const int16_t *a, int64_t rows, const int8_t *w, int cols, float *out, int64_t k, int64_t n,
                            const float *row_scale, const float *weight_scale, const float *bias) {
    for (int64_t i = 0; i < rows; i += 2, a += 2 * k, out += 2 * n, row_scale += 2) {
        const int pair = rows - i >= 2;
        switch (cols * 2 + pair) {
            case 9: TILE_CASE(2, 4); break;
            case 8: TILE_CASE(1, 4); break;
            case 7: TILE_CASE(2, 3); break;
            case 6: TILE_CASE(1, 3); break;
            case 5: TILE_CASE(2, 2); break;
            case 4: TILE_CASE(1, 2); break;
            case 3: TILE_CASE(2, 1); break;
            default: TILE_CASE(1, 1); break;
        }
    }
}

/* The SHA-256 of the source this library was built from (-DSOURCE_SHA256=...):
 * the loader uses a library only if it matches the source beside it. */
const char *qwen_source_sha256(void) { return SOURCE_SHA256; }

/* torch: scale = x.abs().amax(dim=1).clamp(min=1e-8) / 127; torch.round(x / scale)
 * (round half to even: rintf in the default rounding mode). */
static void quantize_row(const float *x, int64_t k, int16_t *quantized, float *scale) {
    float amax = 0.0f;
    for (int64_t t = 0; t < k; ++t) amax = fmaxf(amax, fabsf(x[t]));
    const float row_scale = fmaxf(amax, 1e-8f) / 127.0f;
    for (int64_t t = 0; t < k; ++t) quantized[t] = (int16_t)rintf(x[t] / row_scale);
    *scale = row_scale;
}

/* x: [m, k] float32; w: [n, k] int8; weight_scale: [n]; bias: [n] or NULL;
 * out: [m, n] float32. Returns 0, or -1 when out of memory. */
int qwen_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const float *weight_scale,
                     const float *bias, int64_t n, float *out, int threads) {
    int16_t *quantized = malloc((size_t)(m * k) * sizeof(int16_t));
    float *row_scale = malloc((size_t)m * sizeof(float));
    if (!quantized || !row_scale) {
        free(quantized);
        free(row_scale);
        return -1;
    }
    const int64_t tiles = (n + COLS - 1) / COLS;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) quantize_row(x + i * k, k, quantized + i * k, row_scale + i);
        /* Static split: each thread reads one contiguous run of weight rows. */
#pragma omp for schedule(static)
        for (int64_t part = 0; part < threads; ++part) {
            const int64_t first = tiles * part / threads, last = tiles * (part + 1) / threads;
            for (int64_t row0 = 0; row0 < m; row0 += ROW_BLOCK) {
                const int64_t rows = m - row0 < ROW_BLOCK ? m - row0 : ROW_BLOCK;
                for (int64_t tile_index = first; tile_index < last; ++tile_index) {
                    const int64_t n0 = tile_index * COLS;
                    const int cols = n - n0 < COLS ? (int)(n - n0) : COLS;
                    rows_times_tile(quantized + row0 * k, rows, w + n0 * k, cols, out + row0 * n + n0, k, n,
                                    row_scale + row0, weight_scale + n0, bias ? bias + n0 : NULL);
                }
            }
        }
    }
    free(quantized);
    free(row_scale);
    return 0;
}
