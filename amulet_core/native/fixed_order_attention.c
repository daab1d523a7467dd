/* Batch-invariant attention of packed query tokens over the paged KV cache: one fixed order of arithmetic per
 * (token, query head), whatever else the call holds. Compiled and loaded by amulet_core/native/build.py, wrapped
 * by amulet_core/engine/fixed_order_kernel.py, whose docstring states its contract.
 *
 * Each (token, head) is computed alone, from its own query row and its own context's slots:
 *   score_j = the dot product of the scaled query and key j in LANES partial sums (lane l adds dims l, l+LANES,
 *             ... in order), the lanes then added pairwise ((0+1)+(2+3))+((4+5)+(6+7));
 *             softcap: cap * tanh(score / cap);
 *   weight_j = exp(score_j - the largest score) (the kernel's own exp, kernel_exp), summed key after key in
 *             double and rounded once to float;
 *   out = sum over keys, in key order, of (weight_j / sum) * value_j, each dim its own float accumulator.
 * Which thread runs a (token, head), in which order, and how many threads there are, changes nothing. Built without
 * FMA contraction and without fast-math: a vector unit of any width gives the same bits. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define LANES 8
#define CHUNK 32 /* keys (and values) a work item's heads read together */

/* The kernel's exp: e^x = 2^n * e^r with n = rint(x / ln 2) and r = x - n ln 2 (ln 2 in two parts), e^r by a
 * degree-7 polynomial (Cephes' expf), each product and sum one fused multiply-add where the CPU has them; x below
 * about -87.3 (a normal 2^n's least) gives 0, NaN stays NaN. About 1 ulp from the exact value. The vector form
 * below does the same operations on eight values, so a value gets the same bits in either. */
#ifdef __FMA__
#define MULADD(a, b, c) fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif
#define EXP_LOWEST -87.33654475f /* ln of the least normal float */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f

static inline float kernel_exp(float x) {
    const float c = x < EXP_LOWEST ? EXP_LOWEST : x; /* NaN compares false and stays */
    const float n = rintf(c * EXP_LOG2E);
    float r = MULADD(n, -EXP_LN2_HI, c);
    r = MULADD(n, -EXP_LN2_LO, r);
    float p = 1.9875691500e-4f;
    p = MULADD(p, r, 1.3981999507e-3f);
    p = MULADD(p, r, 8.3334519073e-3f);
    p = MULADD(p, r, 4.1665795894e-2f);
    p = MULADD(p, r, 1.6666665459e-1f);
    p = MULADD(p, r, 5.0000001201e-1f);
    p = MULADD(p, r * r, r) + 1.0f;
    const int32_t e = (n > 127.0f ? 127 : (int32_t)n) + 127; /* x <= 0 here: n <= 0 */
    const uint32_t bits = (uint32_t)e << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < EXP_LOWEST ? 0.0f : p * scale;
}

/* w[j] = kernel_exp(w[j] - best) for j < n. */
static void exp_from(float *w, int64_t n, float best) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 lowest = _mm256_set1_ps(EXP_LOWEST), top = _mm256_set1_ps(127.0f);
    for (; j + 8 <= n; j += 8) {
        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(w + j), _mm256_set1_ps(best));
        const __m256 below = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
        const __m256 c = _mm256_blendv_ps(x, lowest, below);
        const __m256 n8 = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fmadd_ps(n8, _mm256_set1_ps(-EXP_LN2_HI), c);
        r = _mm256_fmadd_ps(n8, _mm256_set1_ps(-EXP_LN2_LO), r);
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
        const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(n8, top)), _mm256_set1_epi32(127));
        const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
        _mm256_storeu_ps(w + j, _mm256_blendv_ps(_mm256_mul_ps(p, scale), _mm256_setzero_ps(), below));
    }
#endif
    for (; j < n; j++) w[j] = kernel_exp(w[j] - best);
}

/* exp_from for the tests: w[j] = the kernel's exp of w[j] - best. */
void attention_exp(float *w, int64_t n, float best) { exp_from(w, n, best); }

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float half_to_float(uint16_t h) { /* IEEE binary16, exactly */
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023;
    float f;
    if (exponent == 0) f = ldexpf((float)mantissa, -24); /* zero or subnormal */
    else if (exponent == 31) f = mantissa ? NAN : INFINITY;
    else f = ldexpf((float)(mantissa | 1024), (int)exponent - 25);
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits |= sign;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* The cache formats: float32; bfloat16 with bfloat16 products (a bfloat16 model's: queries, scores and weights
 * rounded to bfloat16 as transformers' eager attention rounds them); float16 or bfloat16 holding a float32 model's
 * keys and values (each read as the float32 it is exactly, then the float32 arithmetic: the bits of a float32 cache
 * holding the same values). */
enum { FLOAT32 = 0, BF16_PRODUCTS = 1, FLOAT16 = 2, BF16 = 3 };

/* dim values of a 16-bit cache row as floats (exactly). */
static inline void widen(const uint16_t *row, int64_t dim, int format, float *out) {
    int64_t d = 0;
#ifdef __F16C__
    if (format == FLOAT16)
        for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(out + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + d))));
