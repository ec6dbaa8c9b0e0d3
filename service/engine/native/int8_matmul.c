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
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Weight rows per tile (contiguous in memory: COLS * k bytes). */
#define COLS 4
/* Activation rows per pass over a thread's weight rows: each weight vector,
 * widened or decoded, is reused for this many rows while they stay in L2
 * (k = 4864: 64 rows are 311 KB of int8, 622 KB of int16). Measured on
 * AVX512-VNNI (Zen 4), 33-256 rows: 64 took 0.88-0.95x the time of 32 for
 * int5 and int8; 96 and 128 were no better; on AVX2 alike. */
#define ROW_BLOCK 64

/* A product's m rows are cut into as few row blocks as hold ROW_BLOCK rows
 * each, of equal sizes: 65 rows as 33 + 32, not 64 + 1, whose block of one
 * row would read every weight again for one row, on the kernels for few rows. */
static inline int64_t row_block_count(int64_t m) { return (m + ROW_BLOCK - 1) / ROW_BLOCK; }

static inline int64_t row_block_start(int64_t m, int64_t blocks, int64_t block) { return m * block / blocks; }

/* The row block of row i: the last one starting at or before it. */
static inline int64_t row_block_of(int64_t m, int64_t blocks, int64_t i) { return ((i + 1) * blocks - 1) / m; }

static inline int32_t horizontal_sum(__m256i v) {
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(1, 0, 3, 2)));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(sum);
}

static inline float max256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
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

/* ---- Stop signals while the model loads (service/cli.py) ----
 *
 * Python runs a signal's handler only once its main thread holds the GIL,
 * and the load holds it for up to ~1.2 s per call (llguidance's token trie,
 * the tokenizer's JSON), several calls in a row while asyncio's loop takes
 * the GIL again at each step: a SIGTERM took seconds to act on a busy
 * machine. This handler needs no GIL: it writes the log line, with the time
 * as logging's asctime in local time, and exits 0. Async-signal-safe calls
 * only (gmtime_r is arithmetic in glibc; localtime_r would read the zone). */
static char exit_line[256];
static size_t exit_line_length;
static time_t exit_utc_offset;

static char *decimal(char *out, long value, int digits) {
    for (int i = digits - 1; i >= 0; --i, value /= 10) out[i] = (char)('0' + value % 10);
    return out + digits;
}

static void exit_at_signal(int signum) {
    (void)signum;
    if (exit_line_length) {
        struct timespec now;
        struct tm t;
        clock_gettime(CLOCK_REALTIME, &now);
        const time_t local = now.tv_sec + exit_utc_offset;
        gmtime_r(&local, &t);
        char text[24 + sizeof exit_line], *p = text; /* 2026-12-03 13:47:28,714 */
        p = decimal(p, t.tm_year + 1900, 4), *p++ = '-', p = decimal(p, t.tm_mon + 1, 2), *p++ = '-';
        p = decimal(p, t.tm_mday, 2), *p++ = ' ', p = decimal(p, t.tm_hour, 2), *p++ = ':';
        p = decimal(p, t.tm_min, 2), *p++ = ':', p = decimal(p, t.tm_sec, 2), *p++ = ',';
        p = decimal(p, now.tv_nsec / 1000000, 3);
        memcpy(p, exit_line, exit_line_length);
        /* A failed write changes nothing: the process exits all the same. */
        (void)!write(STDERR_FILENO, text, (size_t)(p - text) + exit_line_length);
    }
    _exit(0);
}

/* Exit 0 at each of the signals (count of them), first writing `line` (what
 * follows the time; "" for none) with the time shifted by utc_offset seconds
 * (the local zone's). Until Python's signal.signal takes them back. Returns
 * 0, or -1 if the line is too long or a signal cannot be handled. */
int qwen_exit_at_signals(const int *signals, int count, const char *line, int64_t utc_offset) {
    const size_t length = strlen(line);
    if (length > sizeof exit_line) return -1;
    memcpy(exit_line, line, length);
    exit_line_length = length;
    exit_utc_offset = (time_t)utc_offset;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = exit_at_signal;
    sigfillset(&action.sa_mask);
    for (int i = 0; i < count; ++i)
        if (sigaction(signals[i], &action, NULL)) return -1;
    return 0;
}

/* torch: scale = x.abs().amax(dim=1).clamp(min=1e-8) / 127; torch.round(x / scale)
 * (round half to even: rintf in the default rounding mode). */
static float row_quantization_scale(const float *x, int64_t k) {
    /* max_ps(|x|, peak) keeps peak when |x| is NaN, as fmaxf does. */
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 peak = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= k; t += 8) peak = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + t), magnitude), peak);
    float amax = max256(peak);
    for (; t < k; ++t) amax = fmaxf(amax, fabsf(x[t]));
    return fmaxf(amax, 1e-8f) / 127.0f;
}

static void quantize_row(const float *x, int64_t k, int16_t *quantized, float *scale) {
    const float row_scale = row_quantization_scale(x, k);
    for (int64_t t = 0; t < k; ++t) quantized[t] = (int16_t)rintf(x[t] / row_scale);
    *scale = row_scale;
}

/* ---- AVX512-VNNI ----
 *
 * Where the CPU has AVX512-VNNI (vpdpbusd: a 32-bit lane's four products
 * of unsigned and signed bytes added to it, one instruction for vpmaddubsw
 * + vpmaddwd + an add) and with it AVX-512's 32 registers, the products
 * take the kernels marked AVX512_VNNI. The library is built
 * for AVX2, to load on any AVX2 CPU: only those functions are compiled for
 * AVX-512, and they run only where detect_vnni_and_amx found it. Their integer sums
 * are the same integers and their float operations the same, in the same
 * order: the results are bit for bit the AVX2 kernels'. */
#define AVX512_VNNI __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni")))
/* Products of any row count take the VNNI kernels. int8 (k a multiple of
 * 32, n of 4): 0.3x the AVX2 kernel's time at 16 rows, 0.6-0.7x at 2, and
 * 0.88x at one row streamed from memory, its weight rows' sums included.
 * int5 (its whole tiles): with the codes decoded in fewer instructions than
 * int5_tile's products take, a one-row product from memory ran in
 * 0.57-0.80x int5_tile's time, and engine decode steps of 1 / 2 / 4 rows in
 * 0.85 / 0.80 / 0.73x. */

/* Whether the products take the VNNI kernels: the CPU's answer at load,
 * unless qwen_set_vnni turned it off (to compare the two). */
static int vnni_usable, vnni;
/* The same for the AMX kernel (below). */
static int amx_usable, amx;
static int amx_granted(void);

__attribute__((constructor)) static void detect_vnni_and_amx(void) {
    __builtin_cpu_init();
    /* libgcc reports AVX-512 features only where the OS saves their registers. */
    vnni_usable = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    vnni = vnni_usable;
    amx_usable = vnni_usable && __builtin_cpu_supports("avx512dq") && amx_granted();
    amx = amx_usable;
}

/* Use the VNNI kernels if `wanted` and the CPU has them; returns whether they are used. */
int qwen_set_vnni(int wanted) {
    vnni = wanted && vnni_usable;
    return vnni;
}

int qwen_uses_vnni(void) { return vnni; }

/* _mm256_dpbusd_epi32, in assembly: with the intrinsic GCC 12 copies the
 * accumulators from register to register around every vpdpbusd, and the
 * int5 kernel ran slower than on AVX2. */
static inline __attribute__((always_inline)) AVX512_VNNI __m256i dpbusd(__m256i sum, __m256i unsigned_bytes,
                                                                        __m256i signed_bytes) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(sum) : "v"(unsigned_bytes), "vm"(signed_bytes));
    return sum;
}

/* int8 on VNNI: vpdpbusd takes one operand unsigned, so the activations
 * are stored plus 128 (1..255) and each weight row's sum times 128 is taken
 * off again: the exact integer sums of tile(). k a multiple of 32, n of COLS. */
static void quantize_row_plus_128(const float *x, int64_t k, uint8_t *quantized, float *scale) {
    const float row_scale = row_quantization_scale(x, k);
    for (int64_t t = 0; t < k; ++t) quantized[t] = (uint8_t)((int)rintf(x[t] / row_scale) + 128);
    *scale = row_scale;
}

/* The sums of four int32 vectors, in one vector: two rounds of pairwise
 * adds and the two halves (exact in any order). One activation row's four
 * outputs of a tile at once, where one at a time took ~4x the instructions. */
