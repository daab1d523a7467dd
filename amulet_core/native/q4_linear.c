/* A linear layer of 4-bit weights in blocks of 32 inputs (each block its own step and lowest value: GGUF's Q4_1,
 * Q4_0 and Q4_K sub-blocks alike, both float16), multiplied with the inputs quantized to 16 bits in blocks of 32, as integers, in
 * one fixed order per output. Compiled and loaded by amulet_core/native/build.py; wrapped by
 * amulet_core/model/q4_linear.py.
 *
 * Inputs: each row's block b of 32 values gets the scale d = max |x| / 32767 and the codes c = round-to-nearest-even
 * (x * (32767 / max |x|)) in -32767..32767 (0 where max |x| is 0), and s = d * (the sum of its codes). Weights:
 * w = lowest + step * q with q in 0..15. Then
 *
 *     y[r, o] = the sum over the blocks b, in block order, of step[o, b] * (dot(o, b, r) * d[r, b]) + lowest[o, b] * s[r, b]
 *
 * where dot is the block's 32 integer products (exact). A row's outputs depend on that row and the weights only:
 * one row or many, and any number of threads, give the same bits. Eight outputs are computed side by side in the
 * vector lanes, so no sum crosses lanes. Built without FMA contraction and without fast-math; the fused
 * multiply-adds are explicit where the CPU has them. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

#define BLOCK 32
#define MAX_ROWS 4   /* rows computed together: each group's codes unpacked once for all of them */
#define MAX_GROUPS 2 /* groups of 8 outputs computed together */
#define AHEAD 32     /* blocks ahead the weights are prefetched: left to the hardware's prefetcher, a row's products
                        waited on memory (one row of 1,536 x 576, weights out of cache: 88 us without, 45 with) */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Eight float16 values (IEEE binary16) as floats, exactly. */
static inline v8f load_halves(const uint16_t *p) {
#ifdef __F16C__
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    v8f v;
    for (int l = 0; l < 8; l++) {
        const uint32_t h = p[l], sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023;
        float f;
        if (exponent == 0) f = ldexpf((float)mantissa, -24); /* zero or subnormal */
        else if (exponent == 31) f = mantissa ? NAN : INFINITY;
        else f = ldexpf((float)(mantissa | 1024), (int)exponent - 25);
        uint32_t bits;
        memcpy(&bits, &f, 4);
        bits |= sign;
        memcpy(&v[l], &bits, 4);
    }
    return v;
#endif
}

static inline v8f multiply_add(v8f acc, v8f a, v8f b) {
#ifdef __FMA__
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b;
#endif
}

/* The block's integer products of 8 outputs with one row's 32 input codes. codes: 128 bytes, byte 32j + 16L + 8h + t
 * holding in its nibble n (0 low, 1 high) the code of output 4L + t / 2, input 8j + 4n + 2h + t % 2: zero-extended
 * to 16 bits (unpacklo/unpackhi of each 128-bit lane), a plane of a chunk gives two vectors of [outputs 0..3 | 4..7]
 * x 2 inputs, and madd sums each output's pair in its own 32-bit lane. Every sum at most 32 * 15 * 32767: exact. */
static inline v8i block_dot(const uint8_t *codes, const int16_t *x) {
    v8i sum = {0};
    for (int j = 0; j < 4; j++)
        for (int L = 0; L < 2; L++)
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < 8; t++) {
                    const uint8_t byte = codes[32 * j + 16 * L + 8 * h + t];
                    const int o = 4 * L + t / 2, i = 8 * j + 2 * h + t % 2;
                    sum[o] += (byte & 15) * x[i] + (byte >> 4) * x[i + 4];
                }
    return sum;
}

/* The rows' inputs as the products read them: 16-bit codes [rows, in], each block's scale d and d * (the sum of
 * its codes) [rows, in / 32], and, for a step of at most PAIRED_ROWS rows on AVX2, every pair of consecutive codes
 * already repeated in the eight 32-bit lanes of a vector [rows, in / 2] (made once a call instead of once for every
 * eight outputs: a second row's products measured 79 -> 65 us on one row of 1,536 x 576 in cache). */
typedef struct {
    const int16_t *codes;
    const float *scales, *sums;
#ifdef __AVX2__
    const __m256i *pairs;
#endif
    int64_t in, blocks;
} inputs_t;

#define PAIRED_ROWS 2

#ifdef __AVX2__
/* block_dot for rows r0..r0+R-1 at once (P: from the inputs' pairs): each chunk's codes zero-extended once, then
 * multiplied with every row's inputs. */
