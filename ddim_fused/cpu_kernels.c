/* The CPU kernels of ddim_fused, built and loaded by ddim_fused/native.py:
 * - the keyed Philox4x32-10 normal stream: the integer half and the final store;
 * - the fused DDIM update in float32, with or without the paint blend (ddim_update_f32
 *   and ddim_paint_f32, at the end of this file).
 *
 * The noise stream: The counters, key, uniform mapping
 * and lane order are those of kernels/noise.py. Only exactly rounded float operations
 * happen here (int -> float of a 23-bit value, +0.5, *2^-23, *2pi, and the final
 * radius * cos/sin product), so the results are the same bits as the same operations
 * in torch; log, sqrt, cos and sin stay in torch, whose implementations define today's
 * normals.
 *
 * Flat index space: row r (a (step, sample) pair) has n_counters counters, and flat
 * index i = r * n_counters + c. Each call covers the flat range [begin, end).
 */
#include <stdint.h>

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define ROUNDS 10
#define INTERLEAVE 2 /* measured: 2 or 3 groups of four counters per step run ~25% faster than 1 */
#define INV_2_23 (1.0f / 8388608.0f)
#define TWO_PI_F ((float)6.283185307179586) /* torch rounds its 2*pi scalar to fp32 the same way */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

/* Where one segment of counters writes its four planes of uniforms. */
typedef struct {
    float *u0, *u2, *angle1, *angle3;
} planes_t;

static inline float uniform_open(uint32_t bits) { return ((float)(bits >> 9) + 0.5f) * INV_2_23; }

/* One counter at a time in 32-bit words; the compiler vectorizes what it can. */
static void philox_generic(planes_t p, int64_t first, int64_t count, uint32_t sample_key, uint32_t step_key,
                           int64_t stream, uint64_t seed) {
    for (int64_t i = 0; i < count; i++) {
        const int64_t counter = first + i;
        uint32_t c0 = (uint32_t)counter, c1 = sample_key, c2 = step_key;
        uint32_t c3 = (uint32_t)((counter >> 32) * 4 + stream);
        uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
        for (int r = 0; r < ROUNDS; r++) {
            const uint64_t prod_a = (uint64_t)c0 * ROUND_A, prod_b = (uint64_t)c2 * ROUND_B;
            const uint32_t next0 = (uint32_t)(prod_b >> 32) ^ c1 ^ k0;
            const uint32_t next2 = (uint32_t)(prod_a >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)prod_b;
            c3 = (uint32_t)prod_a;
            c0 = next0;
            c2 = next2;
            k0 += KEY_A;
            k1 += KEY_B;
        }
        p.u0[i] = uniform_open(c0);
        p.u2[i] = uniform_open(c2);
        p.angle1[i] = uniform_open(c1) * TWO_PI_F;
        p.angle3[i] = uniform_open(c3) * TWO_PI_F;
    }
}

#ifdef HAVE_AVX2_PATH
/* Four low 32-bit halves of v's 64-bit lanes as uniforms (times `scale` when given). */
__attribute__((target("avx2"))) static inline void store_uniforms(float *dst, __m256i v, int scale) {
    const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m128i bits = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, low_halves));
    __m128 u = _mm_cvtepi32_ps(_mm_srli_epi32(bits, 9));
    u = _mm_mul_ps(_mm_add_ps(u, _mm_set1_ps(0.5f)), _mm_set1_ps(INV_2_23));
    if (scale) u = _mm_mul_ps(u, _mm_set1_ps(TWO_PI_F));
    _mm_storeu_ps(dst, u);
}

/* Counters four to a vector, in 64-bit lanes: _mm256_mul_epu32 reads only the low 32
 * bits of each lane and returns the full 64-bit product, so the words can carry junk in
 * their upper halves and need no masking; the final store keeps the low halves.
 * Returns how many counters it did (a multiple of 4 * INTERLEAVE); the caller does the rest. */