static inline __m128i sums_of_4(const __m256i v[COLS]) {
    const __m256i quads = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
}

/* Rows i..i+R-1 times a tile of COLS weight rows: 4R chains of vpdpbusd,
 * each activation vector loaded once for COLS products, each weight vector
 * once for R rows. plus_128_sums: 128 times each weight row's sum (what the
 * activations' + 128 added). Each lane computes what tile() does for its
 * output, in the same order. */
static inline __attribute__((always_inline)) AVX512_VNNI void int8_rows_times_tile_vnni(
    const uint8_t *a, int64_t i, int R, const int8_t *w, __m128i plus_128_sums, float *out, int64_t k, int64_t n,
    const float *row_scale, const float *weight_scale, const float *bias) {
    __m256i sums[4][COLS];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < COLS; ++j) sums[r][j] = _mm256_setzero_si256();
    for (int64_t t = 0; t < k; t += 32) {
        __m256i weights[COLS];
        for (int j = 0; j < COLS; ++j) weights[j] = _mm256_loadu_si256((const __m256i *)(w + j * k + t));
        for (int r = 0; r < R; ++r) {
            const __m256i activations = _mm256_loadu_si256((const __m256i *)(a + (i + r) * k + t));
            for (int j = 0; j < COLS; ++j) sums[r][j] = dpbusd(sums[r][j], activations, weights[j]);
        }
    }
    const __m128 scales = _mm_loadu_ps(weight_scale);
    for (int r = 0; r < R; ++r) {
        const __m128i exact = _mm_sub_epi32(sums_of_4(sums[r]), plus_128_sums);
        /* torch: _int_mm(...).float() * (row_scale * weight_scale) + bias */
        __m128 value = _mm_mul_ps(_mm_cvtepi32_ps(exact), _mm_mul_ps(_mm_set1_ps(row_scale[i + r]), scales));
        if (bias) value = _mm_add_ps(value, _mm_loadu_ps(bias));
        _mm_storeu_ps(out + (i + r) * n, value);
    }
}

/* The rows of a row block times a tile of COLS weight rows, four rows at a time
 * (each weight vector loaded once per four rows). */
AVX512_VNNI static void int8_many_rows_vnni(const uint8_t *a, int64_t rows, const int8_t *w, float *out, int64_t k,
                                            int64_t n, const float *row_scale, const float *weight_scale,
                                            const float *bias) {
    __m256i weight_sums[COLS];
    const __m256i ones = _mm256_set1_epi8(1);
    for (int j = 0; j < COLS; ++j) {
        weight_sums[j] = _mm256_setzero_si256();
        for (int64_t t = 0; t < k; t += 32)
            weight_sums[j] = dpbusd(weight_sums[j], ones, _mm256_loadu_si256((const __m256i *)(w + j * k + t)));
    }
    const __m128i plus_128_sums = _mm_slli_epi32(sums_of_4(weight_sums), 7);
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4)
        int8_rows_times_tile_vnni(a, i, 4, w, plus_128_sums, out, k, n, row_scale, weight_scale, bias);
    /* Constant row counts: the compiler unrolls each case and keeps its sums in registers. */
    switch (rows - i) {
        case 3: int8_rows_times_tile_vnni(a, i, 3, w, plus_128_sums, out, k, n, row_scale, weight_scale, bias); break;
        case 2: int8_rows_times_tile_vnni(a, i, 2, w, plus_128_sums, out, k, n, row_scale, weight_scale, bias); break;
        case 1: int8_rows_times_tile_vnni(a, i, 1, w, plus_128_sums, out, k, n, row_scale, weight_scale, bias); break;
        default: break;
    }
}

/* ---- int8 on AMX ----
 *
 * Where the CPU has AMX (Sapphire Rapids and later) a tile instruction
 * multiplies 16 x 64 signed bytes by 64 x 16 into 16 x 16 int32 sums: 16384
 * products (a loop of them reached 3.6 T products/s on one core of an Intel
 * host, where the VNNI int8 kernel does ~0.17 T). An int8
 * Linear has one scale per weight row, so a tile's sums stay in the tile
 * over all k and are scaled once. The weight rows are tile A as they are
 * stored (16 rows, k bytes apart); the activations, quantized to int8 as
 * for the other kernels (signed: tdpbssd), are tile B, laid out as tiles
 * take it: per 16-row block, 4 inputs of 16 rows a line. The sums are the
 * same integers as torch._int_mm's; each output is then scaled with the same
 * float operations as tile() (product of the two scales, times the sum,
 * plus the bias): bit for bit the other kernels' results.
 *
 * (An int5 kernel on AMX was measured too and not taken: bench/README.md.) */
#define AMX __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,amx-tile,amx-int8")))
/* Activation rows and weight rows of a tile product. */
#define AMX_ROWS 16
/* From this many rows an int8 product takes AMX (where the CPU has it),
 * with k a multiple of 64 and n of 16. */
#define AMX_MIN_ROWS 16

/* Whether the CPU has AMX-TILE and AMX-INT8 and Linux grants the process
 * their 8 KB of tile registers (handed out only on request). */
static int amx_granted(void) {
    unsigned eax, ebx, ecx, edx;
    const unsigned amx_tile = 1u << 24, amx_int8 = 1u << 25;
    const long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & amx_tile) && (edx & amx_int8) &&
           syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
}

/* Use the AMX kernel if `wanted` and the CPU and OS have it; returns whether it is used. */
int qwen_set_amx(int wanted) {
    amx = wanted && amx_usable;
    return amx;
}

/* AMX takes products only while the VNNI kernels do (qwen_set_vnni(0) keeps every product on AVX2). */
int qwen_uses_amx(void) { return amx && vnni; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} amx_tile_config;

/* Tiles 0, 1: sums of two row blocks (16 x 16 int32); 2: 16 weight rows'
 * 64 bytes; 3, 4: the two row blocks' 64 inputs (16 lines of 16 rows x 4). */
AMX static void amx_configure(void) {
    amx_tile_config config = {.palette = 1};
    for (int t = 0; t < 5; ++t) {
        config.rows[t] = AMX_ROWS;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* Tile loads and stores as GCC's intrinsics, but naming the memory they read
 * or write (the intrinsics' asm names none), so the compiler orders them
 * with the C code around them. */
#define TILE_LOAD(T, base, stride, bytes)                                              \
    __asm__ volatile("tileloadd (%1,%2,1), %%tmm" #T                                 \
                     :                                                               \
                     : "m"(*(const int8_t(*)[bytes])(const void *)(base)), "r"(base), \
                       "r"((long)(stride)))
#define TILE_STORE(T, base)                                                             \
    __asm__ volatile("tilestored %%tmm" #T ", (%1,%2,1)"                               \
                     : "=m"(*(int32_t(*)[256])(void *)(base))                          \
                     : "r"(base), "r"((long)64))

/* Row i of the activations quantized as quantize_row does, as int8, into
 * the tile layout: its 4 inputs from 4q at line q of its row block. */
static void quantize_row_amx(const float *x, int64_t k, int8_t *blocks, int64_t i, float *scale) {
    const float row_scale = row_quantization_scale(x, k);
    int8_t *row = blocks + i / AMX_ROWS * AMX_ROWS * k + i % AMX_ROWS * 4;
    for (int64_t t = 0; t < k; t += 64) {
        int8_t quantized[64];
        for (int u = 0; u < 64; ++u) quantized[u] = (int8_t)rintf(x[t + u] / row_scale);
        for (int q = 0; q < 16; ++q) memcpy(row + (t / 4 + q) * 64, quantized + 4 * q, 4);
    }
    *scale = row_scale;
}

/* r[j] holds the 16 values of item j; afterwards r[i] holds value i of items 0..15. */
static inline __attribute__((always_inline)) AMX void transpose16x16_ps(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    /* u[4g + e] holds, in each 128-bit lane L, value 4L + e of items 4g..4g+3 */
    for (int e = 0; e < 4; ++e) {
        const __m512 lo01 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88), hi01 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
        const __m512 lo23 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
        const __m512 hi23 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
        r[e] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
        r[4 + e] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
    }
}

/* A tile's stored sums (16 weight rows x 16 activation rows) scaled as in
 * tile() and stored to the first `rows` rows of out. */
static inline __attribute__((always_inline)) AMX void int8_amx_outputs(const int32_t *sums, int rows, float *out,
                                                                       int64_t n, const float *row_scale,
                                                                       const float *weight_scale, const float *bias) {
    const __m512 row_scales = _mm512_maskz_loadu_ps((__mmask16)((1u << rows) - 1), row_scale);
    __m512 value[16];
    for (int j = 0; j < 16; ++j) {
        /* torch: _int_mm(...).float() * (row_scale * weight_scale) + bias */
        value[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums + 16 * j)),
                                 _mm512_mul_ps(row_scales, _mm512_set1_ps(weight_scale[j])));
        if (bias) value[j] = _mm512_add_ps(value[j], _mm512_set1_ps(bias[j]));
    }
    transpose16x16_ps(value);
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(out + r * n, value[r]);
}