#endif
    for (; d < dim; d++) out[d] = format == FLOAT16 ? half_to_float(row[d]) : bf16_to_float(row[d]);
}

static inline float round_bf16(float f) { /* round to nearest even, as torch's float -> bfloat16 (NaN stays NaN) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return f;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    bits &= 0xffff0000u;
    memcpy(&f, &bits, sizeof f);
    return f;
}

typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

static inline lanes_t load_lanes(const float *p) {
    lanes_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float dot_lanes(const float *q, const float *k, int64_t dim) {
    lanes_t sums = {0};
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES) sums += load_lanes(q + d) * load_lanes(k + d); /* lane l: dims l, l + 8, ... */
    float lane[LANES];
    memcpy(lane, &sums, sizeof lane);
    for (int l = 0; d < dim; d++, l++) lane[l] += q[d] * k[d];
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

#if defined(__AVX__) && defined(__F16C__)
#define FAST_FLOAT16 1 /* float16 rows widened eight values at a time in the vector loops */
#else
#define FAST_FLOAT16 0
#endif

/* The scores of the eight keys at slots ctx[0..7] (a float32 cache, or with half a float16 one, from its KV head's
 * first row, dim a multiple of LANES): each key's lanes as dot_lanes adds them, then the eight keys' lanes added
 * pairwise side by side (hadd adds neighbouring lanes): the same sums in the same order as dot_lanes, eight at a time. */
static inline __attribute__((always_inline)) void dot_lanes_8_keys(const float *q, const void *keys,
                                                                   const int64_t *ctx, int64_t dim, const int half,
                                                                   float *out) {
#ifdef __AVX__
    const char *k[8];
    const int64_t bytes = half ? 2 : 4;
    __m256 s[8];
    for (int n = 0; n < 8; n++) {
        k[n] = (const char *)keys + ctx[n] * dim * bytes;
        s[n] = _mm256_setzero_ps();
    }
    /* dims outer, keys inner: each block of the query loaded once for the eight keys (the same sums per key) */
    for (int64_t d = 0; d < dim; d += LANES) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int n = 0; n < 8; n++) {
#if FAST_FLOAT16
            const __m256 kd = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k[n] + d * 2)))
                                   : _mm256_loadu_ps((const float *)k[n] + d);
#else
            const __m256 kd = _mm256_loadu_ps((const float *)k[n] + d);
#endif
            s[n] = _mm256_add_ps(s[n], _mm256_mul_ps(qd, kd));
        }
    }
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));  /* keys 0-3 */
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7])); /* keys 4-7 */
    /* lanes 0-3 of a key (first halves) plus lanes 4-7 (second halves) */
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31)));
#else
    (void)half;
    for (int n = 0; n < 8; n++) out[n] = dot_lanes(q, (const float *)keys + ctx[n] * dim, dim);
#endif
}

/* acc[d] += scores[j - lo] * v[slot of key j][d] for the keys lo..hi-1 in order, each dim its own sum:
 * the generic loop's arithmetic, with the dims held in registers (dim a constant where it is inlined). */
static inline __attribute__((always_inline)) void add_values(float *acc, const void *v, int64_t base, const int64_t *ctx,
                                                             int64_t lo, int64_t hi, const float *scores,
                                                             const int dim, const int half) {
    lanes_t sums[128 / LANES];
    for (int c = 0; c < dim / LANES; c++) sums[c] = load_lanes(acc + c * LANES);
    for (int64_t j = lo; j < hi; j++) {
        const float p = scores[j - lo];
        if (half) { /* FAST_FLOAT16 only */
#if FAST_FLOAT16
            const uint16_t *row = (const uint16_t *)v + (base + ctx[j]) * dim;
            for (int c = 0; c < dim / LANES; c++)
                sums[c] += p * (lanes_t)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + c * LANES)));
#endif
        } else {
            const float *row = (const float *)v + (base + ctx[j]) * dim;
            for (int c = 0; c < dim / LANES; c++) sums[c] += p * load_lanes(row + c * LANES);
        }
    }
    for (int c = 0; c < dim / LANES; c++) memcpy(acc + c * LANES, &sums[c], sizeof(lanes_t));
}

