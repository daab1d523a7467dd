/* A linear layer of 8-bit weights in blocks of 32 inputs, each block with its own scale (GGUF's Q8_0), on float32
 * inputs, in one fixed order per output. Compiled and loaded by amulet_core/native/build.py; wrapped by
 * amulet_core/model/q8_output.py.
 *
 * y[r, o] = the sum over the blocks b of o's weights, in block order, of scale[o, b] * dot(o, b, r), where
 * dot(o, b, r) adds the block's 32 products q[o, i] * x[r, i] in input order. A row's outputs depend on that row
 * and the weights only: one row or many, and any number of threads, give the same bits. Built without FMA
 * contraction and without fast-math. Eight outputs are computed side by side in the vector lanes (weights packed
 * so that a block's input i holds outputs 8g..8g+7 together), so no sum ever crosses lanes. */

#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 32
#define TILE 4 /* groups of 8 outputs computed together: independent chains of additions */

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

static inline v8f load_floats(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* x: [rows, in] float32; codes: [out / 8, in / 32, 32, 8] int8 (output 8g + l's code of input 32b + i at
 * [g, b, i, l]); scales: [out / 8, in / 32, 8] float32. out a multiple of 8, in of 32. y: [rows, out] float32. */
void q8_linear(const float *x, int64_t rows, int64_t in, const int8_t *codes, const float *scales, int64_t out,
               int threads, float *y) {
    const int64_t blocks = in / BLOCK, groups = out / 8;
    const int64_t tiles = (groups + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t first = tile * TILE;
        const int n = (int)(groups - first < TILE ? groups - first : TILE);
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * in;
            v8f acc[TILE];
            for (int g = 0; g < TILE; g++) acc[g] = (v8f){0};
            for (int64_t b = 0; b < blocks; b++) {
                v8f dot[TILE];
                for (int g = 0; g < TILE; g++) dot[g] = (v8f){0};
                for (int i = 0; i < BLOCK; i++) {
                    const v8f xi = (v8f){0} + xr[b * BLOCK + i];
                    for (int g = 0; g < n; g++)
                        dot[g] += load_codes(codes + (((first + g) * blocks + b) * BLOCK + i) * 8) * xi;
                }
                for (int g = 0; g < n; g++) acc[g] += load_floats(scales + ((first + g) * blocks + b) * 8) * dot[g];
            }
            for (int g = 0; g < n; g++) memcpy(y + r * out + (first + g) * 8, &acc[g], sizeof(v8f));
        }
    }
}
