/* CPU kernels of the training step: dropout in one pass, activation + dropout fused, the multimodal gate,
 * rows scattered into attention grids, and an Adam step.
 *
 * Dropout: y = x * keep_i / (1 - p), keep_i drawn from a counter-based generator.
 * Why: torch's CPU generator is a single-threaded Mersenne twister, and a mask built from its draws takes four
 * passes over memory (draw, compare, scale, multiply). Here the keep decision of element i is a pure function of
 * (seed, i): SplitMix64 of counter i/4 gives 64 random bits, 16 of them for each of four elements, and the element
 * is kept when those 16 bits are >= threshold = round(p * 65536) (so P(drop) = p to within 8e-6). Being a function
 * of the index, the mask never has to be stored: the backward pass calls the same function on the gradient with
 * the same seed. Results do not depend on the number of threads.
 *
 * Built at first use by vega_utils/cpu_kernels.py (gcc -O3 -fopenmp); OpenMP here is the libgomp torch loaded.
 */
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9e3779b97f4a7c15ULL
#define BLOCK 4096 /* random words per parallel chunk (16384 elements) */

static inline uint64_t splitmix64(uint64_t seed, uint64_t counter) {
    uint64_t z = seed + (counter + 1) * GOLDEN;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Runs the statements given for every element i < n, with `bits` its 16 random bits, in parallel chunks of
 * BLOCK words: first the chunk's random words into a buffer (in L1), then one plain loop over its elements (both
 * loops vectorise). */
#define FOR_EACH_ELEMENT(...)                                                                            \
    int64_t words = (n + 3) / 4, chunks = (words + BLOCK - 1) / BLOCK;                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (chunks > 1)")                     \
    for (int64_t c = 0; c < chunks; c++) {                                                               \
        uint16_t lanes[4 * BLOCK];                                                                       \
        int64_t w0 = c * BLOCK, nw = words - w0 < BLOCK ? words - w0 : BLOCK;                            \
        for (int64_t w = 0; w < nw; w++) {                                                               \
            uint64_t r = splitmix64(seed, (uint64_t)(w0 + w));                                           \
            memcpy(lanes + 4 * w, &r, 8); /* little-endian: lane k holds bits 16k..16k+15 */             \
        }                                                                                                \
        int64_t i0 = 4 * w0, m = n - i0 < 4 * nw ? n - i0 : 4 * nw;                                      \
        for (int64_t j = 0; j < m; j++) {                                                                \
            int64_t i = i0 + j;                                                                          \
            uint32_t bits = lanes[j];                                                                    \
            __VA_ARGS__                                                                                  \
        }                                                                                                \
    }

/* x, y: n bfloat16 values (as raw 16-bit words); y may be x. */
void dropout_bf16(const uint16_t *x, uint16_t *y, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                  int threads) {
    FOR_EACH_ELEMENT(float v = bf16_to_f32(x[i]) * scale; y[i] = bits >= threshold ? f32_to_bf16(v) : 0;)
}

/* x, y: n float32 values; y may be x. (x is read whatever the decision, so the loop vectorises.) */
void dropout_f32(const float *x, float *y, int64_t n, uint64_t seed, uint32_t threshold, float scale, int threads) {
    FOR_EACH_ELEMENT(float v = x[i] * scale; y[i] = bits >= threshold ? v : 0.0f;)
}

/* ------------------------------------------------------------------ activation + dropout
 * y = dropout(f(z)) for f = gelu (tanh form: the feed-forward's; erf form: the output heads') or elu (alpha 1,
 * the VEGA projections), and its backward dz = dy * keep * scale * f'(z). torch runs f, its derivative and the
 * dropout as separate passes (its gelu_tanh alone at ~0.9 ns an element); here each way is one pass. f is computed
 * in float32 to ~2e-7 absolute, far below bfloat16's rounding step (4e-3 relative), so y is torch's bf16 result to
 * within a bf16 step or two. The float32 versions serve training only (dropout on), where the mask already differs
 * from torch's; evaluation in float32 keeps torch's ops (the parity tests).
 */
enum { ACT_GELU_TANH = 0, ACT_GELU_ERF = 1, ACT_ELU = 2 };