/* int8_product on AMX (m >= AMX_MIN_ROWS, k % 64 == 0, n % 16 == 0): rows
 * quantized into `activations` (rows padded to whole blocks of 16, k bytes
 * each: no more than the m * k int16 of int8_product's `quantized` from 16
 * rows; the rows past m are zeros). Threads split the weight rows; each tile of 16
 * weight rows takes the row blocks two at a time, sharing its weight loads. */
AMX static void int8_product_amx(const float *x, int64_t m, int64_t k, const int8_t *w, const float *weight_scale,
                                 const float *bias, int64_t n, float *out, int8_t *activations, float *row_scale) {
    const int threads = omp_get_num_threads();
    const int64_t blocks = (m + AMX_ROWS - 1) / AMX_ROWS, tiles = n / AMX_ROWS, block_bytes = AMX_ROWS * k;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks * AMX_ROWS; ++i) {
        if (i < m) {
            quantize_row_amx(x + i * k, k, activations, i, row_scale + i);
        } else {
            int8_t *row = activations + i / AMX_ROWS * block_bytes + i % AMX_ROWS * 4;
            for (int64_t q = 0; q < k / 4; ++q) memset(row + q * 64, 0, 4);
        }
    }
#pragma omp for schedule(static)
    for (int64_t part = 0; part < threads; ++part) {
        int32_t sums[2][256] __attribute__((aligned(64)));
        amx_configure();
        for (int64_t tile = tiles * part / threads; tile < tiles * (part + 1) / threads; ++tile) {
            const int64_t n0 = tile * AMX_ROWS;
            const int8_t *weights = w + n0 * k;
            for (int64_t block = 0; block < blocks; block += 2) {
                const int pair = block + 1 < blocks;
                const int8_t *a0 = activations + block * block_bytes, *a1 = a0 + block_bytes;
                _tile_zero(0);
                _tile_zero(1);
                if (pair) {
                    for (int64_t t = 0; t < k; t += 64) {
                        TILE_LOAD(2, weights + t, k, 64 * AMX_ROWS); /* 64 bytes of each of 16 rows */
                        TILE_LOAD(3, a0 + t * AMX_ROWS, 64, 1024);
                        _tile_dpbssd(0, 2, 3);
                        TILE_LOAD(4, a1 + t * AMX_ROWS, 64, 1024);
                        _tile_dpbssd(1, 2, 4);
                    }
                } else {
                    /* One block: its even and odd 64 inputs into two tiles, two chains of
                     * products instead of one (~0.9x the time at 16 rows), added at the end. */
                    for (int64_t t = 0; t < k; t += 64) {
                        TILE_LOAD(2, weights + t, k, 64 * AMX_ROWS);
                        TILE_LOAD(3, a0 + t * AMX_ROWS, 64, 1024);
                        if (t / 64 % 2 == 0)
                            _tile_dpbssd(0, 2, 3);
                        else
                            _tile_dpbssd(1, 2, 3);
                    }
                }
                TILE_STORE(0, sums[0]);
                TILE_STORE(1, sums[1]);
                if (!pair)
                    for (int j = 0; j < 16; ++j)
                        _mm512_storeu_si512(sums[0] + 16 * j, _mm512_add_epi32(_mm512_loadu_si512(sums[0] + 16 * j),
                                                                              _mm512_loadu_si512(sums[1] + 16 * j)));
                for (int half = 0; half <= pair; ++half) {
                    const int64_t row0 = (block + half) * AMX_ROWS;
                    const int rows = m - row0 < AMX_ROWS ? (int)(m - row0) : AMX_ROWS;
                    int8_amx_outputs(sums[half], rows, out + row0 * n + n0, n, row_scale + row0, weight_scale + n0,
                                     bias ? bias + n0 : NULL);
                }
            }
        }
        _tile_release();
    }
}

/* x: [m, k] float32; w: [n, k] int8; weight_scale: [n]; bias: [n] or NULL;
 * out: [m, n] float32; quantized: m * k, row_scale: m, scratch. Work-shared
 * by the threads of the enclosing parallel region (one thread outside one):
 * every thread of the team must call it. */
static void int8_product(const float *x, int64_t m, int64_t k, const int8_t *w, const float *weight_scale,
                         const float *bias, int64_t n, float *out, int16_t *quantized, float *row_scale) {
    if (qwen_uses_amx() && m >= AMX_MIN_ROWS && k % 64 == 0 && n % AMX_ROWS == 0) {
        int8_product_amx(x, m, k, w, weight_scale, bias, n, out, (int8_t *)quantized, row_scale);
        return;
    }
    const int threads = omp_get_num_threads();
    const int64_t tiles = (n + COLS - 1) / COLS, row_blocks = row_block_count(m);
    /* The VNNI kernel's activations are bytes: `quantized` (2 bytes a value) holds them. */
    const int use_vnni = vnni && k % 32 == 0 && n % COLS == 0;
    uint8_t *plus_128 = (uint8_t *)quantized;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        if (use_vnni)
            quantize_row_plus_128(x + i * k, k, plus_128 + i * k, row_scale + i);
        else
            quantize_row(x + i * k, k, quantized + i * k, row_scale + i);
    }
    /* Static split: each thread reads one contiguous run of weight rows. */
#pragma omp for schedule(static)
    for (int64_t part = 0; part < threads; ++part) {
        const int64_t first = tiles * part / threads, last = tiles * (part + 1) / threads;
        for (int64_t block = 0; block < row_blocks; ++block) {
            const int64_t row0 = row_block_start(m, row_blocks, block);
            const int64_t rows = row_block_start(m, row_blocks, block + 1) - row0;
            for (int64_t tile_index = first; tile_index < last; ++tile_index) {
                const int64_t n0 = tile_index * COLS;
                const int cols = n - n0 < COLS ? (int)(n - n0) : COLS;
                if (use_vnni)
                    int8_many_rows_vnni(plus_128 + row0 * k, rows, w + n0 * k, out + row0 * n + n0, k, n,
                                        row_scale + row0, weight_scale + n0, bias ? bias + n0 : NULL);
                else
                    rows_times_tile(quantized + row0 * k, rows, w + n0 * k, cols, out + row0 * n + n0, k, n,
                                    row_scale + row0, weight_scale + n0, bias ? bias + n0 : NULL);
            }
        }
    }
}

