/* CPU kernels of the framework's fake quantizers: each forward and each backward is one pass over
 * the tensor (float32, contiguous), parallel over chunks with OpenMP and vectorised within a chunk.
 * framework/quant/native/__init__.py builds this file once per machine and calls it through ctypes;
 * framework/quant/fused.py gives the math, and the tests compare every output and gradient with the
 * plain torch ops (same rounding: round half to even; same tie rules at the clipping bounds).
 *
 * Mixed learned-range activation (EdMIPS/GMPQ supernet, PACT candidates), K candidates:
 *   y = sum_i p_i * rint(c_i / s_i) * s_i,   c_i = clamp(x, lo_i, r_i),  s_i = r_i / L_i
 *   lo_i = 0 (unsigned: c_i = min(relu(x), r_i)) or -r_i (signed: c_i = max(min(x, r_i), -r_i))
 * backward (straight-through rounding):
 *   dy/dx   = sum_i p_i * dc_i/dx
 *   dy/dp_i = rint(c_i / s_i) * s_i
 *   dy/dr_i = p_i * (dc_i/dr_i + (rint(u_i) - u_i) / L_i),   u_i = c_i / s_i
 * where min/max split the gradient in half at ties, as torch.minimum/maximum do.
 *
 * LSQ (Esser et al., ICLR 2020), step s per tensor or per outer index (output channel):
 *   y = rint(clamp(x / s, Qn, Qp)) * s
 *   dy/dx = 1[Qn <= x/s <= Qp];  dy/ds = rint(clamp(v, Qn, Qp)) - v * 1[Qn <= v <= Qp],  v = x / s
 *
 * Where the compiler targets AVX-512 and there are 1 to 4 candidates (the usual sets), the mixed
 * activation's forward and its unsigned backward take every candidate in one pass over each block of 16
 * elements, written with intrinsics (forward_k, backward_unsigned_k): x and g are read and y or gx
 * written once per element instead of once per candidate, and the candidates' sums stay in registers.
 * On this 2-core machine that halved the backward (benchmarks/README.md); the operations and their
 * order are the scalar code's, so the results are the same to the bit (tests/unit/test_native_kernels.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define CHUNK 2048
#define MAX_K 16

static inline int64_t n_chunks(int64_t n) { return (n + CHUNK - 1) / CHUNK; }

#define LANES 16

/* c = clamp(x, lo, r) and its derivatives w.r.t. x and r, with torch's tie rules (minimum/maximum
 * give each side half the gradient at a tie; relu's gradient at 0 is 0) */
static inline float clip_value(float x, float r, int sign) {
    if (sign) {
        float m = x < r ? x : r;
        return m > -r ? m : -r;
    }
    float rx = x > 0.0f ? x : 0.0f;
    return rx < r ? rx : r;
}

static inline float clip_dx(float x, float r, int sign) {
    if (sign) {
        float m = x < r ? x : r;
        float dm_dx = x < r ? 1.0f : (x == r ? 0.5f : 0.0f);
        float dc_dm = m > -r ? 1.0f : (m == -r ? 0.5f : 0.0f);
        return dc_dm * dm_dx;
    }
    float rx = x > 0.0f ? x : 0.0f;
    return x > 0.0f ? (rx < r ? 1.0f : (rx == r ? 0.5f : 0.0f)) : 0.0f;
}

static inline float clip_dr(float x, float r, int sign) {
    if (sign) {
        float m = x < r ? x : r;
        float dm_dr = x > r ? 1.0f : (x == r ? 0.5f : 0.0f);
        float dc_dm = m > -r ? 1.0f : (m == -r ? 0.5f : 0.0f);
        float dc_dlo = m < -r ? 1.0f : (m == -r ? 0.5f : 0.0f);
        return dc_dm * dm_dr - dc_dlo;
    }
    float rx = x > 0.0f ? x : 0.0f;
    return rx > r ? 1.0f : (rx == r ? 0.5f : 0.0f);
}