static inline float fast_exp(float x) { /* e^x, relative error < 2e-7 on [-87, 88] */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest (1.5 * 2^23 trick) */
    float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t e = ((int32_t)k + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}

/* f(z) and f'(z). Far in gelu's negative tail both are 0 (torch gives -0 too): the tiny values would be
 * subnormal floats, ~100x slower. */
static inline void gelu_tanh(float z, float *f, float *df) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    float t = 2.0f * c * (z + a * z * z * z);
    float tc = t < -30.0f ? -30.0f : (t > 30.0f ? 30.0f : t);
    float s = 1.0f / (1.0f + fast_exp(-tc));                          /* Phi(z) = 0.5 (1 + tanh(t/2)) */
    *f = t < -30.0f ? 0.0f : z * s;
    *df = t < -30.0f ? 0.0f : s + z * s * (1.0f - s) * 2.0f * c * (1.0f + 3.0f * a * z * z);
}

static inline void gelu_erf(float z, float *f, float *df) { /* Phi via erfc, Abramowitz & Stegun 7.1.26 */
    float x = (z < 0 ? -z : z) * 0.7071067811865476f;
    float x2 = x * x > 80.0f ? 80.0f : x * x;
    float t = 1.0f / (1.0f + 0.3275911f * x);
    float g = x * x > 80.0f ? 0.0f : fast_exp(-x2);                   /* exp(-z^2/2) */
    float erfc = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                  t * 1.061405429f)))) * g;
    float cdf = z < 0 ? 0.5f * erfc : 1.0f - 0.5f * erfc;
    *f = z * cdf;
    *df = cdf + z * 0.3989422804014327f * g;
}

static inline void elu(float z, float *f, float *df) { /* alpha = 1; expm1 by its series near 0 (no cancellation) */
    float zc = z < -80.0f ? -80.0f : (z > 0.0f ? 0.0f : z);
    float e = fast_exp(zc);
    float series = zc * (1.0f + zc * (0.5f + zc * (1.0f / 6 + zc * (1.0f / 24 + zc * (1.0f / 120)))));
    float em1 = zc > -0.125f ? series : e - 1.0f;
    *f = z > 0.0f ? z : em1;
    *df = z > 0.0f ? 1.0f : e;
}

/* One element of each way, for values stored as T with LOAD/STORE converting to and from float32 */
#define ACT_FWD(F, LOAD, STORE) float f, df; F(LOAD(z[i]), &f, &df); y[i] = bits >= threshold ? STORE(f * scale) : 0;
#define ACT_BWD(F, LOAD, STORE) float f, df; F(LOAD(z[i]), &f, &df); \
                                float g = LOAD(dy[i]) * scale * df; dz[i] = bits >= threshold ? STORE(g) : 0;
#define AS_F32(v) (v)
#define ACT_FWD_bf16(F) ACT_FWD(F, bf16_to_f32, f32_to_bf16)
#define ACT_BWD_bf16(F) ACT_BWD(F, bf16_to_f32, f32_to_bf16)
#define ACT_FWD_f32(F) ACT_FWD(F, AS_F32, AS_F32)
#define ACT_BWD_f32(F) ACT_BWD(F, AS_F32, AS_F32)

/* FOR_EACH_ELEMENT with STEP(f) for the activation `act` (one loop per activation, so each vectorises) */
#define FOR_EACH_ACTIVATION(STEP)                                                                        \
    if (act == ACT_GELU_TANH) { FOR_EACH_ELEMENT(STEP(gelu_tanh)) }                                      \
    else if (act == ACT_GELU_ERF) { FOR_EACH_ELEMENT(STEP(gelu_erf)) }                                   \
    else { FOR_EACH_ELEMENT(STEP(elu)) }