__attribute__((target("avx2"))) static int64_t philox_avx2(planes_t p, int64_t first, int64_t count,
                                                           uint32_t sample_key, uint32_t step_key, int64_t stream,
                                                           uint64_t seed) {
    __m256i key0[ROUNDS], key1[ROUNDS];
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < ROUNDS; r++) {
        key0[r] = _mm256_set1_epi64x(k0);
        key1[r] = _mm256_set1_epi64x(k1);
        k0 += KEY_A;
        k1 += KEY_B;
    }
    const __m256i mul_a = _mm256_set1_epi64x(ROUND_A), mul_b = _mm256_set1_epi64x(ROUND_B);
    const __m256i sample = _mm256_set1_epi64x(sample_key), step = _mm256_set1_epi64x(step_key);
    const __m256i stream_v = _mm256_set1_epi64x(stream), lanes = _mm256_setr_epi64x(0, 1, 2, 3);
    int64_t i = 0;
    /* Independent groups side by side hide the latency of the multiply-xor chain. */
    for (; i + 4 * INTERLEAVE <= count; i += 4 * INTERLEAVE) {
        __m256i c0[INTERLEAVE], c1[INTERLEAVE], c2[INTERLEAVE], c3[INTERLEAVE];
        for (int g = 0; g < INTERLEAVE; g++) {
            const __m256i counter = _mm256_add_epi64(_mm256_set1_epi64x(first + i + 4 * g), lanes);
            c0[g] = counter;
            c1[g] = sample;
            c2[g] = step;
            c3[g] = _mm256_add_epi64(_mm256_slli_epi64(_mm256_srli_epi64(counter, 32), 2), stream_v);
        }
        for (int r = 0; r < ROUNDS; r++) {
            for (int g = 0; g < INTERLEAVE; g++) {
                const __m256i prod_a = _mm256_mul_epu32(c0[g], mul_a), prod_b = _mm256_mul_epu32(c2[g], mul_b);
                c0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_b, 32), c1[g]), key0[r]);
                c2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), c3[g]), key1[r]);
                c1[g] = prod_b;
                c3[g] = prod_a;
            }
        }
        for (int g = 0; g < INTERLEAVE; g++) {
            store_uniforms(p.u0 + i + 4 * g, c0[g], 0);
            store_uniforms(p.u2 + i + 4 * g, c2[g], 0);
            store_uniforms(p.angle1 + i + 4 * g, c1[g], 1);
            store_uniforms(p.angle3 + i + 4 * g, c3[g], 1);
        }
    }
    return i;
}
#endif

/* Philox uniforms of flat counters [begin, end) into four planes of end - begin floats
 * at `out`: u0, u2 (the Box-Muller radius inputs), then 2pi * u1, 2pi * u3 (the angles).
 * sample_keys and step_keys give each row's counter words c1 and c2 (low 32 bits used).
 * simd = 0 forces the generic path (for tests of both paths on one machine). */
void ddim_philox_uniforms(float *out, int64_t begin, int64_t end, int64_t n_counters, const int64_t *sample_keys,
                          const int64_t *step_keys, int64_t stream, uint64_t seed, int simd) {
    const int64_t m = end - begin;
    (void)simd; /* unused where there is no vector path */
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init(); /* idempotent; needed before the query in some loaders */
    const int avx2 = simd && __builtin_cpu_supports("avx2");
#endif
    for (int64_t idx = begin; idx < end;) {
        const int64_t row = idx / n_counters, first = idx % n_counters;
        const int64_t count = n_counters - first < end - idx ? n_counters - first : end - idx;
        const int64_t at = idx - begin;
        planes_t p = {out + at, out + m + at, out + 2 * m + at, out + 3 * m + at};
        const uint32_t sample_key = (uint32_t)sample_keys[row], step_key = (uint32_t)step_keys[row];
        int64_t done = 0;
#ifdef HAVE_AVX2_PATH
        if (avx2) done = philox_avx2(p, first, count, sample_key, step_key, stream, seed);
#endif
        planes_t rest = {p.u0 + done, p.u2 + done, p.angle1 + done, p.angle3 + done};
        philox_generic(rest, first + done, count - done, sample_key, step_key, stream, seed);
        idx += count;
    }
}

/* Normals of flat counters [begin, end) into `out` (rows of numel floats): element 4c + j
 * of a row gets lane j of (ra cos a, ra sin a, rb cos b, rb sin b), the last counter of a
 * row keeping only the lanes below numel. radius, cos_angle and sin_angle each hold two
 * planes of end - begin floats (a then b), in the layout ddim_philox_uniforms wrote. */