static inline void mixed_forward_chunk(const float *restrict x, float *restrict y, int64_t len, const float *p,
                                       const float *r, const float *s, int k, int sign) {
    for (int64_t j = 0; j < len; j++) y[j] = 0.0f;
    for (int i = 0; i < k; i++) {
        const float ri = r[i], si = s[i], pi = p[i];
        for (int64_t j = 0; j < len; j++) y[j] += pi * (rintf(clip_value(x[j], ri, sign) / si) * si);
    }
}

static inline void mixed_backward_chunk_unsigned(const float *restrict g, const float *restrict x, float *restrict gx,
                                                 int64_t len, const float *p, const float *r, const float *s,
                                                 const float *levels, int k, double *sum_p, double *sum_r);

#ifdef __AVX512F__
#include <immintrin.h>
/* The unsigned backward with K (1..4) candidates known at compile time, in AVX-512: one pass over the
 * chunk for all candidates (x and g read, gx written once per element), every candidate's three sums in
 * registers. Each operation is the scalar code's (max, min, div, round to nearest even, separate multiply
 * and add, in the same order), so the results equal mixed_backward_chunk_unsigned's. */
static inline __attribute__((always_inline)) void backward_unsigned_k(
    const float *restrict g, const float *restrict x, float *restrict gx, int64_t len, const float *p,
    const float *r, const float *s, const float *levels, const int k, double *sum_p, double *sum_r) {
    float p_total = 0.0f;
    for (int i = 0; i < k; i++) p_total += p[i];
    __m512 acc_a[4], acc_d[4], acc_c[4], rv[4], sv[4], pv[4];
    for (int i = 0; i < k; i++) {
        acc_a[i] = acc_d[i] = acc_c[i] = _mm512_setzero_ps();
        rv[i] = _mm512_set1_ps(r[i]);
        sv[i] = _mm512_set1_ps(s[i]);
        pv[i] = _mm512_set1_ps(p[i]);
    }
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    const __m512 ptot = _mm512_set1_ps(p_total);
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
        const __m512 xv = _mm512_loadu_ps(x + j), gv = _mm512_loadu_ps(g + j);
        const __m512 rx = _mm512_max_ps(xv, zero);
        __m512 dr_sum = zero;
        for (int i = 0; i < k; i++) {
            const __m512 u = _mm512_div_ps(_mm512_min_ps(rx, rv[i]), sv[i]);
            const __m512 rounded = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __mmask16 above = _mm512_cmp_ps_mask(rx, rv[i], _CMP_GT_OQ);
            const __mmask16 tie = _mm512_cmp_ps_mask(rx, rv[i], _CMP_EQ_OQ);
            const __m512 dr = _mm512_mask_blend_ps(above, _mm512_maskz_mov_ps(tie, half), one);
            acc_a[i] = _mm512_add_ps(acc_a[i], _mm512_mul_ps(gv, rounded));
            acc_d[i] = _mm512_add_ps(acc_d[i], _mm512_mul_ps(gv, _mm512_sub_ps(rounded, u)));
            acc_c[i] = _mm512_add_ps(acc_c[i], _mm512_mul_ps(gv, dr));
            dr_sum = _mm512_add_ps(dr_sum, _mm512_mul_ps(pv[i], dr));
        }
        const __mmask16 positive = _mm512_cmp_ps_mask(xv, zero, _CMP_GT_OQ);
        _mm512_storeu_ps(gx + j, _mm512_mul_ps(gv, _mm512_sub_ps(_mm512_maskz_mov_ps(positive, ptot), dr_sum)));
    }
    for (int i = 0; i < k; i++) {
        float lanes_a[16], lanes_d[16], lanes_c[16];
        _mm512_storeu_ps(lanes_a, acc_a[i]);
        _mm512_storeu_ps(lanes_d, acc_d[i]);
        _mm512_storeu_ps(lanes_c, acc_c[i]);
        double a = 0.0, d = 0.0, c = 0.0;
        for (int l = 0; l < 16; l++) {
            a += lanes_a[l];
            d += lanes_d[l];
            c += lanes_c[l];
        }
        sum_p[i] += (double)s[i] * a;
        sum_r[i] += c + d / (double)levels[i];
    }
    if (j < len)  /* the last chunk's ragged end: the per-candidate code */
        mixed_backward_chunk_unsigned(g + j, x + j, gx + j, len - j, p, r, s, levels, k, sum_p, sum_r);
}

