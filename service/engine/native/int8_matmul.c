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
static float row_quantization_scale(const float *x, int64_t k) {
    float amax = 0.0f;
    for (int64_t t = 0; t < k; ++t) amax = fmaxf(amax, fabsf(x[t]));
    return fmaxf(amax, 1e-8f) / 127.0f;
}

static void quantize_row(const float *x, int64_t k, int16_t *quantized, float *scale) {
    const float row_scale = row_quantization_scale(x, k);
    for (int64_t t = 0; t < k; ++t) quantized[t] = (int16_t)rintf(x[t] / row_scale);
    *scale = row_scale;
}

static void quantize_row_int8(const float *x, int64_t k, int8_t *quantized, float *scale) {
    const float row_scale = row_quantization_scale(x, k);
    for (int64_t t = 0; t < k; ++t) quantized[t] = (int8_t)rintf(x[t] / row_scale);
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

/* ---- 5-bit weights: the int5 Linear ----
 *
 * Weights in blocks of 32 inputs, each block a float16 scale d and 32 codes
 * c in 0..31 standing for (c - 16) * d: GGUF's Q5_0, in a layout of our own
 * that makes the product cheap. 5.5 bits a weight against int8's 8: decode
 * at small batch is bound by reading the weights.
 *
 * A row's k inputs (a multiple of 32: b = k / 32 blocks) are cut into
 * superblocks of 8 blocks, the rest into one each of 4, 2 and 1 blocks as
 * needed. A superblock of g blocks is g vectors of 32 bytes; lane l (bytes
 * 4l..4l+3) of vector v holds inputs 4 * (v * 8 / g + l / g) + 0..3 of the
 * superblock's block l % g. So each 32-bit lane of vpmaddubsw/vpmaddwd sums
 * one block's products, exactly, in integers, for the whole superblock; then
 * one conversion and one multiply-add by the lanes' scales per superblock.
 * The activations are quantized to int8 per row (as for int8) and put in the
 * same order. Per weight row:
 *   nibbles: 32 bytes per pair of vectors: byte t holds the low four bits of
 *            code t of the even vector (low nibble) and of the odd one;
 *   fifth:   32 bytes per 8 vectors: bit j of byte t is the fifth bit of code
 *            t of vector j;
 *   scales:  8 float16 per superblock, lane l's block's (for g < 8 repeated).
 * Codes enter vpmaddubsw unsigned (c, not c - 16): the 16 * sum(a) this adds
 * to each lane is taken off once per superblock (`offsets`, from the
 * activations alone). |c| <= 31 and |a| <= 127: a pair of products fits
 * int16, as vpmaddubsw needs. The order of the float sums is fixed whatever
 * the number of rows: batch-invariant like the int8 kernel. */

#define INT5_COLS 4
/* Activation rows per tile: a weight vector's codes, once decoded, serve this many rows. */
#define INT5_ROWS 4

/* Blocks in superblock s of a row of `blocks` blocks (8, then 4, 2, 1). */
static inline int superblock_size(int64_t blocks, int64_t s) {
    const int64_t full = blocks / 8;
    if (s < full) return 8;
    int rest = (int)(blocks % 8), g = 8;
    for (int64_t tail = full;; ++tail) {
        while (!(rest & (g >>= 1)));
        if (tail == s) return g;
        rest -= g;
    }
}

static inline int64_t superblock_count(int64_t blocks) {
    return blocks / 8 + __builtin_popcountll((unsigned long long)(blocks % 8));
}

/* One weight row's dot products with `rows` activation rows over one
 * superblock of g blocks (g vectors, from vector `first`): per row, 8 int32
 * lanes, each one block's exact sum. Bits 0..3 of the codes come from the
 * nibbles, bit 4 from the fifth bits: the 16-bit shifts move bits across
 * bytes too, but never into bit 4. */
static inline __attribute__((always_inline)) void int5_superblock(const int8_t *a, int64_t k, int rows,
                                                                  const uint8_t *nibbles, const uint8_t *fifth,
                                                                  int64_t first, int g, __m256i *sums) {
    const __m256i low_nibble = _mm256_set1_epi8(0x0F), fifth_bit = _mm256_set1_epi8(0x10);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < rows; ++i) sums[i] = _mm256_setzero_si256();
    const __m256i high = _mm256_loadu_si256((const __m256i *)(fifth + (first >> 3) * 32));
    const int8_t *row = a + first * 32;
    if (g == 8) {
        /* A full superblock starts at a multiple of 8 vectors: shifts and parities are constants. */
        const uint8_t *pair = nibbles + (first >> 1) * 32;
/* The codes of vectors 2P (low nibbles) and 2P + 1 (high nibbles). */
#define INT5_CODES(P, SHIFT_EVEN, SHIFT_ODD)                                                                   \
    const __m256i both##P = _mm256_loadu_si256((const __m256i *)(pair + (P) * 32));                            \
    const __m256i even##P =                                                                                    \
        _mm256_or_si256(_mm256_and_si256(both##P, low_nibble), _mm256_and_si256(SHIFT_EVEN, fifth_bit));       \
    const __m256i odd##P = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(both##P, 4), low_nibble),        \
                                           _mm256_and_si256(SHIFT_ODD, fifth_bit))
/* Four vectors' products summed in int16 (4 * 2 * 31 * 127 < 32768), then widened once. */
#define INT5_QUAD(P, Q)                                                                                        \
    for (int i = 0; i < rows; ++i) {                                                                           \
        const __m256i *r = (const __m256i *)(row + i * k + (P) * 64);                                          \
        const __m256i products = _mm256_add_epi16(                                                             \
            _mm256_add_epi16(_mm256_maddubs_epi16(even##P, _mm256_loadu_si256(r)),                             \
                             _mm256_maddubs_epi16(odd##P, _mm256_loadu_si256(r + 1))),                         \
            _mm256_add_epi16(_mm256_maddubs_epi16(even##Q, _mm256_loadu_si256(r + 2)),                         \
                             _mm256_maddubs_epi16(odd##Q, _mm256_loadu_si256(r + 3))));                        \
        sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(products, ones));                                \
    }
        {
            INT5_CODES(0, _mm256_slli_epi16(high, 4), _mm256_slli_epi16(high, 3));
            INT5_CODES(1, _mm256_slli_epi16(high, 2), _mm256_slli_epi16(high, 1));
            INT5_QUAD(0, 1)
        }
        {
            INT5_CODES(2, high, _mm256_srli_epi16(high, 1));
            INT5_CODES(3, _mm256_srli_epi16(high, 2), _mm256_srli_epi16(high, 3));
            INT5_QUAD(2, 3)
        }
#undef INT5_CODES
#undef INT5_QUAD
        return;
    }
    for (int u = 0; u < g; ++u) {
        const int64_t v = first + u;
        const int bit = (int)(v & 7);
        __m256i low = _mm256_loadu_si256((const __m256i *)(nibbles + (v >> 1) * 32));
        if (v & 1) low = _mm256_srli_epi16(low, 4);
        __m256i top = high;
        if (bit < 4) top = _mm256_slli_epi16(top, 4 - bit);
        if (bit > 4) top = _mm256_srli_epi16(top, bit - 4);
        const __m256i code = _mm256_or_si256(_mm256_and_si256(low, low_nibble), _mm256_and_si256(top, fifth_bit));
        for (int i = 0; i < rows; ++i) {
            const __m256i activations = _mm256_loadu_si256((const __m256i *)(row + i * k + u * 32));
            sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(_mm256_maddubs_epi16(code, activations), ones));
        }
    }
}

static inline __attribute__((always_inline)) void int5_tile(const int8_t *a, const __m256i *offsets,
                                                            const uint8_t *nibbles, const uint8_t *fifth,
                                                            const uint16_t *scales, float *out, int64_t k, int64_t n,
                                                            const float *row_scale, const float *bias, int rows,
                                                            int cols) {
    const int64_t blocks = k / 32, superblocks = superblock_count(blocks);
    const int64_t nibble_row = (blocks + 1) / 2 * 32, fifth_row = (blocks + 7) / 8 * 32, scale_row = superblocks * 8;
    __m256 acc[INT5_ROWS][INT5_COLS];
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) acc[i][j] = _mm256_setzero_ps();
    /* As in tile(): fetch the next tile's bytes at the pace this one's are read. */
    const char *next_nibbles = (const char *)nibbles + 4 * cols * nibble_row;
    const char *next_fifth = (const char *)fifth + 4 * cols * fifth_row;
    int64_t first = 0;
    for (int64_t s = 0; s < superblocks; ++s) {
        const int g = superblock_size(blocks, s);
        for (int j = 0; j < cols; ++j) {
            _mm_prefetch(next_nibbles + j * nibble_row + first * 16, _MM_HINT_T0);
            _mm_prefetch(next_nibbles + j * nibble_row + first * 16 + 64, _MM_HINT_T0);
            _mm_prefetch(next_fifth + j * fifth_row + first * 4, _MM_HINT_T0);
            __m256i sums[INT5_ROWS];
            int5_superblock(a, k, rows, nibbles + j * nibble_row, fifth + j * fifth_row, first, g, sums);
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + j * scale_row + s * 8)));
            for (int i = 0; i < rows; ++i) {
                const __m256i exact = _mm256_sub_epi32(sums[i], offsets[i * superblocks + s]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, acc[i][j]);
            }
        }
        first += g;
    }
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) {
            __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1));
            sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
            sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
            float value = _mm_cvtss_f32(sum) * row_scale[i];
            if (bias) value = value + bias[j];
            out[i * n + j] = value;
        }
}