void ddim_box_muller_store(float *out, const float *radius, const float *cos_angle, const float *sin_angle,
                           int64_t begin, int64_t end, int64_t n_counters, int64_t numel) {
    const int64_t m = end - begin;
    for (int64_t idx = begin; idx < end;) {
        const int64_t row = idx / n_counters, first = idx % n_counters;
        const int64_t count = n_counters - first < end - idx ? n_counters - first : end - idx;
        const int64_t at = idx - begin;
        const float *ra = radius + at, *rb = radius + m + at;
        const float *cos_a = cos_angle + at, *cos_b = cos_angle + m + at;
        const float *sin_a = sin_angle + at, *sin_b = sin_angle + m + at;
        float *dst = out + row * numel + 4 * first;
        const int64_t whole = numel / 4 - first < count ? numel / 4 - first : count;
        for (int64_t i = 0; i < whole; i++) {
            dst[4 * i] = ra[i] * cos_a[i];
            dst[4 * i + 1] = ra[i] * sin_a[i];
            dst[4 * i + 2] = rb[i] * cos_b[i];
            dst[4 * i + 3] = rb[i] * sin_b[i];
        }
        for (int64_t i = whole > 0 ? whole : 0; i < count; i++) {
            const float lane[4] = {ra[i] * cos_a[i], ra[i] * sin_a[i], rb[i] * cos_b[i], rb[i] * sin_b[i]};
            for (int64_t j = 0; j < 4 && 4 * (first + i) + j < numel; j++) dst[4 * i + j] = lane[j];
        }
        idx += count;
    }
}

/* The fused DDIM update in float32, one pass over B samples of `numel` elements (the
 * torch path's float32 step on the CPU; ddim_fused/torch_step.py calls it):
 *
 *   e       = eps[i], or eps[i] + guidance * (eps_c[i] - eps[i]) when eps_c is given
 *   x0_out  = x0_x * x[i] + x0_eps * e                          (when x0_out is given)
 *   eps_out = e                                                 (when eps_out is given)
 *   out[i]  = (x_coef * x[i] + eps_coef * e) + noise_coef * n   (n from noise, when given)
 *
 * and, with a paint mask (ddim_paint_f32), then
 *
 *   t       = orig_coef * orig[i], plus orig_noise_coef * orig_noise[i] when given
 *   out[i]  = m * t + (out[i] - m * out[i])                     (m: the mask's value for i)
 *
 * which is exact at m = 0 and m = 1, as the Triton kernel's blend. Each product and sum is
 * rounded to float32 (no contraction: -ffp-contract=off), in this order. noise, orig and
 * orig_noise hold B rows, or one row shared by every sample (their *_rows == 1). out may
 * be x itself, or the noise when it has B rows (each element is read before it is written).
 */
typedef struct {
    float x_coef, eps_coef, guidance, noise_coef, x0_x, x0_eps, orig_coef, orig_noise_coef;
} step_coefs_t;

/* The update of len elements into dst; every pointer at the first element (0 when absent). */
static inline __attribute__((always_inline)) void update_span(
    float *dst, float *x0_out, float *eps_out, const float *x, const float *eps, const float *eps_c,
    const float *n, int64_t len, const step_coefs_t *c) {
    for (int64_t j = 0; j < len; j++) {
        const float xi = x[j];
        float e = eps[j];
        if (eps_c) e = e + c->guidance * (eps_c[j] - e);
        if (x0_out) x0_out[j] = c->x0_x * xi + c->x0_eps * e;
        if (eps_out) eps_out[j] = e;
        float acc = c->x_coef * xi + c->eps_coef * e;
        if (n) acc = acc + c->noise_coef * n[j];
        dst[j] = acc;
    }
}

/* The blend of len updated values into out. The mask advances with the elements
 * (MASK_STEP 1) or holds one value for the span (0): a constant, so that each use
 * compiles to its own loop. */
static inline __attribute__((always_inline)) void blend_span(
    float *out, const float *acc, const float *orig, const float *orig_noise, const float *mask, const int mask_step,
    int64_t len, const step_coefs_t *c) {
    for (int64_t j = 0; j < len; j++) {
        float t = c->orig_coef * orig[j];
        if (orig_noise) t = t + c->orig_noise_coef * orig_noise[j];
        const float m = mask[mask_step * j];
        out[j] = m * t + (acc[j] - m * acc[j]);
    }
}

#define BLEND_CHUNK 512 /* elements updated into a stack buffer, then blended (2 KiB, in L1) */

/* One run of len elements; every pointer at the run's first element (0 when absent).
 * With a mask, the update goes through a stack buffer in chunks: two simple loops, each of
 * which the compiler vectorizes (one loop over ten streams it does not). */