/* The forward likewise: all K candidates per block of 16 elements, y written once. */
static inline __attribute__((always_inline)) void forward_k(const float *restrict x, float *restrict y, int64_t len,
                                                            const float *p, const float *r, const float *s,
                                                            const int k, const int sign) {
    __m512 rv[4], nrv[4], sv[4], pv[4];
    for (int i = 0; i < k; i++) {
        rv[i] = _mm512_set1_ps(r[i]);
        nrv[i] = _mm512_set1_ps(-r[i]);
        sv[i] = _mm512_set1_ps(s[i]);
        pv[i] = _mm512_set1_ps(p[i]);
    }
    const __m512 zero = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
        const __m512 xv = _mm512_loadu_ps(x + j), rx = sign ? xv : _mm512_max_ps(xv, zero);
        __m512 yv = zero;
        for (int i = 0; i < k; i++) {
            const __m512 c = sign ? _mm512_max_ps(_mm512_min_ps(xv, rv[i]), nrv[i]) : _mm512_min_ps(rx, rv[i]);
            const __m512 level = _mm512_roundscale_ps(_mm512_div_ps(c, sv[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            yv = _mm512_add_ps(yv, _mm512_mul_ps(pv[i], _mm512_mul_ps(level, sv[i])));
        }
        _mm512_storeu_ps(y + j, yv);
    }
    if (j < len)
        mixed_forward_chunk(x + j, y + j, len - j, p, r, s, k, sign);
}

static int forward_fixed(const float *x, float *y, int64_t len, const float *p, const float *r, const float *s, int k,
                         int sign) {
    switch (k) {
    case 1: forward_k(x, y, len, p, r, s, 1, sign); return 1;
    case 2: forward_k(x, y, len, p, r, s, 2, sign); return 1;
    case 3: forward_k(x, y, len, p, r, s, 3, sign); return 1;
    case 4: forward_k(x, y, len, p, r, s, 4, sign); return 1;
    default: return 0;
    }
}

/* backward_unsigned_k for k = 1..4 (the usual candidate sets); 0 when k has no instance */
static int backward_unsigned_fixed(const float *g, const float *x, float *gx, int64_t len, const float *p,
                                   const float *r, const float *s, const float *levels, int k, double *sum_p,
                                   double *sum_r) {
    switch (k) {
    case 1: backward_unsigned_k(g, x, gx, len, p, r, s, levels, 1, sum_p, sum_r); return 1;
    case 2: backward_unsigned_k(g, x, gx, len, p, r, s, levels, 2, sum_p, sum_r); return 1;
    case 3: backward_unsigned_k(g, x, gx, len, p, r, s, levels, 3, sum_p, sum_r); return 1;
    case 4: backward_unsigned_k(g, x, gx, len, p, r, s, levels, 4, sum_p, sum_r); return 1;
    default: return 0;
    }
}
#else
static int forward_fixed(const float *x, float *y, int64_t len, const float *p, const float *r, const float *s, int k,
                         int sign) {
    (void)x, (void)y, (void)len, (void)p, (void)r, (void)s, (void)k, (void)sign;
    return 0;
}

static int backward_unsigned_fixed(const float *g, const float *x, float *gx, int64_t len, const float *p,
                                   const float *r, const float *s, const float *levels, int k, double *sum_p,
                                   double *sum_r) {
    (void)g, (void)x, (void)gx, (void)len, (void)p, (void)r, (void)s, (void)levels, (void)k, (void)sum_p, (void)sum_r;
    return 0;
}
#endif

void mixed_range_forward(const float *x, float *y, int64_t n, const float *p, const float *r,
                         const float *levels, int k, int sign, int threads) {
    float s[MAX_K];
    for (int i = 0; i < k; i++) s[i] = r[i] / levels[i];
    const int64_t chunks = n_chunks(n);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t begin = c * CHUNK, len = (begin + CHUNK < n ? begin + CHUNK : n) - begin;
        if (forward_fixed(x + begin, y + begin, len, p, r, s, k, sign))
            continue;
        if (sign)
            mixed_forward_chunk(x + begin, y + begin, len, p, r, s, k, 1);
        else
            mixed_forward_chunk(x + begin, y + begin, len, p, r, s, k, 0);
    }
}

/* one chunk of the mixed backward: gx = g * sum_i p_i dc_i/dx, and the chunk's sums per candidate
 * of g * Q_i (for p_i) and g * dQ_i/dr_i (for r_i), in LANES partial sums each (vector registers) */
static inline void mixed_backward_chunk(const float *restrict g, const float *restrict x, float *restrict gx,
                                        int64_t len, const float *p, const float *r, const float *s,
                                        const float *levels, int k, int sign, double *sum_p, double *sum_r) {
    for (int64_t j = 0; j < len; j++) gx[j] = 0.0f;
    for (int i = 0; i < k; i++) {
        const float ri = r[i], si = s[i], pi = p[i], inv_level = 1.0f / levels[i];
        float acc_p[LANES] = {0}, acc_r[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= len; j += LANES) {
            for (int l = 0; l < LANES; l++) {
                const float xj = x[j + l], gj = g[j + l];
                const float u = clip_value(xj, ri, sign) / si, rounded = rintf(u);
                acc_p[l] += gj * (rounded * si);
                acc_r[l] += gj * (clip_dr(xj, ri, sign) + (rounded - u) * inv_level);
                gx[j + l] += pi * clip_dx(xj, ri, sign);
            }
        }
        double tail_p = 0.0, tail_r = 0.0;
        for (; j < len; j++) {
            const float xj = x[j], gj = g[j];
            const float u = clip_value(xj, ri, sign) / si, rounded = rintf(u);
            tail_p += gj * (rounded * si);
            tail_r += gj * (clip_dr(xj, ri, sign) + (rounded - u) * inv_level);
            gx[j] += pi * clip_dx(xj, ri, sign);
        }
        for (int l = 0; l < LANES; l++) {
            tail_p += acc_p[l];
            tail_r += acc_r[l];
        }
        sum_p[i] += tail_p;
        sum_r[i] += tail_r;
    }
    for (int64_t j = 0; j < len; j++) gx[j] *= g[j];
}

/* The unsigned case (inputs after a ReLU: every searched layer but a network's first), with fewer
 * operations per element and candidate: relu(x) once per element; dc/dx = 1[x > 0] - dc/dr (both are
 * 0 for x <= 0, and they split 1 between them above 0, ties included); and three sums per candidate,
 *   A = sum g * rint(u),  D = sum g * (rint(u) - u),  C = sum g * dc/dr,
 * giving dL/dp_i = s_i * A and dL/dr_i (before the factor p_i) = C + D / L_i. */
static inline void mixed_backward_chunk_unsigned(const float *restrict g, const float *restrict x, float *restrict gx,
                                                 int64_t len, const float *p, const float *r, const float *s,
                                                 const float *levels, int k, double *sum_p, double *sum_r) {
    float p_total = 0.0f;
    for (int i = 0; i < k; i++) p_total += p[i];
    for (int64_t j = 0; j < len; j++) gx[j] = 0.0f;  /* sum_i p_i * dc_i/dr_i */
    for (int i = 0; i < k; i++) {
        const float ri = r[i], si = s[i], pi = p[i];
        float acc_a[LANES] = {0}, acc_d[LANES] = {0}, acc_c[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= len; j += LANES) {
            for (int l = 0; l < LANES; l++) {
                const float xj = x[j + l], gj = g[j + l];
                const float rx = xj > 0.0f ? xj : 0.0f;
                const float u = (rx < ri ? rx : ri) / si, rounded = rintf(u);
                const float dr = rx > ri ? 1.0f : (rx == ri ? 0.5f : 0.0f);
                acc_a[l] += gj * rounded;
                acc_d[l] += gj * (rounded - u);
                acc_c[l] += gj * dr;
                gx[j + l] += pi * dr;
            }
        }
        double a = 0.0, d = 0.0, c = 0.0;
        for (; j < len; j++) {
            const float xj = x[j], gj = g[j];
            const float rx = xj > 0.0f ? xj : 0.0f;
            const float u = (rx < ri ? rx : ri) / si, rounded = rintf(u);
            const float dr = rx > ri ? 1.0f : (rx == ri ? 0.5f : 0.0f);
            a += gj * rounded;
            d += gj * (rounded - u);
            c += gj * dr;
            gx[j] += pi * dr;
        }
        for (int l = 0; l < LANES; l++) {
            a += acc_a[l];
            d += acc_d[l];
            c += acc_c[l];
        }
        sum_p[i] += (double)si * a;
        sum_r[i] += c + d / (double)levels[i];
    }
    for (int64_t j = 0; j < len; j++) gx[j] = g[j] * ((x[j] > 0.0f ? p_total : 0.0f) - gx[j]);
}


void mixed_range_backward(const float *g, const float *x, float *gx, int64_t n, const float *p, const float *r,
                          const float *levels, int k, int sign, float *grad_p, float *grad_r, int threads) {
    float s[MAX_K];
    for (int i = 0; i < k; i++) s[i] = r[i] / levels[i];
    const int64_t chunks = n_chunks(n);
    /* every chunk's sums land in their own slots, then are added in chunk order: the result does not
     * depend on which thread took which chunk, nor on the thread count (no atomics on floating point) */
    double partial_on_stack[2 * MAX_K * 8];
    const size_t slots = (size_t)chunks * 2 * (size_t)k;
    double *partial = slots <= sizeof partial_on_stack / sizeof(double) ? partial_on_stack
                                                                          : (double *)malloc(slots * sizeof(double));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t begin = c * CHUNK, len = (begin + CHUNK < n ? begin + CHUNK : n) - begin;
        double *local_p = partial + (size_t)c * 2 * (size_t)k, *local_r = local_p + k;
        for (int i = 0; i < k; i++) local_p[i] = local_r[i] = 0.0;
        if (sign)
            mixed_backward_chunk(g + begin, x + begin, gx + begin, len, p, r, s, levels, k, 1, local_p, local_r);
        else if (!backward_unsigned_fixed(g + begin, x + begin, gx + begin, len, p, r, s, levels, k, local_p, local_r))
            mixed_backward_chunk_unsigned(g + begin, x + begin, gx + begin, len, p, r, s, levels, k, local_p, local_r);
    }
    double sum_p[MAX_K] = {0}, sum_r[MAX_K] = {0};
    for (int64_t c = 0; c < chunks; c++)
        for (int i = 0; i < k; i++) {
            sum_p[i] += partial[(size_t)c * 2 * (size_t)k + (size_t)i];
            sum_r[i] += partial[(size_t)c * 2 * (size_t)k + (size_t)k + (size_t)i];
        }
    if (partial != partial_on_stack) free(partial);
    for (int i = 0; i < k; i++) {
        grad_p[i] = (float)sum_p[i];
        grad_r[i] = (float)((double)p[i] * sum_r[i]);
    }
}