/* The int8 Linear as one call on `threads` threads. Returns 0, or -1 when out of memory. */
int qwen_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const float *weight_scale,
                     const float *bias, int64_t n, float *out, int threads) {
    int16_t *quantized = malloc((size_t)(m * k) * sizeof(int16_t));
    float *row_scale = malloc((size_t)m * sizeof(float));
    const int status = quantized && row_scale ? 0 : -1;
    if (status == 0) {
#pragma omp parallel num_threads(threads)
        int8_product(x, m, k, w, weight_scale, bias, n, out, quantized, row_scale);
    }
    free(quantized);
    free(row_scale);
    return status;
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
 * same order, row block by row block (row_block_count), each block
 * superblock-major: superblock s's vectors of every row of the block, row
 * after row (superblock_activations). A kernel sweeping a block's rows through
 * one superblock then reads one contiguous run, not a run per row k bytes
 * apart (5-10 % of the time at 33-128 rows). Per weight row:
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
/* Without VNNI, from this many rows in a row block int5_many_rows, fewer
 * int5_tile: measured, decoding once per block pays from 5 rows (a 4-row
 * tile then leaves a row alone). With VNNI every whole tile takes
 * int5_many_rows_vnni. */
#define INT5_MANY_ROWS 5

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

/* Row `row`'s g activation vectors of the superblock from vector `first`, in
 * a row block of block_rows rows (see above); the next row's follow. */
static inline const int8_t *superblock_activations(const int8_t *block, int64_t block_rows, int64_t row, int64_t first,
                                                   int g) {
    return block + (first * block_rows + row * g) * 32;
}

/* The 32 codes of vector v of a weight row (any superblock shape): bits
 * 0..3 from the nibbles, bit 4 from `high`, the row's fifth bits of v's
 * group of 8 vectors. The 16-bit shifts move bits across bytes too, but
 * never into bit 4. The decoder of the AVX2 kernels (int5_pair_codes is the
 * VNNI kernel's, for two rows at once): called with a constant v (from a
 * full superblock's start), its branches and shifts fold away. */
static inline __attribute__((always_inline)) __m256i int5_vector_codes(const uint8_t *nibbles, __m256i high, int64_t v) {
    const __m256i low_nibble = _mm256_set1_epi8(0x0F), fifth_bit = _mm256_set1_epi8(0x10);
    const int bit = (int)(v & 7);
    __m256i low = _mm256_loadu_si256((const __m256i *)(nibbles + (v >> 1) * 32));
    if (v & 1) low = _mm256_srli_epi16(low, 4);
    __m256i top = high;
    if (bit < 4) top = _mm256_slli_epi16(top, 4 - bit);
    if (bit > 4) top = _mm256_srli_epi16(top, bit - 4);
    return _mm256_or_si256(_mm256_and_si256(low, low_nibble), _mm256_and_si256(top, fifth_bit));
}

/* Four code vectors times four activation vectors, summed in int16
 * (4 * 2 * 31 * 127 < 32768), then widened to 8 int32 lanes. */
static inline __attribute__((always_inline)) __m256i int5_quad(__m256i c0, __m256i c1, __m256i c2, __m256i c3,
                                                               const __m256i *activations) {
    const __m256i products =
        _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c0, _mm256_loadu_si256(activations)),
                                          _mm256_maddubs_epi16(c1, _mm256_loadu_si256(activations + 1))),
                         _mm256_add_epi16(_mm256_maddubs_epi16(c2, _mm256_loadu_si256(activations + 2)),
                                          _mm256_maddubs_epi16(c3, _mm256_loadu_si256(activations + 3))));
    return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
}

/* One weight row's dot products with `rows` activation rows (from row0 of a
 * row block of block_rows) over one superblock of g blocks (g vectors, from
 * vector `first`): per row, 8 int32 lanes, each one block's exact sum. A full
 * superblock is decoded half by half (4 code registers live, beside
 * int5_tile's accumulators). */
static inline __attribute__((always_inline)) void int5_superblock(const int8_t *block, int64_t block_rows, int64_t row0,
                                                                  int rows, const uint8_t *nibbles,
                                                                  const uint8_t *fifth, int64_t first, int g,
                                                                  __m256i *sums) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < rows; ++i) sums[i] = _mm256_setzero_si256();
    const __m256i high = _mm256_loadu_si256((const __m256i *)(fifth + (first >> 3) * 32));
    const int8_t *row = superblock_activations(block, block_rows, row0, first, g);
    if (g == 8) {
        /* A full superblock starts at a multiple of 8 vectors: shifts and parities are constants. */
        const uint8_t *superblock = nibbles + (first >> 1) * 32;
        for (int half = 0; half < 2; ++half) {
            const __m256i c0 = int5_vector_codes(superblock, high, 4 * half),
                          c1 = int5_vector_codes(superblock, high, 4 * half + 1),
                          c2 = int5_vector_codes(superblock, high, 4 * half + 2),
                          c3 = int5_vector_codes(superblock, high, 4 * half + 3);
            for (int i = 0; i < rows; ++i)
                sums[i] = _mm256_add_epi32(sums[i], int5_quad(c0, c1, c2, c3, (const __m256i *)(row + i * 256) + 4 * half));
        }
        return;
    }
    for (int u = 0; u < g; ++u) {
        const __m256i code = int5_vector_codes(nibbles, high, first + u);
        for (int i = 0; i < rows; ++i) {
            const __m256i activations = _mm256_loadu_si256((const __m256i *)(row + (i * g + u) * 32));
            sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(_mm256_maddubs_epi16(code, activations), ones));
        }
    }
}

/* The sum of 8 floats, always added in the same order. */
static inline float sum256(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

/* One output of an int5 product from its 8 lanes of scaled block sums: the
 * same additions in the same order whichever kernel computed them. */
static inline float int5_output(__m256 acc, float row_scale, const float *bias, int j) {
    const float value = sum256(acc) * row_scale;
    return bias ? value + bias[j] : value;
}

/* Weight row j's bytes of the superblock from vector `first`, in the tile at
 * nibbles / fifth: called with the next tile's, to have them in cache when it
 * comes (the hardware prefetcher alone left one-row products at about half
 * the memory bandwidth, as in tile()). */
static inline void prefetch_superblock(const char *nibbles, const char *fifth, int64_t nibble_row, int64_t fifth_row,
                                       int j, int64_t first) {
    _mm_prefetch(nibbles + j * nibble_row + first * 16, _MM_HINT_T0);
    _mm_prefetch(nibbles + j * nibble_row + first * 16 + 64, _MM_HINT_T0);
    _mm_prefetch(fifth + j * fifth_row + first * 4, _MM_HINT_T0);
}

static inline __attribute__((always_inline)) void int5_tile(const int8_t *block, int64_t block_rows, int64_t row0,
                                                            const __m256i *offsets,
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
            prefetch_superblock(next_nibbles, next_fifth, nibble_row, fifth_row, j, first);
            __m256i sums[INT5_ROWS];
            int5_superblock(block, block_rows, row0, rows, nibbles + j * nibble_row, fifth + j * fifth_row, first, g,
                            sums);
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + j * scale_row + s * 8)));
            for (int i = 0; i < rows; ++i) {
                const __m256i exact = _mm256_sub_epi32(sums[i], offsets[i * superblocks + s]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, acc[i][j]);
            }
        }
        first += g;
    }
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) out[i * n + j] = int5_output(acc[i][j], row_scale[i], bias, j);
}

#define INT5_CASE(ROWS, C) \
    int5_tile(a, rows, i, offsets, nibbles, fifth, scales, out, k, n, row_scale, bias, ROWS, C)