/* y = dropout(f(z)); threshold 0 and scale 1 give plain f. y may be z. (T: uint16_t holds bfloat16 bits.) */
#define DEFINE_ACT_DROPOUT(SUFFIX, T)                                                                    \
    void act_dropout_##SUFFIX(const T *z, T *y, int64_t n, int act, uint64_t seed, uint32_t threshold,  \
                              float scale, int threads) {                                                \
        FOR_EACH_ACTIVATION(ACT_FWD_##SUFFIX)                                                            \
    }                                                                                                    \
    /* dz = dy * keep * scale * f'(z). dz may be dy. */                                                  \
    void act_dropout_backward_##SUFFIX(const T *dy, const T *z, T *dz, int64_t n, int act, uint64_t seed, \
                                       uint32_t threshold, float scale, int threads) {                   \
        FOR_EACH_ACTIVATION(ACT_BWD_##SUFFIX)                                                            \
    }
DEFINE_ACT_DROPOUT(bf16, uint16_t)
DEFINE_ACT_DROPOUT(f32, float)

/* ------------------------------------------------------------------ the multimodal gate
 * y = sum_k softmax_k(l)_k s_k over the three modalities k (l = W s): one pass each way instead of torch's softmax
 * over a strided dimension, product and strided sum (4x faster forward). Computed in float32 (from bf16 inputs,
 * rounded once); as for the activations, the float32 versions serve training only.
 */
/* the loop that follows, split between the threads when its `work` (elements) is worth it */
#define PARALLEL_IF_LARGE _Pragma("omp parallel for schedule(static) num_threads(threads) if (work > 32768)")

/* softmax over three logits */
static inline void softmax3(float l0, float l1, float l2, float *w0, float *w1, float *w2) {
    float m = l0 > l1 ? l0 : l1;
    m = m > l2 ? m : l2;
    float e0 = fast_exp(l0 - m), e1 = fast_exp(l1 - m), e2 = fast_exp(l2 - m), inv = 1.0f / (e0 + e1 + e2);
    *w0 = e0 * inv; *w1 = e1 * inv; *w2 = e2 * inv;
}

/* The forward and backward for values stored as T, LOAD/STORE converting to and from float32. */
#define DEFINE_SOFTMAX_MIX3(SUFFIX, T, LOAD, STORE)                                                      \
    /* l, s: (rows, 3, H); y: (rows, H) = sum_k softmax_k(l[:, k]) s[:, k] */                           \
    void softmax_mix3_##SUFFIX(const T *l, const T *s, T *y, int64_t rows, int64_t H, int threads) {     \
        const int64_t work = rows * H;                                                                   \
        PARALLEL_IF_LARGE                                                                                \
        for (int64_t r = 0; r < rows; r++) {                                                             \
            const T *lr = l + r * 3 * H, *sr = s + r * 3 * H;                                            \
            for (int64_t j = 0; j < H; j++) {                                                            \
                float w0, w1, w2;                                                                        \
                softmax3(LOAD(lr[j]), LOAD(lr[H + j]), LOAD(lr[2 * H + j]), &w0, &w1, &w2);              \
                y[r * H + j] = STORE(w0 * LOAD(sr[j]) + w1 * LOAD(sr[H + j]) + w2 * LOAD(sr[2 * H + j])); \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    /* One row of the backward; restrict: no two arrays overlap (so it vectorises). */                   \
    static inline void softmax_mix3_backward_row_##SUFFIX(                                               \
            const T *restrict g_, const T *restrict l, const T *restrict s, T *restrict dl0,             \
            T *restrict dl1, T *restrict dl2, T *restrict ds0, T *restrict ds1, T *restrict ds2, int64_t H) { \
        for (int64_t j = 0; j < H; j++) {                                                                \
            float w0, w1, w2, g = LOAD(g_[j]);                                                           \
            float s0 = LOAD(s[j]), s1 = LOAD(s[H + j]), s2 = LOAD(s[2 * H + j]);                         \
            softmax3(LOAD(l[j]), LOAD(l[H + j]), LOAD(l[2 * H + j]), &w0, &w1, &w2);                     \
            float y = w0 * s0 + w1 * s1 + w2 * s2;                                                       \
            ds0[j] = STORE(g * w0); ds1[j] = STORE(g * w1); ds2[j] = STORE(g * w2);                      \
            dl0[j] = STORE(g * w0 * (s0 - y)); dl1[j] = STORE(g * w1 * (s1 - y));                        \
            dl2[j] = STORE(g * w2 * (s2 - y));                                                           \
        }                                                                                                \
    }                                                                                                    \
    /* dy (rows, H) -> ds_k = dy w_k, dl_k = dy w_k (s_k - y), y the float32 mix; dl, ds: (rows, 3, H) */ \
    void softmax_mix3_backward_##SUFFIX(const T *dy, const T *l, const T *s, T *dl, T *ds, int64_t rows,  \
                                        int64_t H, int threads) {                                        \
        const int64_t work = rows * H;                                                                   \
        PARALLEL_IF_LARGE                                                                                \
        for (int64_t r = 0; r < rows; r++) {                                                             \
            int64_t o = r * 3 * H;                                                                       \
            softmax_mix3_backward_row_##SUFFIX(dy + r * H, l + o, s + o, dl + o, dl + o + H, dl + o + 2 * H, \
                                               ds + o, ds + o + H, ds + o + 2 * H, H);                   \
        }                                                                                                \
    }