/* LSQ over `outer` groups of `inner` elements, group o with step[o] (outer = 1: one step) */
void lsq_forward(const float *x, float *y, int64_t outer, int64_t inner, const float *step, float qn, float qp,
                 int threads) {
    const int64_t chunks_per_group = n_chunks(inner), chunks = outer * chunks_per_group;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t o = c / chunks_per_group, offset = (c % chunks_per_group) * CHUNK;
        const int64_t begin = o * inner + offset, end = o * inner + (offset + CHUNK < inner ? offset + CHUNK : inner);
        const float s = step[o];
        for (int64_t j = begin; j < end; j++) {
            float v = x[j] / s;
            v = v < qn ? qn : (v > qp ? qp : v);
            y[j] = rintf(v) * s;
        }
    }
}

/* grad_step: `outer` floats, each group's sum (in double) times grad_scale, rounded once. Every chunk's
 * sum goes to its own slot and each group's slots are added in chunk order, so the result is the same
 * whatever thread took which chunk and however many threads ran (no atomics on floating point). */
void lsq_backward(const float *g, const float *x, float *gx, int64_t outer, int64_t inner, const float *step,
                  float qn, float qp, double grad_scale, float *grad_step, int threads) {
    const int64_t chunks_per_group = n_chunks(inner), chunks = outer * chunks_per_group;
    double partial_on_stack[256];
    double *partial = chunks <= 256 ? partial_on_stack : (double *)malloc((size_t)chunks * sizeof(double));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t o = c / chunks_per_group, offset = (c % chunks_per_group) * CHUNK;
        const int64_t begin = o * inner + offset, end = o * inner + (offset + CHUNK < inner ? offset + CHUNK : inner);
        const float s = step[o];
        float acc[LANES] = {0};
        int64_t j = begin;
        for (; j + LANES <= end; j += LANES) {
            for (int l = 0; l < LANES; l++) {
                const float v = x[j + l] / s, gj = g[j + l];
                const float inside = (v >= qn && v <= qp) ? 1.0f : 0.0f;
                const float levels = rintf(v < qn ? qn : (v > qp ? qp : v));
                gx[j + l] = gj * inside;
                acc[l] += gj * (levels - v * inside);
            }
        }
        double sum = 0.0;
        for (; j < end; j++) {
            const float v = x[j] / s, gj = g[j];
            const float inside = (v >= qn && v <= qp) ? 1.0f : 0.0f;
            const float levels = rintf(v < qn ? qn : (v > qp ? qp : v));
            gx[j] = gj * inside;
            sum += gj * (levels - v * inside);
        }
        for (int l = 0; l < LANES; l++) sum += acc[l];
        partial[c] = sum;
    }
    for (int64_t o = 0; o < outer; o++) {
        double sum = 0.0;
        for (int64_t c = o * chunks_per_group; c < (o + 1) * chunks_per_group; c++) sum += partial[c];
        grad_step[o] = (float)(sum * grad_scale);
    }
    if (partial != partial_on_stack) free(partial);
}