/* The largest of s[0..n-1] (NaN passed over; -inf when there is none): eight lanes' maxima, then the lanes'. The
 * maximum of a set does not depend on the order it is taken in (+0 and -0 aside, which give the same weights). */
static float largest(const float *s, int64_t n) {
    float best = -INFINITY;
    int64_t j = 0;
#ifdef __AVX__
    if (n >= 8) {
        __m256 b = _mm256_set1_ps(-INFINITY);
        for (; j + 8 <= n; j += 8) b = _mm256_max_ps(_mm256_loadu_ps(s + j), b); /* a NaN lane keeps b's */
        float lane[8];
        _mm256_storeu_ps(lane, b);
        for (int l = 0; l < 8; l++)
            if (lane[l] > best) best = lane[l];
    }
#endif
    for (; j < n; j++)
        if (s[j] > best) best = s[j];
    return best;
}

/* Each of the m (1..4) rows of n weights at w, w + n, ... divided by its sum, the sum taken key after key in double and
 * rounded once to float: the rows' sums side by side (independent chains), each in its own order. */
static inline __attribute__((always_inline)) void sums_of(float *w, int64_t n, const int m) {
    double total[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t j = 0; j < n; j++)
        for (int a = 0; a < m; a++) total[a] += (double)w[a * n + j];
    for (int a = 0; a < m; a++) {
        const float sum = (float)total[a];
        for (int64_t j = 0; j < n; j++) w[a * n + j] /= sum; /* each key's probability */
    }
}

static void sums_in_order(float *w, int64_t n, int64_t m) {
    if (m >= 4) sums_of(w, n, 4);
    else if (m == 3) sums_of(w, n, 3);
    else if (m == 2) sums_of(w, n, 2);
    else sums_of(w, n, 1);
}

/* q: float32 (unscaled), head h of token t from q + h * q_head_stride + t * q_token_stride (its dim values
 * contiguous); k_cache, v_cache: [kv_heads, slots, dim] in `format` (FLOAT32,
 * BF16_PRODUCTS, FLOAT16 or BF16); slots: flat int64; token_offset[t]: where token t's context starts in slots (its
 * key position p is slots[token_offset[t] + p]); token_length[t]: keys 0..length-1 are its context (itself
 * last); window > 0: only the last `window` of them; threads: OpenMP threads (ignored without OpenMP). out: [tokens, heads, dim] float32. Returns 0, or -1 when
 * a scratch allocation failed. */