#define INT5_CASE(ROWS, C) int5_tile(a, offsets, nibbles, fifth, scales, out, k, n, row_scale, bias, ROWS, C)

static void rows_times_int5_tile(const int8_t *a, const __m256i *offsets, int64_t rows, const uint8_t *nibbles,
                                 const uint8_t *fifth, const uint16_t *scales, int cols, float *out, int64_t k,
                                 int64_t n, const float *row_scale, const float *bias) {
    const int64_t superblocks = superblock_count(k / 32);
    for (int64_t i = 0; i < rows; i += INT5_ROWS, a += INT5_ROWS * k, offsets += INT5_ROWS * superblocks,
                 out += INT5_ROWS * n, row_scale += INT5_ROWS) {
        const int group = rows - i < INT5_ROWS ? (int)(rows - i) : INT5_ROWS;
        /* Constant arguments: the compiler unrolls each case's loops. */
#define INT5_COLS_CASES(ROWS)                   \
    switch (cols) {                             \
        case 4: INT5_CASE(ROWS, 4); break;      \
        case 3: INT5_CASE(ROWS, 3); break;      \
        case 2: INT5_CASE(ROWS, 2); break;      \
        default: INT5_CASE(ROWS, 1); break;     \
    }
        switch (group) {
            case 4: INT5_COLS_CASES(4); break;
            case 3: INT5_COLS_CASES(3); break;
            case 2: INT5_COLS_CASES(2); break;
            default: INT5_COLS_CASES(1); break;
        }
#undef INT5_COLS_CASES
    }
}