static void rows_times_int5_tile(const int8_t *a, const __m256i *offsets, int64_t rows, const uint8_t *nibbles,
                                 const uint8_t *fifth, const uint16_t *scales, int cols, float *out, int64_t k,
                                 int64_t n, const float *row_scale, const float *bias) {
    const int64_t superblocks = superblock_count(k / 32);
    for (int64_t i = 0; i < rows; i += INT5_ROWS, offsets += INT5_ROWS * superblocks, out += INT5_ROWS * n,
                 row_scale += INT5_ROWS) {
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

/* Many activation rows (a prompt, a large batch): the products are then
 * bound by arithmetic, not by reading the weights, and int5_tile decodes
 * the codes again for every 4 rows (bench/README.md: from 5 rows this is
 * 0.68-0.86x int5_tile's time). Here a weight row's
 * codes of one full superblock are decoded once into 8 registers and serve
 * every row of the block; the rows' activations of that superblock (rows *
 * 256 bytes) stay in L1 across the tile's columns. Each lane's integer sum
 * is exact in any grouping, and the float accumulation is int5_tile's,
 * superblock by superblock in the same order: the results are bit for bit
 * int5_tile's. */
static void int5_many_rows(const int8_t *a, const __m256i *offsets, int64_t rows, const uint8_t *nibbles,
                           const uint8_t *fifth, const uint16_t *scales, int cols, float *out, int64_t k, int64_t n,
                           const float *row_scale, const float *bias) {
    const int64_t blocks = k / 32, superblocks = superblock_count(blocks), full = blocks / 8;
    const int64_t nibble_row = (blocks + 1) / 2 * 32, fifth_row = (blocks + 7) / 8 * 32, scale_row = superblocks * 8;
    const __m256i ones = _mm256_set1_epi16(1);
    /* Not zeroed: the first superblock adds to zero instead (a store and a load fewer per output). */
    __m256 acc[ROW_BLOCK][INT5_COLS];
    for (int64_t s = 0; s < full; ++s)
        for (int j = 0; j < cols; ++j) {
            const uint8_t *superblock = nibbles + j * nibble_row + s * 4 * 32;
            const __m256i high = _mm256_loadu_si256((const __m256i *)(fifth + j * fifth_row + s * 32));
            __m256i code[8];
            for (int u = 0; u < 8; ++u) code[u] = int5_vector_codes(superblock, high, u);
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + j * scale_row + s * 8)));
            for (int64_t i = 0; i < rows; ++i) {
                const __m256i *r = (const __m256i *)superblock_activations(a, rows, i, s * 8, 8);
                const __m256i sums = _mm256_add_epi32(int5_quad(code[0], code[1], code[2], code[3], r),
                                                      int5_quad(code[4], code[5], code[6], code[7], r + 4));
                const __m256i exact = _mm256_sub_epi32(sums, offsets[i * superblocks + s]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, s ? acc[i][j] : _mm256_setzero_ps());
            }
        }
    /* The last superblocks, of 4, 2 or 1 blocks: their g vectors decoded once too. */
    int64_t first = full * 8;
    for (int64_t s = full; s < superblocks; ++s) {
        const int g = superblock_size(blocks, s);
        for (int j = 0; j < cols; ++j) {
            const __m256i high = _mm256_loadu_si256((const __m256i *)(fifth + j * fifth_row + (first >> 3) * 32));
            __m256i code[4];
            for (int u = 0; u < g; ++u) code[u] = int5_vector_codes(nibbles + j * nibble_row, high, first + u);
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + j * scale_row + s * 8)));
            for (int64_t i = 0; i < rows; ++i) {
                const __m256i *r = (const __m256i *)superblock_activations(a, rows, i, first, g);
                __m256i products = _mm256_maddubs_epi16(code[0], _mm256_loadu_si256(r));
                for (int u = 1; u < g; ++u)
                    products = _mm256_add_epi16(products, _mm256_maddubs_epi16(code[u], _mm256_loadu_si256(r + u)));
                const __m256i exact = _mm256_sub_epi32(_mm256_madd_epi16(products, ones), offsets[i * superblocks + s]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, s ? acc[i][j] : _mm256_setzero_ps());
            }
        }
        first += g;
    }
    for (int64_t i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) out[i * n + j] = int5_output(acc[i][j], row_scale[i], bias, j);
}

/* ---- int5_many_rows on VNNI ---- */

/* The VNNI kernel works on 512-bit registers holding two weight rows side
 * by side: [row 2p's 8 lanes | row 2p + 1's], an activation vector broadcast
 * to both halves. One vpdpbusd advances both rows' block sums; one
 * conversion, multiply-add and store their float accumulators (adjacent in
 * memory, acc[i][p]); and the codes of both are decoded together. The
 * lanes' operations are those of 256-bit registers, in the same order. On
 * 256-bit units (Zen 4) a 512-bit vpdpbusd takes the time of two, but a
 * superblock's codes now fit in registers (16) beside the accumulators for
 * all the rows of the block, where the 256-bit kernel's (32) were reloaded
 * for every four rows, and there are half the loads, conversions and
 * stores. Against the 256-bit kernel, weights in the L3: 0.79-0.97x the
 * time at 1-16 rows, 0.82-0.97x at 64-128; one row from memory alike
 * (0.96-1.16x, memory-bound). Engine passes: 16 decode rows with 128 prompt
 * tokens in 0.92x, 256 prompt tokens in 0.95x, decode steps alike. */
#define INT5_PAIRS (INT5_COLS / 2)

/* vpdpbusd on 512-bit registers, in assembly as dpbusd. */
static inline __attribute__((always_inline)) AVX512_VNNI __m512i dpbusd512(__m512i sum, __m512i unsigned_bytes,
                                                                           __m512i signed_bytes) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(sum) : "v"(unsigned_bytes), "v"(signed_bytes));
    return sum;
}

/* int5_vector_codes for weight rows j and j + 1 at once (nibble_row
 * bytes apart), [row j's 32 codes | row j + 1's], from `high`, their fifth
 * bits side by side: the same operations, half the instructions. */
static inline __attribute__((always_inline)) AVX512_VNNI __m512i int5_pair_codes(const uint8_t *nibbles,
                                                                                int64_t nibble_row, __m512i high,
                                                                                int64_t v) {
    const __m512i low_nibble = _mm512_set1_epi8(0x0F), fifth_bit = _mm512_set1_epi8(0x10);
    const int bit = (int)(v & 7);
    const uint8_t *pair = nibbles + (v >> 1) * 32;
    __m512i low = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)pair)),
                                     _mm256_loadu_si256((const __m256i *)(pair + nibble_row)), 1);
    if (v & 1) low = _mm512_srli_epi16(low, 4);
    __m512i top = high;
    if (bit < 4) top = _mm512_slli_epi16(top, 4 - bit);
    if (bit > 4) top = _mm512_srli_epi16(top, bit - 4);
    return _mm512_or_si512(_mm512_and_si512(low, low_nibble), _mm512_and_si512(top, fifth_bit));
}

/* sum256 of each of the 16 8-lane halves of four rows' accumulators
 * (acc[r][p]: [weight row 2p's 8 lanes | 2p + 1's]) at once, the same
 * additions in the same order: lane l + lane l + 4, then 0 + 2 and 1 + 3
 * of those, then the two. Output lane 4r + j: row r, weight row j. Half
 * the instructions of two rows at a time on 256-bit registers (a k = 896
 * product of 132 rows in ~0.96x the time). */
static inline __attribute__((always_inline)) AVX512_VNNI __m512 sum16_of_8(const __m512 acc[4][INT5_PAIRS]) {
    __m512 halves[4], pairs[2];
    for (int r = 0; r < 4; ++r) /* quarter j: row r's 4 sums for weight row j */
        halves[r] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[r][0], acc[r][1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(acc[r][0], acc[r][1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int q = 0; q < 2; ++q) /* quarter j: [row 2q's 2 sums | row 2q + 1's] */
        pairs[q] = _mm512_add_ps(_mm512_shuffle_ps(halves[2 * q], halves[2 * q + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(halves[2 * q], halves[2 * q + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* quarter j: rows 0..3 for weight row j; then row-major */
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}

/* Rows i..i+R-1 of a row block of block_rows times one superblock s of g
 * vectors (from vector `first`) of a tile of INT5_COLS weight rows, its codes
 * decoded in `code`, into the float accumulators. The integer sums of R
 * activation rows times the two pairs of weight rows (2R registers) advance
 * together: each activation vector is loaded once for the four weight rows,
 * and 2R independent chains of vpdpbusd cover its latency. They start at
 * -16 * sum(a) (`offsets`), not at 0: the same exact integers, one
 * subtraction per row instead of one per product. */
static inline __attribute__((always_inline)) AVX512_VNNI void int5_rows_times_superblock_vnni(
    const int8_t *a, int64_t block_rows, const __m256i *offsets, int64_t i, int R, int64_t superblocks, int64_t s,
    int64_t first, int g, const __m512i code[8][INT5_PAIRS], const __m512 scale[INT5_PAIRS],
    __m512 acc[][INT5_PAIRS]) {
    __m512i sums[4][INT5_PAIRS];
    for (int r = 0; r < R; ++r) {
        const __m512i start =
            _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_broadcast_i64x4(offsets[(i + r) * superblocks + s]));
        for (int p = 0; p < INT5_PAIRS; ++p) sums[r][p] = start;
    }
    const int8_t *rows = superblock_activations(a, block_rows, i, first, g);
    for (int u = 0; u < g; ++u)
        for (int r = 0; r < R; ++r) {
            const __m512i activations =
                _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(rows + (r * g + u) * 32)));
            for (int p = 0; p < INT5_PAIRS; ++p) sums[r][p] = dpbusd512(sums[r][p], code[u][p], activations);
        }
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < INT5_PAIRS; ++p)
            acc[i + r][p] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][p]), scale[p], s ? acc[i + r][p] : _mm512_setzero_ps());
}