static inline __attribute__((always_inline)) void block_dots(const uint8_t *codes, const inputs_t *x, int64_t r0,
                                                             int64_t b, const int R, const int P, v8i *dots) {
    const __m256i low = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    __m256i sum[MAX_ROWS];
    for (int r = 0; r < R; r++) sum[r] = zero;
    for (int j = 0; j < 4; j++) {
        const __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + 32 * j));
        for (int n = 0; n < 2; n++) {
            const __m256i plane = n ? _mm256_and_si256(_mm256_srli_epi16(packed, 4), low) : _mm256_and_si256(packed, low);
            const __m256i first = _mm256_unpacklo_epi8(plane, zero), second = _mm256_unpackhi_epi8(plane, zero);
            for (int r = 0; r < R; r++) {
                __m256i a, c;
                if (P) {
                    const __m256i *pairs = x->pairs + ((r0 + r) * x->in + b * BLOCK) / 2 + 4 * j + 2 * n;
                    a = pairs[0];
                    c = pairs[1];
                } else {
                    int32_t va, vc;
                    memcpy(&va, x->codes + (r0 + r) * x->in + b * BLOCK + 8 * j + 4 * n, 4);
                    memcpy(&vc, x->codes + (r0 + r) * x->in + b * BLOCK + 8 * j + 4 * n + 2, 4);
                    a = _mm256_set1_epi32(va);
                    c = _mm256_set1_epi32(vc);
                }
                sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(first, a));
                sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(second, c));
                /* Integer sums are associative, so the compiler may regroup them: GCC computed all 16 products of a
                 * row first and spilled them to the stack (a second row cost 26 us on 1,536 x 576 in cache, 17.5
                 * with this). The empty asm keeps each sum in a register, added as it comes; the bits are the same. */
                __asm__("" : "+x"(sum[r]));
            }
        }
    }
    for (int r = 0; r < R; r++) dots[r] = (v8i)sum[r];
}
#else
static inline void block_dots(const uint8_t *codes, const inputs_t *x, int64_t r0, int64_t b, const int R, const int P,
                              v8i *dots) {
    (void)P;
    for (int r = 0; r < R; r++) dots[r] = block_dot(codes, x->codes + (r0 + r) * x->in + b * BLOCK);
}
#endif

/* A group-block of the weights: 128 bytes of codes, then 8 float16 steps and 8 float16 lowest values. */
#define CODE_BYTES (BLOCK * 4)
#define STRIDE (CODE_BYTES + 16 * 2)

