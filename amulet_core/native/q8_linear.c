/* A linear layer of 8-bit weights in blocks of 32 inputs, each block with its own scale (GGUF's Q8_0), on float32
 * inputs, in one fixed order per output. Compiled and loaded by amulet_core/native/build.py; wrapped by
 * amulet_core/model/q8_output.py.
 *
 * y[r, o] = the sum over the blocks b of o's weights, in block order, of scale[o, b] * dot(o, b, r), where
 * dot(o, b, r) adds the block's 32 products q[o, i] * x[r, i] in input order (each product and its sum one fused
 * multiply-add where the CPU has them). A row's outputs depend on that row and the weights only: one row or many,
 * and any number of threads, give the same bits. Built without FMA contraction and without fast-math (the fused
 * multiply-adds are explicit). Eight outputs are computed side by side in the vector lanes (weights packed so that
 * a block's input i holds outputs 8g..8g+7 together), so no sum ever crosses lanes; up to four rows share each
 * converted code. */

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

#define BLOCK 32
#define MAX_ROWS 4   /* rows computed together: each group's codes converted once for all of them */
#define MAX_GROUPS 4 /* groups of 8 outputs computed together: independent chains of additions */
#define AHEAD 16     /* blocks ahead the codes are prefetched (the hardware's prefetcher left the products waiting) */

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load_codes(const int8_t *p) {
#ifdef __AVX2__
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    v8f v;
    for (int l = 0; l < 8; l++) v[l] = (float)p[l];
    return v;
#endif
}

/* dot + w * x: one fused multiply-add where the CPU has them (the library is built for the CPU it runs on, so every
 * call on a machine rounds alike), else a product and a sum. */
static inline v8f multiply_add(v8f dot, v8f w, v8f x) {
#ifdef __FMA__
    return (v8f)_mm256_fmadd_ps((__m256)w, (__m256)x, (__m256)dot);
#else
    return dot + w * x;
#endif
}

static inline v8f load_floats(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Rows r0..r0+R-1 times groups g0..g0+G-1 (R, G constants where inlined): every output of every row gets the same
 * operations in the same order whatever R and G are. Row r's outputs of group g0 + g go to y + r * stride + 8g. */
static inline __attribute__((always_inline)) void tile_to(const float *x, int64_t in, const int8_t *codes,
                                                          const float *scales, int64_t blocks, int64_t g0,
                                                          int64_t r0, const int R, const int G, float *y,
                                                          int64_t stride) {
    v8f acc[MAX_ROWS][MAX_GROUPS];
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) acc[r][g] = (v8f){0};
    for (int64_t b = 0; b < blocks; b++) {
        for (int g = 0; g < G; g++) {
            const int64_t ahead = (g0 + g) * blocks + b + AHEAD;
            for (int line = 0; line < BLOCK * 8; line += 64) __builtin_prefetch(codes + ahead * BLOCK * 8 + line, 0, 3);
            __builtin_prefetch(scales + ahead * 8, 0, 3);
        }
        v8f dot[MAX_ROWS][MAX_GROUPS];
        for (int r = 0; r < R; r++)
            for (int g = 0; g < G; g++) dot[r][g] = (v8f){0};
        for (int i = 0; i < BLOCK; i++) {
            v8f w[MAX_GROUPS];
            for (int g = 0; g < G; g++) w[g] = load_codes(codes + (((g0 + g) * blocks + b) * BLOCK + i) * 8);
            for (int r = 0; r < R; r++) {
                const v8f xi = (v8f){0} + x[(r0 + r) * in + b * BLOCK + i];
                for (int g = 0; g < G; g++) dot[r][g] = multiply_add(dot[r][g], w[g], xi);
            }
        }
        for (int g = 0; g < G; g++) {
            const v8f s = load_floats(scales + ((g0 + g) * blocks + b) * 8);
            for (int r = 0; r < R; r++) acc[r][g] += s * dot[r][g];
        }
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) memcpy(y + r * stride + g * 8, &acc[r][g], sizeof(v8f));
}

static inline __attribute__((always_inline)) void tile(const float *x, int64_t in, const int8_t *codes,
                                                       const float *scales, int64_t out, int64_t blocks, int64_t g0,
                                                       int64_t r0, const int R, const int G, float *y) {
    tile_to(x, in, codes, scales, blocks, g0, r0, R, G, y + r0 * out + g0 * 8, out);
}

static inline __attribute__((always_inline)) void rows_of(const float *x, int64_t in, const int8_t *codes,
                                                          const float *scales, int64_t out, int64_t blocks,
                                                          int64_t g0, int64_t groups_here, int64_t r0, const int R,
                                                          float *y) {
    const int G = R >= 4 ? 2 : 4; /* 8 accumulators for 4 rows, 4 to 12 for fewer */
    int64_t g = g0;
    for (; g + G <= g0 + groups_here; g += G) tile(x, in, codes, scales, out, blocks, g, r0, R, G, y);
    for (; g < g0 + groups_here; g++) tile(x, in, codes, scales, out, blocks, g, r0, R, 1, y);
}

/* x: [rows, in] float32; codes: [out / 8, in / 32, 32, 8] int8 (output 8g + l's code of input 32b + i at
 * [g, b, i, l]); scales: [out / 8, in / 32, 8] float32. out a multiple of 8, in of 32. y: [rows, out] float32. */
void q8_linear(const float *x, int64_t rows, int64_t in, const int8_t *codes, const float *scales, int64_t out,
               int threads, float *y) {
    const int64_t blocks = in / BLOCK, groups = out / 8;
    const int64_t span = 16; /* groups a work item covers */
    const int64_t items = (groups + span - 1) / span, row_blocks = (rows + MAX_ROWS - 1) / MAX_ROWS;
#pragma omp parallel for schedule(static) collapse(2) num_threads(threads > 0 ? threads : 1)
    for (int64_t item = 0; item < items; item++)
        for (int64_t rb = 0; rb < row_blocks; rb++) {
            const int64_t g0 = item * span, here = groups - g0 < span ? groups - g0 : span;
            const int64_t r0 = rb * MAX_ROWS, left = rows - r0;
            if (left >= 4) rows_of(x, in, codes, scales, out, blocks, g0, here, r0, 4, y);
            else if (left == 3) rows_of(x, in, codes, scales, out, blocks, g0, here, r0, 3, y);
            else if (left == 2) rows_of(x, in, codes, scales, out, blocks, g0, here, r0, 2, y);
            else rows_of(x, in, codes, scales, out, blocks, g0, here, r0, 1, y);
        }
}

/* Some outputs of one row, each with the bits q8_linear gives it (the same operations on every output): y[k] is output
 * outputs[k] (n of them, each below out), each output's group of eight computed once for a run of outputs in one
 * group. x: [in] float32; y: [n] float32. */
void q8_linear_outputs(const float *x, int64_t in, const int8_t *codes, const float *scales, const int64_t *outputs,
                       int64_t n, float *y) {
    const int64_t blocks = in / BLOCK;
    float lanes[8];
    int64_t current = -1;
    for (int64_t k = 0; k < n; k++) {
        const int64_t group = outputs[k] / 8;
        if (group != current) tile_to(x, in, codes, scales, blocks, group, 0, 1, 1, lanes, 8);
        current = group;
        y[k] = lanes[outputs[k] % 8];
    }
}