/* One activation row quantized to int8 (as quantize_row) in the superblock
 * order above, and each superblock's lane offsets 16 * sum(a). */
static void quantize_row_int5(const float *x, int64_t k, int8_t *quantized, __m256i *offsets, float *scale) {
    const float row_scale = row_quantization_scale(x, k);
    const int64_t blocks = k / 32, superblocks = superblock_count(blocks);
    const __m256i sixteen = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
    int64_t v0 = 0;
    for (int64_t s = 0; s < superblocks; ++s) {
        const int g = superblock_size(blocks, s);
        const float *source = x + v0 * 32;
        int8_t *target = quantized + v0 * 32;
        __m256i offset = _mm256_setzero_si256();
        for (int v = 0; v < g; ++v) {
            for (int lane = 0; lane < 8; ++lane)
                for (int r = 0; r < 4; ++r)
                    target[v * 32 + lane * 4 + r] =
                        (int8_t)rintf(source[32 * (lane % g) + 4 * (v * (8 / g) + lane / g) + r] / row_scale);
            const __m256i row = _mm256_loadu_si256((const __m256i *)(target + v * 32));
            offset = _mm256_add_epi32(offset, _mm256_madd_epi16(_mm256_maddubs_epi16(sixteen, row), ones));
        }
        offsets[s] = offset;
        v0 += g;
    }
    *scale = row_scale;
}

/* x: [m, k] float32 (k a multiple of 32); nibbles, fifth, scales: the int5
 * weights of n rows as above; bias: [n] or NULL; out: [m, n] float32.
 * Returns 0, or -1 when out of memory. */
int qwen_int5_linear(const float *x, int64_t m, int64_t k, const uint8_t *nibbles, const uint8_t *fifth,
                     const uint16_t *scales, const float *bias, int64_t n, float *out, int threads) {
    const int64_t blocks = k / 32, superblocks = superblock_count(blocks);
    const int64_t nibble_row = (blocks + 1) / 2 * 32, fifth_row = (blocks + 7) / 8 * 32;
    int8_t *quantized = malloc((size_t)(m * k));
    __m256i *offsets = aligned_alloc(32, (size_t)(m * superblocks) * sizeof(__m256i));
    float *row_scale = malloc((size_t)m * sizeof(float));
    if (!quantized || !offsets || !row_scale) {
        free(quantized);
        free(offsets);
        free(row_scale);
        return -1;
    }
    const int64_t tiles = (n + INT5_COLS - 1) / INT5_COLS;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i)
            quantize_row_int5(x + i * k, k, quantized + i * k, offsets + i * superblocks, row_scale + i);
#pragma omp for schedule(static)
        for (int64_t part = 0; part < threads; ++part) {
            const int64_t first = tiles * part / threads, last = tiles * (part + 1) / threads;
            for (int64_t row0 = 0; row0 < m; row0 += ROW_BLOCK) {
                const int64_t rows = m - row0 < ROW_BLOCK ? m - row0 : ROW_BLOCK;
                for (int64_t tile_index = first; tile_index < last; ++tile_index) {
                    const int64_t n0 = tile_index * INT5_COLS;
                    const int cols = n - n0 < INT5_COLS ? (int)(n - n0) : INT5_COLS;
                    rows_times_int5_tile(quantized + row0 * k, offsets + row0 * superblocks, rows,
                                         nibbles + n0 * nibble_row, fifth + n0 * fifth_row,
                                         scales + n0 * superblocks * 8, cols, out + row0 * n + n0, k, n,
                                         row_scale + row0, bias ? bias + n0 : NULL);
                }
            }
        }
    }
    free(quantized);
    free(offsets);
    free(row_scale);
    return 0;
}