/* Every row of the block, four at a time, times one superblock (as above). */
static inline __attribute__((always_inline)) AVX512_VNNI void int5_superblock_rows_vnni(
    const int8_t *a, const __m256i *offsets, int64_t rows, int64_t superblocks, int64_t s, int64_t first, int g,
    const __m512i code[8][INT5_PAIRS], const __m512 scale[INT5_PAIRS], __m512 acc[][INT5_PAIRS]) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4)
        int5_rows_times_superblock_vnni(a, rows, offsets, i, 4, superblocks, s, first, g, code, scale, acc);
    /* Constant row counts: the compiler unrolls each case and keeps its sums in registers. */
    switch (rows - i) {
        case 3: int5_rows_times_superblock_vnni(a, rows, offsets, i, 3, superblocks, s, first, g, code, scale, acc); break;
        case 2: int5_rows_times_superblock_vnni(a, rows, offsets, i, 2, superblocks, s, first, g, code, scale, acc); break;
        case 1: int5_rows_times_superblock_vnni(a, rows, offsets, i, 1, superblocks, s, first, g, code, scale, acc); break;
        default: break;
    }
}

/* int5_many_rows for a whole tile of INT5_COLS weight rows: a superblock's
 * codes are decoded once (1 KB, in registers) for all the rows of the block.
 * Each lane's integer sum is exact in any grouping and the float
 * accumulation is int5_many_rows's, superblock by superblock in the same
 * order: the results are bit for bit those of the AVX2 kernels. */
AVX512_VNNI static void int5_many_rows_vnni(const int8_t *a, const __m256i *offsets, int64_t rows,
                                            const uint8_t *nibbles, const uint8_t *fifth, const uint16_t *scales,
                                            float *out, int64_t k, int64_t n, const float *row_scale,
                                            const float *bias) {
    const int64_t blocks = k / 32, superblocks = superblock_count(blocks), full = blocks / 8;
    const int64_t nibble_row = (blocks + 1) / 2 * 32, fifth_row = (blocks + 7) / 8 * 32, scale_row = superblocks * 8;
    __m512i code[8][INT5_PAIRS];
    __m512 scale[INT5_PAIRS];
    /* Not zeroed: the first superblock adds to zero instead. */
    __m512 acc[ROW_BLOCK][INT5_PAIRS];
    const char *next_nibbles = (const char *)nibbles + INT5_COLS * nibble_row;
    const char *next_fifth = (const char *)fifth + INT5_COLS * fifth_row;
    int64_t first = 0;
    for (int64_t s = 0; s < superblocks; ++s) {
        const int g = superblock_size(blocks, s);
        for (int p = 0; p < INT5_PAIRS; ++p) {
            const int j = 2 * p;
            for (int half = 0; half < 2; ++half)
                prefetch_superblock(next_nibbles, next_fifth, nibble_row, fifth_row, j + half, first);
            const uint8_t *pair_nibbles = nibbles + j * nibble_row;
            const uint8_t *pair_fifth = fifth + j * fifth_row + (first >> 3) * 32;
            const __m512i high =
                _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)pair_fifth)),
                                   _mm256_loadu_si256((const __m256i *)(pair_fifth + fifth_row)), 1);
            if (s < full) /* from a multiple of 8 vectors: constant shifts */
                for (int u = 0; u < 8; ++u)
                    code[u][p] = int5_pair_codes(pair_nibbles + first * 16, nibble_row, high, u);
            else
                for (int u = 0; u < g; ++u) code[u][p] = int5_pair_codes(pair_nibbles, nibble_row, high, first + u);
            const uint16_t *pair_scales = scales + j * scale_row + s * 8;
            scale[p] = _mm512_cvtph_ps(_mm256_set_m128i(_mm_loadu_si128((const __m128i *)(pair_scales + scale_row)),
                                                        _mm_loadu_si128((const __m128i *)pair_scales)));
        }
        if (s < full)
            int5_superblock_rows_vnni(a, offsets, rows, superblocks, s, first, 8, code, scale, acc);
        else
            int5_superblock_rows_vnni(a, offsets, rows, superblocks, s, first, g, code, scale, acc);
        first += g;
    }
    /* Four rows' 16 outputs at once (sum16_of_8); the last 1-3 rows with zero rows beside them. */
    const __m512 tile_bias = bias ? _mm512_broadcast_f32x4(_mm_loadu_ps(bias)) : _mm512_setzero_ps();
    const __m512i row_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t i = 0; i < rows; i += 4) {
        const int count = rows - i < 4 ? (int)(rows - i) : 4;
        __m512 last[4][INT5_PAIRS];
        const __m512(*four)[INT5_PAIRS] = acc + i;
        if (count < 4) {
            for (int r = 0; r < 4; ++r)
                for (int p = 0; p < INT5_PAIRS; ++p) last[r][p] = r < count ? acc[i + r][p] : _mm512_setzero_ps();
            four = last;
        }
        const __m128 row_scales = _mm_maskz_loadu_ps((__mmask8)((1 << count) - 1), row_scale + i);
        const __m512 scales = _mm512_permutexvar_ps(row_of_lane, _mm512_castps128_ps512(row_scales));
        __m512 value = _mm512_mul_ps(sum16_of_8(four), scales);
        if (bias) value = _mm512_add_ps(value, tile_bias);
        _mm_storeu_ps(out + i * n, _mm512_castps512_ps128(value));
        if (count > 1) _mm_storeu_ps(out + (i + 1) * n, _mm512_extractf32x4_ps(value, 1));
        if (count > 2) _mm_storeu_ps(out + (i + 2) * n, _mm512_extractf32x4_ps(value, 2));
        if (count > 3) _mm_storeu_ps(out + (i + 3) * n, _mm512_extractf32x4_ps(value, 3));
    }
}

/* 32 floats divided by scale, rounded half to even (rintf) and stored as int8, in order. */
static inline __m256i quantize32(const float *x, __m256 scale) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + 8 * i), scale),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    /* The packs work within 128-bit lanes: the permutation puts the 4-byte groups back in order. */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* r[b] holds elements b, 0..7 of an 8 x 8 matrix of 32-bit values; afterwards r[v] holds elements 0..7, v. */
static inline void transpose8x8_epi32(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
    }
}

/* One activation row, row `row` of a row block of block_rows at `block`,
 * quantized to int8 (as quantize_row) in the superblock order above, and
 * each superblock's lane offsets 16 * sum(a). In a full superblock, vector
 * v's lane l is 4-byte group v of block l: the blocks quantized in order, as
 * 8 x 8 groups, transposed. */
static void quantize_row_int5(const float *x, int64_t k, int8_t *block, int64_t block_rows, int64_t row,
                              __m256i *offsets, float *scale) {
    const float row_scale = row_quantization_scale(x, k);
    const __m256 scale_vector = _mm256_set1_ps(row_scale);
    const int64_t blocks = k / 32, superblocks = superblock_count(blocks);
    const __m256i sixteen = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
    int64_t v0 = 0;
    for (int64_t s = 0; s < superblocks; ++s) {
        const int g = superblock_size(blocks, s);
        const float *source = x + v0 * 32;
        int8_t *target = (int8_t *)superblock_activations(block, block_rows, row, v0, g);
        if (g == 8) {
            __m256i groups[8];
            for (int b = 0; b < 8; ++b) groups[b] = quantize32(source + 32 * b, scale_vector);
            transpose8x8_epi32(groups);
            for (int v = 0; v < 8; ++v) _mm256_storeu_si256((__m256i *)(target + v * 32), groups[v]);
        } else {
            for (int v = 0; v < g; ++v)
                for (int lane = 0; lane < 8; ++lane)
                    for (int r = 0; r < 4; ++r)
                        target[v * 32 + lane * 4 + r] =
                            (int8_t)rintf(source[32 * (lane % g) + 4 * (v * (8 / g) + lane / g) + r] / row_scale);
        }
        __m256i offset = _mm256_setzero_si256();
        for (int v = 0; v < g; ++v) {
            const __m256i row = _mm256_loadu_si256((const __m256i *)(target + v * 32));
            offset = _mm256_add_epi32(offset, _mm256_madd_epi16(_mm256_maddubs_epi16(sixteen, row), ones));
        }
        offsets[s] = offset;
        v0 += g;
    }
    *scale = row_scale;
}

/* x: [m, k] float32 (k a multiple of 32); nibbles, fifth, scales: the int5
 * weights of n rows as above; bias: [n] or NULL; out: [m, n] float32;
 * quantized: m * k, offsets: m * superblocks, row_scale: m, scratch.
 * Work-shared like int8_product. */