/* The supernet's mixed min-max weight over K low-bit candidates (EdMIPS/GMPQ weight quantizer):
 *   W_mix = sum_j p_j * clamp(rint(W / s_j), -Qp_j, Qp_j) * s_j,   s_j = max(max|W| / Qp_j, 1e-8)
 * with s_j constant (detached) and straight-through rounding, so dW_mix/dW = sum_j p_j and
 * dW_mix/dp_j = Q_j(W). Weights are small (a few thousand to a few hundred thousand elements): one
 * thread, where the cost of a call is what counts. */
static float minmax_steps(const float *w, int64_t n, const float *qp, int k, float *s) {
    float top = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float a = fabsf(w[j]);
        top = a > top ? a : top;
    }
    for (int i = 0; i < k; i++) {
        const float step = top / qp[i];
        s[i] = step > 1e-8f ? step : 1e-8f;
    }
    return top;
}

void mixed_minmax_forward(const float *w, float *y, int64_t n, const float *p, const float *qp, int k) {
    float s[MAX_K];
    minmax_steps(w, n, qp, k, s);
    for (int64_t j = 0; j < n; j++) y[j] = 0.0f;
    for (int i = 0; i < k; i++) {
        const float si = s[i], pi = p[i], hi = qp[i], lo = -qp[i];
        for (int64_t j = 0; j < n; j++) {
            float level = rintf(w[j] / si);
            level = level < lo ? lo : (level > hi ? hi : level);
            y[j] += pi * (level * si);
        }
    }
}

