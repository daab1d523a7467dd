/* A decoder layer's small float32 operations, each one call instead of torch's four to six: the RMS norm (with the
 * residual addition before it) and the rotary embedding. Compiled and loaded by amulet_core/native/build.py; wrapped
 * by amulet_core/engine/layer_kernels.py, which checks at load that they give torch's bits on this machine.
 *
 * Every product and sum is the one torch's operations make, in the same order, so the same bits:
 * - rms_norm: h = residual + x (when given), then (h * (1 / sqrt(sum(h * h) / n + eps))) * weight, where the sum
 *   is torch's float32 sum of a contiguous row (ATen's cascade_sum, its vectorized inner sum): vectors of `width`
 *   lanes (torch's Vectorized<float>: 8 with AVX2, 16 with AVX512) added four at a time into four partial vectors,
 *   every 16 of those additions folded into a second level (and every 256 into a third, 4,096 into a fourth), the
 *   levels and partials then added in order, the row's last elements beyond whole vectors added to 0 one by one,
 *   then the lanes in order. width is a parameter: the wrapper finds the one torch uses by comparing bits.
 * - rotate: x * cos + x rolled by half the head * signed sine, each product and the sum rounded apart.
 * Built without FMA contraction and without fast-math. Rows are independent: one row or many, any number of
 * threads, the same bits. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_WIDTH 16
#define LEVELS 4
#define LEVEL_STEP 16 /* ATen's 1 << max(4, ceil(log2(n)) / 4): 16 for any row under 2^20 vectors */

/* torch's float32 sum of h[i] * h[i] over a row of n (each square rounded, then added in torch's order). */
static float sum_of_squares(const float *h, int64_t n, int width) {
    const int64_t vectors = n / width, quads = vectors / 4;
    float acc[LEVELS][4][MAX_WIDTH];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + LEVEL_STEP <= quads) {
        for (int64_t j = 0; j < LEVEL_STEP; ++j, ++i)
            for (int k = 0; k < 4; k++) {
                const float *v = h + (4 * i + k) * width;
                for (int l = 0; l < width; l++) acc[0][k][l] += v[l] * v[l];
            }
        for (int level = 1; level < LEVELS; ++level) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < width; l++) {
                    acc[level][k][l] += acc[level - 1][k][l];
                    acc[level - 1][k][l] = 0.0f;
                }
            if ((i & ((int64_t)(LEVEL_STEP - 1) << (4 * level))) != 0) break;
        }
    }
    for (; i < quads; ++i)
        for (int k = 0; k < 4; k++) {
            const float *v = h + (4 * i + k) * width;
            for (int l = 0; l < width; l++) acc[0][k][l] += v[l] * v[l];
        }
    for (int level = 1; level < LEVELS; ++level)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < width; l++) acc[0][k][l] += acc[level][k][l];
    float lanes[MAX_WIDTH];
    for (int l = 0; l < width; l++) lanes[l] = acc[0][0][l];
    for (int64_t t = quads * 4; t < vectors; ++t)
        for (int l = 0; l < width; l++) lanes[l] += h[t * width + l] * h[t * width + l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < width; l++) lanes[l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t t = vectors * width; t < n; ++t) total += h[t] * h[t];
    for (int l = 0; l < width; l++) total += lanes[l];
    return total;
}

/* x, residual (or NULL), hidden (written where residual is given), out: [rows, n] float32, contiguous; weight: [n].
 * width: torch's float vector lanes (at most 16). n at least width. */
void rms_norm(const float *x, const float *residual, int64_t rows, int64_t n, const float *weight, float eps,
              int width, int threads, float *hidden, float *out) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *h = x + r * n;
        if (residual != NULL) {
            float *sum = hidden + r * n;
            for (int64_t i = 0; i < n; i++) sum[i] = residual[r * n + i] + h[i];
            h = sum;
        }
        const float scale = 1.0f / sqrtf(sum_of_squares(h, n, width) / (float)n + eps);
        float *y = out + r * n;
        for (int64_t i = 0; i < n; i++) y[i] = (h[i] * scale) * weight[i];
    }
}

/* The rotary embedding of `heads` heads of dim d in each of `tokens` rows: x[t, h, :] at x + t * row_stride +
 * h * d (float32, each head contiguous), cos and signed_sin [tokens, d] (signed_sin: the sine with its first
 * ceil(d / 2) negated, as rotate_half's negation moved onto it). out [tokens, heads, d]:
 * x * cos + roll(x, ceil(d / 2)) * signed_sin. */
void rotate(const float *x, int64_t row_stride, int64_t tokens, int64_t heads, int64_t d, const float *cos,
            const float *signed_sin, int threads, float *out) {
    const int64_t lead = d - d / 2;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (tokens * heads * d >= 65536)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            const float *v = x + t * row_stride + h * d, *c = cos + t * d, *s = signed_sin + t * d;
            float *y = out + (t * heads + h) * d;
            for (int64_t i = 0; i < d; i++) {
                const int64_t from = i >= lead ? i - lead : i + d - lead;
                const float straight = v[i] * c[i], turned = v[from] * s[i];
                y[i] = straight + turned;
            }
        }
}