static void int5_product(const float *x, int64_t m, int64_t k, const uint8_t *nibbles, const uint8_t *fifth,
                         const uint16_t *scales, const float *bias, int64_t n, float *out, int8_t *quantized,
                         __m256i *offsets, float *row_scale) {
    const int threads = omp_get_num_threads();
    const int64_t blocks = k / 32, superblocks = superblock_count(blocks);
    const int64_t nibble_row = (blocks + 1) / 2 * 32, fifth_row = (blocks + 7) / 8 * 32;
    const int64_t tiles = (n + INT5_COLS - 1) / INT5_COLS, row_blocks = row_block_count(m);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        const int64_t block = row_block_of(m, row_blocks, i), row0 = row_block_start(m, row_blocks, block);
        quantize_row_int5(x + i * k, k, quantized + row0 * k, row_block_start(m, row_blocks, block + 1) - row0,
                          i - row0, offsets + i * superblocks, row_scale + i);
    }
#pragma omp for schedule(static)
    for (int64_t part = 0; part < threads; ++part) {
        const int64_t first = tiles * part / threads, last = tiles * (part + 1) / threads;
        for (int64_t block = 0; block < row_blocks; ++block) {
            const int64_t row0 = row_block_start(m, row_blocks, block);
            const int64_t rows = row_block_start(m, row_blocks, block + 1) - row0;
            for (int64_t tile_index = first; tile_index < last; ++tile_index) {
                const int64_t n0 = tile_index * INT5_COLS;
                const int cols = n - n0 < INT5_COLS ? (int)(n - n0) : INT5_COLS;
                const int8_t *a = quantized + row0 * k;
                const __m256i *row_offsets = offsets + row0 * superblocks;
                const uint8_t *tile_nibbles = nibbles + n0 * nibble_row, *tile_fifth = fifth + n0 * fifth_row;
                const uint16_t *tile_scales = scales + n0 * superblocks * 8;
                float *tile_out = out + row0 * n + n0;
                const float *tile_bias = bias ? bias + n0 : NULL;
                if (vnni && cols == INT5_COLS)
                    int5_many_rows_vnni(a, row_offsets, rows, tile_nibbles, tile_fifth, tile_scales, tile_out, k, n,
                                        row_scale + row0, tile_bias);
                else
                    (rows >= INT5_MANY_ROWS ? int5_many_rows : rows_times_int5_tile)(
                        a, row_offsets, rows, tile_nibbles, tile_fifth, tile_scales, cols, tile_out, k, n,
                        row_scale + row0, tile_bias);
            }
        }
    }
}

/* The int5 Linear as one call on `threads` threads. Returns 0, or -1 when out of memory. */
int qwen_int5_linear(const float *x, int64_t m, int64_t k, const uint8_t *nibbles, const uint8_t *fifth,
                     const uint16_t *scales, const float *bias, int64_t n, float *out, int threads) {
    int8_t *quantized = malloc((size_t)(m * k));
    __m256i *offsets = aligned_alloc(32, (size_t)(m * superblock_count(k / 32)) * sizeof(__m256i));
    float *row_scale = malloc((size_t)m * sizeof(float));
    const int status = quantized && offsets && row_scale ? 0 : -1;
    if (status == 0) {
#pragma omp parallel num_threads(threads)
        int5_product(x, m, k, nibbles, fifth, scales, bias, n, out, quantized, offsets, row_scale);
    }
    free(quantized);
    free(offsets);
    free(row_scale);
    return status;
}

/* ---- The decoder stack: every layer of a forward pass in one call ----
 *
 * A step of the model through torch is ~30 tensor operations a layer, each
 * a few microseconds of dispatch and a pass over its operands: at one
 * decoding row that was about as long as the matrix products themselves.
 * Here one parallel region runs all layers: RMSNorm, the products, rotary
 * embedding, the KV-cache write, attention, SiLU and the residual adds,
 * with a barrier between phases instead of a fork and join per operation.
 *
 * Every row is computed alone, in a fixed order, by one thread (products by
 * output column, attention by row and KV head): a row's numbers do not
 * depend on the other rows of the step nor on the thread count, so a token
 * decoded equals the same token prefilled, bit for bit. */

typedef struct {
    /* int8: weight [n, k] int8, scale [n] float32; int5: nibbles, fifth, scales */
    const void *weights[3];
    const float *bias; /* [n] or NULL */
    int64_t n;
    int int5; /* 1 int5, 0 int8 */
} qwen_linear;

typedef struct {
    const float *input_norm, *post_norm; /* [hidden] */
    qwen_linear qkv, o_proj, gate_up, down;
} qwen_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    int64_t slots, max_len;
    float eps;
    int kv_bf16;  /* KV cache: 1 bfloat16, 0 float32 */
    const qwen_layer *layer;
    void *kv_cache;                 /* [layers, slots, 2, kv_heads, max_len, head_dim] */
    const float *cos, *sin_signed;  /* [max_len, head_dim]: rotate_half(x) * sin == roll(x, d / 2) * sin_signed */
} qwen_model;

/* exp(x) for 8 floats: Cephes' expf (range reduction by ln 2 in two parts, a
 * degree-5 polynomial), within 2 ulp of expf over the clamped range. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

/* float32 -> bfloat16, rounded to nearest even (torch's .to(torch.bfloat16) for finite values). */
static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    __builtin_memcpy(&bits, &value, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline float from_bf16(uint16_t value) {
    const uint32_t bits = (uint32_t)value << 16;
    float out;
    __builtin_memcpy(&out, &bits, 4);
    return out;
}

/* 8 floats rounded to bfloat16's precision (to nearest even), kept as float32. */
static inline __m256 round_bf16(__m256 value) {
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32((int)0xFFFF0000)));
}

/* 8 values of a cache row (float32 or bfloat16) as float32. */
static inline __m256 load_cached(const void *row, int64_t at, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)row + at);
    const __m128i halves = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

/* out = x / rms(x) * weight, one row of n (a multiple of 8). */
static void rms_norm_row(const float *x, const float *weight, int64_t n, float eps, float *out) {
    __m256 squares = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / sqrtf(sum256(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inverse),
                                                _mm256_loadu_ps(weight + i)));
}

/* Rotary embedding of one head in place: x * cos + roll(x, d / 2) * sin_signed. */
static void rotate_head(float *x, const float *cos, const float *sin_signed, int64_t d) {
    float rotated[d];
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; ++i) rotated[i] = x[i] * cos[i] + x[(i + half) % d] * sin_signed[i];
    __builtin_memcpy(x, rotated, (size_t)d * sizeof(float));
}

/* Attention of the `group` query heads that share one KV head, for one row
 * at `position`: softmax(q k^T / sqrt(d)) v over the keys 0..position.
 * scores: group * (position + 1) floats of scratch. */
static void attend(const float *queries, int group, const void *keys, const void *values, int64_t position,
                   int64_t d, int bf16, float *scores, float *out) {
    const int64_t count = position + 1, vectors = d / 8;
    const float scale = 1.0f / sqrtf((float)d);
    for (int g = 0; g < group; ++g) {
        const float *q = queries + g * d;
        float *row = scores + g * count;
        __m256 q_rounded[16];
        for (int64_t v = 0; v < vectors; ++v) {
            const __m256 value = _mm256_loadu_ps(q + 8 * v);
            q_rounded[v] = bf16 ? round_bf16(value) : value;
        }
        for (int64_t t = 0; t < count; ++t) {
            __m256 dot = _mm256_setzero_ps();
            for (int64_t v = 0; v < vectors; ++v) dot = _mm256_fmadd_ps(q_rounded[v], load_cached(keys, t * d + 8 * v, bf16), dot);
            row[t] = sum256(dot) * scale;
        }
        __m256 peak = _mm256_set1_ps(-INFINITY);
        int64_t t = 0;
        for (; t + 8 <= count; t += 8) peak = _mm256_max_ps(peak, _mm256_loadu_ps(row + t));
        float largest = max256(peak);
        for (; t < count; ++t) largest = fmaxf(largest, row[t]);
        const __m256 shift = _mm256_set1_ps(largest);
        __m256 total = _mm256_setzero_ps();
        for (t = 0; t + 8 <= count; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + t), shift));
            _mm256_storeu_ps(row + t, e);
            total = _mm256_add_ps(total, e);
        }
        float sum = sum256(total);
        if (t < count) {
            float tail[8] = {0};
            for (int64_t i = t; i < count; ++i) tail[i - t] = row[i] - largest;
            const __m256 e = exp256(_mm256_loadu_ps(tail));
            _mm256_storeu_ps(tail, e);
            for (int64_t i = t; i < count; ++i) {
                row[i] = tail[i - t];
                sum += tail[i - t];
            }
        }
        const float inverse = 1.0f / sum;
        float *target = out + g * d;
        for (int64_t v0 = 0; v0 < vectors; v0 += 8) {
            const int64_t width = vectors - v0 < 8 ? vectors - v0 : 8;
            __m256 acc[8];
            for (int64_t v = 0; v < width; ++v) acc[v] = _mm256_setzero_ps();
            for (int64_t s = 0; s < count; ++s) {
                const __m256 weight = _mm256_set1_ps(row[s]);
                for (int64_t v = 0; v < width; ++v)
                    acc[v] = _mm256_fmadd_ps(weight, load_cached(values, s * d + 8 * (v0 + v), bf16), acc[v]);
            }
            for (int64_t v = 0; v < width; ++v) {
                __m256 value = _mm256_mul_ps(acc[v], _mm256_set1_ps(inverse));
                if (bf16) value = round_bf16(value);
                _mm256_storeu_ps(target + 8 * (v0 + v), value);
            }
        }
    }
}