static inline __attribute__((always_inline)) void tile(const inputs_t *x, const uint8_t *weights, int64_t out,
                                                       int64_t g0, int64_t r0, const int R, const int G,
                                                       const int P, float *y) {
    const int64_t blocks = x->blocks;
    v8f acc[MAX_ROWS][MAX_GROUPS];
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) acc[r][g] = (v8f){0};
    for (int64_t b = 0; b < blocks; b++) {
        for (int g = 0; g < G; g++) {
            const uint8_t *c = weights + ((g0 + g) * blocks + b) * STRIDE;
            for (int line = 0; line < STRIDE; line += 64) __builtin_prefetch(c + AHEAD * STRIDE + line, 0, 3);
            const v8f step = load_halves((const uint16_t *)(c + CODE_BYTES));
            const v8f low = load_halves((const uint16_t *)(c + CODE_BYTES) + 8);
            v8i dots[MAX_ROWS];
            block_dots(c, x, r0, b, R, P, dots);
            for (int r = 0; r < R; r++) {
                const int64_t row = r0 + r;
                const v8f scaled = __builtin_convertvector(dots[r], v8f) * ((v8f){0} + x->scales[row * blocks + b]);
                acc[r][g] = multiply_add(acc[r][g], step, scaled);
                acc[r][g] = multiply_add(acc[r][g], low, (v8f){0} + x->sums[row * blocks + b]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) memcpy(y + (r0 + r) * out + (g0 + g) * 8, &acc[r][g], sizeof(v8f));
}

static inline __attribute__((always_inline)) void rows_of(const inputs_t *x, const uint8_t *weights, int64_t out,
                                                          int64_t g0, int64_t groups_here, int64_t r0, const int R,
                                                          const int P, float *y) {
    int64_t g = g0;
    for (; g + MAX_GROUPS <= g0 + groups_here; g += MAX_GROUPS) tile(x, weights, out, g, r0, R, MAX_GROUPS, P, y);
    for (; g < g0 + groups_here; g++) tile(x, weights, out, g, r0, R, 1, P, y);
}

static inline __attribute__((always_inline)) void item_of(const inputs_t *x, int64_t rows, const uint8_t *weights,
                                                          int64_t out, int64_t g0, int64_t here, int64_t r0,
                                                          float *y) {
    const int64_t left = rows - r0;
#ifdef __AVX2__
    if (x->pairs != NULL) { /* rows <= PAIRED_ROWS */
        if (left == 2) rows_of(x, weights, out, g0, here, r0, 2, 1, y);
        else rows_of(x, weights, out, g0, here, r0, 1, 1, y);
        return;
    }
#endif
    if (left >= 4) rows_of(x, weights, out, g0, here, r0, 4, 0, y);
    else if (left == 3) rows_of(x, weights, out, g0, here, r0, 3, 0, y);
    else if (left == 2) rows_of(x, weights, out, g0, here, r0, 2, 0, y);
    else rows_of(x, weights, out, g0, here, r0, 1, 0, y);
}

/* Each row's blocks of 32 inputs as 16-bit codes, their scales d and d * (the sum of their codes) (see the top). */
static void quantize_rows(const float *x, int64_t rows, int64_t in, int threads, int16_t *xq, float *xd, float *xs) {
    const int64_t blocks = in / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (rows * in >= 65536)
    for (int64_t rb = 0; rb < rows * blocks; rb++) {
        const float *v = x + rb * BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float d = amax / 32767.0f, inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < BLOCK; i++) {
            const int32_t c = (int32_t)nearbyintf(v[i] * inverse);
            const int32_t clamped = c > 32767 ? 32767 : (c < -32767 ? -32767 : c);
            xq[rb * BLOCK + i] = (int16_t)clamped;
            total += clamped;
        }
        xd[rb] = d;
        xs[rb] = d * (float)total;
    }
}

/* x: [rows, in] float32; weights: [out / 8, in / 32] group-blocks (see tile; codes as block_dot reads them), with
 * float16 steps and lowest values. out a multiple of 8, in of 32. y: [rows, out] float32.
 * Returns 0, or -1 where the inputs' codes could not be allocated. */
int q4_linear(const float *x, int64_t rows, int64_t in, const uint8_t *weights, int64_t out, int threads, float *y) {
    const int64_t blocks = in / BLOCK, groups = out / 8;
    const int paired = rows <= PAIRED_ROWS;
    const size_t pair_bytes = paired ? 16 * sizeof(int16_t) * (size_t)(rows * in) : 0;
    const size_t bytes = pair_bytes + sizeof(int16_t) * (size_t)(rows * in) + 2 * sizeof(float) * (size_t)(rows * blocks);
    char *scratch = malloc(bytes + 64);
    if (scratch == NULL) return -1;
    char *aligned = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    int16_t *xq = (int16_t *)(aligned + pair_bytes);
    float *xd = (float *)(xq + rows * in), *xs = xd + rows * blocks;
    quantize_rows(x, rows, in, threads, xq, xd, xs);
    inputs_t inputs = {.codes = xq, .scales = xd, .sums = xs, .in = in, .blocks = blocks};
#ifdef __AVX2__
    inputs.pairs = NULL;
    if (paired) {
        __m256i *pairs = (__m256i *)aligned;
        for (int64_t p = 0; p < rows * in / 2; p++) {
            int32_t v;
            memcpy(&v, xq + 2 * p, 4);
            _mm256_store_si256(pairs + p, _mm256_set1_epi32(v));
        }
        inputs.pairs = pairs;
    }
#endif
    /* groups a work item covers: each thread's share of the groups cut into pieces of at most 16 (an even number, the
     * tiles' pairs), so that the threads get equal work (72 groups at two threads: six items of 12, where items of
     * 16 gave one thread 48 groups and the other 24) */
    const int64_t workers = threads > 0 ? threads : 1, share = (groups + workers - 1) / workers;
    const int64_t pieces = (share + 15) / 16, span = ((share + pieces - 1) / pieces + 1) / 2 * 2;
    const int64_t items = (groups + span - 1) / span, row_blocks = (rows + MAX_ROWS - 1) / MAX_ROWS;
#pragma omp parallel for schedule(static) collapse(2) num_threads(threads > 0 ? threads : 1)
    for (int64_t item = 0; item < items; item++)
        for (int64_t rb = 0; rb < row_blocks; rb++) {
            const int64_t g0 = item * span, here = groups - g0 < span ? groups - g0 : span;
            item_of(&inputs, rows, weights, out, g0, here, rb * MAX_ROWS, y);
        }
    free(scratch);
    return 0;
}