void mixed_minmax_backward(const float *g, const float *w, float *gw, int64_t n, const float *p, const float *qp, int k,
                           float *grad_p) {
    float s[MAX_K], p_total = 0.0f;
    minmax_steps(w, n, qp, k, s);
    for (int i = 0; i < k; i++) p_total += p[i];
    if (gw)
        for (int64_t j = 0; j < n; j++) gw[j] = g[j] * p_total;
    if (!grad_p) return;
    for (int i = 0; i < k; i++) {
        const float si = s[i], hi = qp[i], lo = -qp[i];
        float acc[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES) {
            for (int l = 0; l < LANES; l++) {
                float level = rintf(w[j + l] / si);
                level = level < lo ? lo : (level > hi ? hi : level);
                acc[l] += g[j + l] * (level * si);
            }
        }
        double sum = 0.0;
        for (; j < n; j++) {
            float level = rintf(w[j] / si);
            level = level < lo ? lo : (level > hi ? hi : level);
            sum += g[j] * (level * si);
        }
        for (int l = 0; l < LANES; l++) sum += acc[l];
        grad_p[i] = (float)sum;
    }
}

/* -- the supernet's two mixes with their parameters' maps in the same call -----------------------------
 * One call per mix and direction instead of a stack, an abs and an add and the backward nodes of those
 * and of the softmax around each: on a 2-core CPU each of those small ops costs far more than its
 * arithmetic, because it runs with cold caches after the large kernels around it (benchmarks/README.md).
 * The caller computes p = softmax(a) with torch (so the forward equals the plain ops bit for bit); here
 *   r_i = |rho_i| + 1e-8 from each candidate's range parameter (float, as torch computes it),
 * and, backward, through the softmax and the ranges:
 *   dL/da_i = p_i * (dL/dp_i - sum_j p_j dL/dp_j)  (in double),   dL/drho_i = sgn(rho_i) * dL/dr_i */