/* The scratch of one forward pass. */
typedef struct {
    float *normed, *qkv, *attention, *activation, *projected, *wide, *scores, *row_scale;
    int16_t *quantized16;
    int8_t *quantized8;
    __m256i *offsets;
} forward_buffers;

static void linear(const qwen_linear *layer, const float *x, int64_t m, int64_t k, float *out,
                   const forward_buffers *b) {
    if (layer->int5)
        int5_product(x, m, k, layer->weights[0], layer->weights[1], layer->weights[2], layer->bias, layer->n, out,
                     b->quantized8, b->offsets, b->row_scale);
    else
        int8_product(x, m, k, layer->weights[0], layer->weights[1], layer->bias, layer->n, out, b->quantized16,
                     b->row_scale);
}

static inline double seconds(clockid_t clock) {
    struct timespec now;
    clock_gettime(clock, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

/* hidden: [rows, hidden] float32, the embedded tokens, replaced by the last
 * layer's output (before the final norm). Row r is the token at positions[r]
 * of KV-cache slot slots[r]; its keys and values are written there, and it
 * attends to its slot's positions 0..positions[r] (rows of one slot at
 * several positions see each other's keys: all are written first).
 * on_cpu: the least share of the pass's wall time that any of its threads
 * spent running (waiting at a barrier spins, and counts as running): well
 * below 1 when a thread was kept off its core, and every barrier then waited
 * for it. Returns 0, or -1 when out of memory. */
int qwen_forward(const qwen_model *model, float *hidden, int64_t rows, const int64_t *positions, const int64_t *slots,
                 int threads, float *on_cpu) {
    const int64_t h = model->hidden, d = model->head_dim, inter = model->intermediate;
    const int64_t q_size = model->heads * d, kv_size = model->kv_heads * d, qkv_size = q_size + 2 * kv_size;
    const int group = (int)(model->heads / model->kv_heads);
    const int64_t depth = h > inter ? (h > q_size ? h : q_size) : (inter > q_size ? inter : q_size);
    const int64_t element = model->kv_bf16 ? 2 : 4;
    const int64_t head_stride = model->max_len * d, slot_stride = 2 * model->kv_heads * head_stride;
    const int64_t layer_stride = model->slots * slot_stride;
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; ++r) longest = positions[r] + 1 > longest ? positions[r] + 1 : longest;
    forward_buffers b = {
        .normed = malloc((size_t)(rows * h) * sizeof(float)),
        .qkv = malloc((size_t)(rows * qkv_size) * sizeof(float)),
        .attention = malloc((size_t)(rows * q_size) * sizeof(float)),
        .activation = malloc((size_t)(rows * inter) * sizeof(float)),
        .projected = malloc((size_t)(rows * h) * sizeof(float)),
        .wide = malloc((size_t)(rows * 2 * inter) * sizeof(float)),
        .scores = malloc((size_t)(threads * group * longest) * sizeof(float)),
        .row_scale = malloc((size_t)rows * sizeof(float)),
        .quantized16 = malloc((size_t)(rows * depth) * sizeof(int16_t)),
        .quantized8 = malloc((size_t)(rows * depth)),
        .offsets = aligned_alloc(32, (size_t)(rows * superblock_count((depth + 31) / 32)) * sizeof(__m256i)),
    };
    const int status = b.normed && b.qkv && b.attention && b.activation && b.projected && b.wide && b.scores &&
                               b.row_scale && b.quantized16 && b.quantized8 && b.offsets
                           ? 0
                           : -1;
    float least_on_cpu = 1.0f;
    if (status == 0) {
#pragma omp parallel num_threads(threads)
        {
            const double wall_start = seconds(CLOCK_MONOTONIC), cpu_start = seconds(CLOCK_THREAD_CPUTIME_ID);
            float *scores = b.scores + omp_get_thread_num() * group * longest;
            for (int64_t l = 0; l < model->layers; ++l) {
                const qwen_layer *layer = &model->layer[l];
                char *cache = (char *)model->kv_cache + l * layer_stride * element;
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; ++r)
                    rms_norm_row(hidden + r * h, layer->input_norm, h, model->eps, b.normed + r * h);
                linear(&layer->qkv, b.normed, rows, h, b.qkv, &b);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; ++r) {
                    float *qkv = b.qkv + r * qkv_size;
                    const float *cos = model->cos + positions[r] * d, *sin = model->sin_signed + positions[r] * d;
                    for (int64_t head = 0; head < model->heads + model->kv_heads; ++head)
                        rotate_head(qkv + head * d, cos, sin, d);
                    for (int64_t kv = 0; kv < 2; ++kv)
                        for (int64_t head = 0; head < model->kv_heads; ++head) {
                            const float *source = qkv + q_size + kv * kv_size + head * d;
                            const int64_t at = slots[r] * slot_stride + (kv * model->kv_heads + head) * head_stride +
                                               positions[r] * d;
                            if (model->kv_bf16)
                                for (int64_t i = 0; i < d; ++i) ((uint16_t *)cache)[at + i] = to_bf16(source[i]);
                            else
                                __builtin_memcpy((float *)cache + at, source, (size_t)d * sizeof(float));
                        }
                }
#pragma omp for schedule(static) collapse(2)
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t head = 0; head < model->kv_heads; ++head) {
                        const int64_t keys = slots[r] * slot_stride + head * head_stride;
                        attend(b.qkv + r * qkv_size + head * group * d, group, cache + keys * element,
                               cache + (keys + model->kv_heads * head_stride) * element, positions[r], d,
                               model->kv_bf16, scores, b.attention + r * q_size + head * group * d);
                    }
                linear(&layer->o_proj, b.attention, rows, q_size, b.projected, &b);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; ++r) {
                    for (int64_t i = 0; i < h; ++i) hidden[r * h + i] += b.projected[r * h + i];
                    rms_norm_row(hidden + r * h, layer->post_norm, h, model->eps, b.normed + r * h);
                }
                linear(&layer->gate_up, b.normed, rows, h, b.wide, &b);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t i = 0; i < inter; i += 8) {
                        const __m256 gate = _mm256_loadu_ps(b.wide + r * 2 * inter + i);
                        const __m256 up = _mm256_loadu_ps(b.wide + r * 2 * inter + inter + i);
                        /* silu(gate) * up = gate / (1 + exp(-gate)) * up */
                        const __m256 sigmoid_inverse =
                            _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gate)));
                        _mm256_storeu_ps(b.activation + r * inter + i,
                                         _mm256_mul_ps(_mm256_div_ps(gate, sigmoid_inverse), up));
                    }
                linear(&layer->down, b.activation, rows, inter, b.projected, &b);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t i = 0; i < h; ++i) hidden[r * h + i] += b.projected[r * h + i];
            }
            const double wall = seconds(CLOCK_MONOTONIC) - wall_start;
            const float share = wall > 0 ? (float)((seconds(CLOCK_THREAD_CPUTIME_ID) - cpu_start) / wall) : 1.0f;
#pragma omp critical
            least_on_cpu = share < least_on_cpu ? share : least_on_cpu;
        }
    }
    *on_cpu = least_on_cpu;
    free(b.normed);
    free(b.qkv);
    free(b.attention);
    free(b.activation);
    free(b.projected);
    free(b.wide);
    free(b.scores);
    free(b.row_scale);
    free(b.quantized16);
    free(b.quantized8);
    free(b.offsets);
    return status;
}