DEFINE_SOFTMAX_MIX3(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_SOFTMAX_MIX3(f32, float, AS_F32, AS_F32)

/* ------------------------------------------------------------------ rows into attention grids
 * out[index[i]] = x[i] for rows of row_bytes bytes, and out[zero_rows[j]] = 0: every row of out written once.
 * torch's index_copy_ goes element by element (~8 GB/s here); whole-row copies run at memory speed.
 */
void scatter_rows(const char *x, const int64_t *index, char *out, int64_t rows, int64_t row_bytes,
                  const int64_t *zero_rows, int64_t n_zero, int threads) {
    const int64_t work = (rows + n_zero) * row_bytes / 2;
#pragma omp parallel num_threads(threads) if (work > 32768)
    {
#pragma omp for schedule(static) nowait
        for (int64_t j = 0; j < n_zero; j++) memset(out + zero_rows[j] * row_bytes, 0, (size_t)row_bytes);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) memcpy(out + index[i] * row_bytes, x + i * row_bytes, (size_t)row_bytes);
    }
}

/* ------------------------------------------------------------------ Adam / AdamW step with bf16 weight copies
 * One step over n float32 parameters p with float32 moments m, v, computed as torch's fused CPU kernel does:
 * weight decay (decoupled: p -= lr wd p; else g += wd p), m = m + (1 - beta1) (g - m),
 * v = beta2 v + (1 - beta2) g^2, p -= step_size m / (sqrt(v) / bias2_sqrt + eps); 1 - beta comes in computed in
 * double, as torch does (1.0f - 0.999f would be off by 1e-5 relative).
 * The gradient is float32 (g32) or bfloat16 (g16; the other is NULL). If shadow is not NULL it receives the new
 * p rounded to bfloat16: the copy the next forward pass multiplies with, written while p is in registers instead
 * of in a separate cast pass (see vega_utils/shadow_weights.py).
 */
#define ADAM_BODY(GRAD)                                                                                  \
    float g = (GRAD), w = p[i];                                                                          \
    g = g + w * decay_g; /* one of the two decays is 0: no branch in the loop */                          \
    w = w - w * decay_p;                                                                                 \
    float mi = m[i] + one_minus_beta1 * (g - m[i]);                                                      \
    float vi = beta2 * v[i] + one_minus_beta2 * g * g;                                                   \
    w = w - step_size * mi / (__builtin_sqrtf(vi) / bias2_sqrt + eps);                                   \
    m[i] = mi; v[i] = vi; p[i] = w;

/* Tensor j: n[j] parameters p[j] with moments m[j], v[j], gradient g32[j] or g16[j] (the other NULL), optional
 * shadow[j]; its own step_size[j] and bias2_sqrt[j] (steps can differ between tensors). One parallel region for
 * all tensors, each split between the threads, with no barrier between tensors (they are independent). */
void adam_step(int count, float **p_, float **m_, float **v_, const float **g32_, const uint16_t **g16_,
               uint16_t **shadow_, const int64_t *n_, const float *step_size_, const float *bias2_sqrt_, float lr,
               float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float weight_decay,
               int decoupled, int threads) {
    const float decay_p = decoupled ? lr * weight_decay : 0.0f, decay_g = decoupled ? 0.0f : weight_decay;
#pragma omp parallel num_threads(threads)
    for (int j = 0; j < count; j++) {
        float *p = p_[j], *m = m_[j], *v = v_[j];
        const float *g32 = g32_[j];
        const uint16_t *g16 = g16_[j];
        uint16_t *shadow = shadow_[j];
        const int64_t n = n_[j];
        const float step_size = step_size_[j], bias2_sqrt = bias2_sqrt_[j];
        if (g16 && shadow) {
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < n; i++) { ADAM_BODY(bf16_to_f32(g16[i])) shadow[i] = f32_to_bf16(w); }
        } else if (g16) {
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < n; i++) { ADAM_BODY(bf16_to_f32(g16[i])) }
        } else if (shadow) {
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < n; i++) { ADAM_BODY(g32[i]) shadow[i] = f32_to_bf16(w); }
        } else {
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < n; i++) { ADAM_BODY(g32[i]) }
        }
    }
}