static inline __attribute__((always_inline)) void update_run(
    float *out, float *x0_out, float *eps_out, const float *x, const float *eps, const float *eps_c,
    const float *n, const float *orig, const float *orig_noise, const float *mask, const int mask_step, int64_t len,
    const step_coefs_t *c) {
    if (!mask) {
        update_span(out, x0_out, eps_out, x, eps, eps_c, n, len, c);
        return;
    }
    float acc[BLEND_CHUNK];
    for (int64_t j = 0; j < len; j += BLEND_CHUNK) {
        const int64_t k = len - j < BLEND_CHUNK ? len - j : BLEND_CHUNK;
        update_span(acc, x0_out ? x0_out + j : 0, eps_out ? eps_out + j : 0, x + j, eps + j, eps_c ? eps_c + j : 0,
                    n ? n + j : 0, k, c);
        blend_span(out + j, acc, orig + j, orig_noise ? orig_noise + j : 0, mask + mask_step * j, mask_step, k, c);
    }
}

/* The pointers of sample b's element `at` (rows of numel; inputs with one row share it). */
#define AT(p, rows) ((p) ? (p) + ((rows) == 1 ? 0 : b * numel) + at : 0)

static void update_sample(float *out, float *x0_out, float *eps_out, const float *x, const float *eps,
                          const float *eps_c, const float *noise, int64_t noise_rows, const float *orig,
                          int64_t orig_rows, const float *orig_noise, int64_t orig_noise_rows, const float *mask,
                          int64_t mid, int64_t inner, int64_t b, int64_t numel, const step_coefs_t *c) {
    if (!mask) {
        const int64_t at = 0;
        update_run(AT(out, 0), AT(x0_out, 0), AT(eps_out, 0), AT(x, 0), AT(eps, 0), AT(eps_c, 0), AT(noise, noise_rows),
                   0, 0, 0, 0, numel, c);
        return;
    }
    /* Mask layout (ddim_fused.masks): element (o * mid + k) * inner + i of a sample reads
     * mask[o * inner + i]. With inner == 1 a run of mid elements shares one value. */
    const int64_t outer = numel / (mid * inner);
    for (int64_t o = 0; o < outer; o++) {
        if (inner == 1) {
            const int64_t at = o * mid;
            update_run(AT(out, 0), AT(x0_out, 0), AT(eps_out, 0), AT(x, 0), AT(eps, 0), AT(eps_c, 0),
                       AT(noise, noise_rows), AT(orig, orig_rows), AT(orig_noise, orig_noise_rows), mask + o, 0, mid,
                       c);
            continue;
        }
        for (int64_t k = 0; k < mid; k++) {
            const int64_t at = (o * mid + k) * inner;
            update_run(AT(out, 0), AT(x0_out, 0), AT(eps_out, 0), AT(x, 0), AT(eps, 0), AT(eps_c, 0),
                       AT(noise, noise_rows), AT(orig, orig_rows), AT(orig_noise, orig_noise_rows), mask + o * inner,
                       1, inner, c);
        }
    }
}

void ddim_update_f32(float *out, float *x0_out, float *eps_out, const float *x, const float *eps,
                     const float *eps_c, const float *noise, int64_t batch, int64_t numel, int64_t noise_rows,
                     float x_coef, float eps_coef, float guidance, float noise_coef, float x0_x, float x0_eps) {
    const step_coefs_t c = {x_coef, eps_coef, guidance, noise_coef, x0_x, x0_eps, 0.0f, 0.0f};
    for (int64_t b = 0; b < batch; b++)
        update_sample(out, x0_out, eps_out, x, eps, eps_c, noise, noise_rows, 0, 0, 0, 0, 0, 1, 1, b, numel, &c);
}

/* ddim_update_f32, then the paint blend. mask: float32, (1 or B) rows of mask_numel
 * values, mask_stride apart (0: one mask for every sample), laid out by (mid, inner) as
 * in ddim_fused.masks (a dense mask: mid 1, inner numel). orig_noise may be 0. */
void ddim_paint_f32(float *out, float *x0_out, float *eps_out, const float *x, const float *eps, const float *eps_c,
                    const float *noise, int64_t batch, int64_t numel, int64_t noise_rows, float x_coef,
                    float eps_coef, float guidance, float noise_coef, float x0_x, float x0_eps, const float *orig,
                    int64_t orig_rows, const float *orig_noise, int64_t orig_noise_rows, const float *mask,
                    int64_t mask_stride, int64_t mid, int64_t inner, float orig_coef, float orig_noise_coef) {
    const step_coefs_t c = {x_coef, eps_coef, guidance, noise_coef, x0_x, x0_eps, orig_coef, orig_noise_coef};
    if (numel == 0) return; /* then mid * inner may be 0 too */
    for (int64_t b = 0; b < batch; b++)
        update_sample(out, x0_out, eps_out, x, eps, eps_c, noise, noise_rows, orig, orig_rows, orig_noise,
                      orig_noise_rows, mask + b * mask_stride, mid, inner, b, numel, &c);
}