int fixed_order_attention(const float *q, const void *k_cache, const void *v_cache, int64_t kv_heads, int64_t slots_total,
                          int64_t dim, int format, const int64_t *slots, const int64_t *token_offset,
                          const int64_t *token_length, int64_t tokens, int64_t heads, float scale, int64_t window,
                          float softcap, int threads, float *out, int64_t q_head_stride, int64_t q_token_stride) {
    const int64_t group = heads / kv_heads;
    const int bf16 = format == BF16_PRODUCTS, half = format == FLOAT16 && FAST_FLOAT16;
    const int wide = format == FLOAT32 || half; /* the vector loops read the rows as they are */
    const int64_t value_bytes = format == FLOAT32 ? 4 : 2;
    int64_t longest = 0;
    for (int64_t t = 0; t < tokens; t++)
        if (token_length[t] > longest) longest = token_length[t];
    /* A work item: one token's query heads of one KV head (all of them, or a part where the step has too few
     * items to keep the threads busy), which read the same keys and values: each chunk of CHUNK keys is read from
     * memory once for all of them, then from the L1 cache. */
    const int workers = threads > 0 ? threads : 1;
    int64_t together = group;
    while (together > 1 && tokens * kv_heads * (group / together) < 2 * workers) {
        int64_t next = together - 1;
        while (next > 1 && group % next != 0) next--;
        together = next;
    }
    const int64_t parts = group / together, items = tokens * kv_heads * parts;
    int failed = 0;
#pragma omp parallel num_threads(workers)
    {
        float *scores = malloc(sizeof(float) * (size_t)(longest > 0 ? longest : 1) * (size_t)together);
        float *qs = malloc(sizeof(float) * (size_t)dim * (size_t)together);
        float *kv = malloc(sizeof(float) * (size_t)dim);
        float *acc = malloc(sizeof(float) * (size_t)dim * (size_t)together);
        if (!scores || !qs || !kv || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (!scores || !qs || !kv || !acc) continue;
            /* KV head by KV head, token by token within one: the rows that read the same cache slots (the contexts
             * of one request over their shared prefix, a prefill chunk's tokens) read them one after another. */
            const int64_t g = item / (tokens * parts), t = item % (tokens * parts) / parts;
            const int64_t h0 = g * group + item % parts * together;
            const int64_t hi = token_length[t];
            const int64_t lo = (window > 0 && hi > window) ? hi - window : 0, n = hi - lo;
            const int64_t *ctx = slots + token_offset[t];
            for (int64_t a = 0; a < together; a++)
                for (int64_t d = 0; d < dim; d++) {
                    float x = q[(h0 + a) * q_head_stride + t * q_token_stride + d] * scale;
                    qs[a * dim + d] = bf16 ? round_bf16(x) : x;
                }
            /* Each head's scores: its dot products with the keys, in chunks of keys shared by the heads. */
            for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {
                const int64_t c1 = c0 + CHUNK < hi ? c0 + CHUNK : hi;
                for (int64_t a = 0; a < together; a++) {
                    const float *qa = qs + a * dim;
                    float *sa = scores + a * n;
                    int64_t j = c0;
                    if (wide && dim % LANES == 0) { /* eight keys at a time, the same sums */
                        const char *head_keys = (const char *)k_cache + g * slots_total * dim * value_bytes;
                        if (half)
                            for (; j + 8 <= c1; j += 8) dot_lanes_8_keys(qa, head_keys, ctx + j, dim, 1, sa + (j - lo));
                        else
                            for (; j + 8 <= c1; j += 8) dot_lanes_8_keys(qa, head_keys, ctx + j, dim, 0, sa + (j - lo));
                    }
                    for (; j < c1; j++) {
                        const int64_t at = (g * slots_total + ctx[j]) * dim;
                        if (format != FLOAT32) {
                            widen((const uint16_t *)k_cache + at, dim, format, kv);
                            sa[j - lo] = bf16 ? round_bf16(dot_lanes(qa, kv, dim)) : dot_lanes(qa, kv, dim);
                        } else {
                            sa[j - lo] = dot_lanes(qa, (const float *)k_cache + at, dim);
                        }
                    }
                }
            }
            /* Each head's weights: capped, exponentiated from the largest, summed in order, divided. */
            for (int64_t a = 0; a < together; a++) {
                float *sa = scores + a * n;
                if (softcap > 0.0f)
                    for (int64_t j = 0; j < n; j++) sa[j] = softcap * tanhf(sa[j] / softcap);
                exp_from(sa, n, largest(sa, n));
            }
            for (int64_t a = 0; a < together; a += 4) /* up to four heads' sums side by side, each in key order */
                sums_in_order(scores + a * n, n, together - a < 4 ? together - a : 4);
            memset(acc, 0, sizeof(float) * (size_t)(dim * together));
            /* Each head's weighted values, key after key, in chunks of values shared by the heads. */
            for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {
                const int64_t c1 = c0 + CHUNK < hi ? c0 + CHUNK : hi;
                for (int64_t a = 0; a < together; a++) {
                    const float *sa = scores + a * n + (c0 - lo);
                    float *aa = acc + a * dim;
                    if (wide && (dim == 64 || dim == 128)) { /* the same sums, kept in registers */
                        if (dim == 64 && half)
                            add_values(aa, v_cache, g * slots_total, ctx, c0, c1, sa, 64, 1);
                        else if (dim == 64)
                            add_values(aa, v_cache, g * slots_total, ctx, c0, c1, sa, 64, 0);
                        else if (half)
                            add_values(aa, v_cache, g * slots_total, ctx, c0, c1, sa, 128, 1);
                        else
                            add_values(aa, v_cache, g * slots_total, ctx, c0, c1, sa, 128, 0);
                    } else for (int64_t j = c0; j < c1; j++) {
                        const int64_t at = (g * slots_total + ctx[j]) * dim;
                        float p = sa[j - c0];
                        if (format != FLOAT32) {
                            if (bf16) p = round_bf16(p);
                            widen((const uint16_t *)v_cache + at, dim, format, kv);
                            for (int64_t d = 0; d < dim; d++) aa[d] += p * kv[d];
                        } else {
                            const float *v = (const float *)v_cache + at;
                            for (int64_t d = 0; d < dim; d++) aa[d] += p * v[d];
                        }
                    }
                }
            }
            for (int64_t a = 0; a < together; a++)
                memcpy(out + (t * heads + h0 + a) * dim, acc + a * dim, sizeof(float) * (size_t)dim);
        }
        free(scores);
        free(qs);
        free(kv);
        free(acc);
    }
    return failed ? -1 : 0;
}