static void softmax_backward(const float *p, const float *grad_p, int k, float *grad_a) {
    double dot = 0.0;
    for (int i = 0; i < k; i++) dot += (double)p[i] * grad_p[i];
    for (int i = 0; i < k; i++) grad_a[i] = (float)((double)p[i] * ((double)grad_p[i] - dot));
}

/* state: 3 x k floats the forward writes for the backward: p, r, and the rho values it read */
void mixed_range_forward_params(const float *x, float *y, int64_t n, const float *p, const float *const *rho,
                                const float *levels, int k, int sign, int threads, float *state) {
    float *r = state + k, *rho_seen = state + 2 * k;
    for (int i = 0; i < k; i++) {
        state[i] = p[i];
        rho_seen[i] = *rho[i];
        r[i] = fabsf(rho_seen[i]) + 1e-8f;
    }
    mixed_range_forward(x, y, n, state, r, levels, k, sign, threads);
}

void mixed_range_backward_params(const float *g, const float *x, float *gx, int64_t n, const float *state,
                                 const float *levels, int k, int sign, float *grad_logits, float *grad_rho,
                                 int threads) {
    float grad_p[MAX_K], grad_r[MAX_K];
    mixed_range_backward(g, x, gx, n, state, state + k, levels, k, sign, grad_p, grad_r, threads);
    softmax_backward(state, grad_p, k, grad_logits);
    for (int i = 0; i < k; i++) {
        const float v = state[2 * k + i];
        grad_rho[i] = (v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f)) * grad_r[i];
    }
}

/* the min-max mix's backward through p = softmax(a) (grad_logits NULL: only dL/dW) */
void mixed_minmax_backward_logits(const float *g, const float *w, float *gw, int64_t n, const float *p,
                                  const float *qp, int k, float *grad_logits) {
    float grad_p[MAX_K];
    mixed_minmax_backward(g, w, gw, n, p, qp, k, grad_logits ? grad_p : 0);
    if (grad_logits) softmax_backward(p, grad_p, k, grad_logits);
}
