/* MicroAdam's and EFCP's per-tensor window ops as fused CPU loops: the native twins of
 * error_feedback_compress (error_feedback.py; also EFCP's top-k compression with a 4-bit
 * error buffer), window_adam_update (window_adam.py), sparse_rows_dot and sparse_rows_combine
 * (sparse_rows.py).
 *
 * The PyTorch twins define the semantics and these loops reproduce their bits: the same fp32
 * operations in the same order (built with -ffp-contract=off; the one fused multiply-add is
 * explicit, as ATen's vectorised `sub_(x, alpha=lr)`), the same tie rule, the same roundings.
 * One pass per top-k block, in a block-sized scratch that lives only during the call; blocks are
 * independent, so they are split over OpenMP threads when the library was built with it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* OpenMP directives that vanish in a build without OpenMP */
#ifdef _OPENMP
#define OMP(directive) _Pragma(#directive)
#else
#define OMP(directive)
#endif

/* Block b of a top-k layout: its first element, length, entries per window row, and its first
 * column in a row (full blocks of `block` elements with `k_full` entries, then the tail) */
typedef struct {
    int64_t start, len, k, col0;
} TopKBlock;

static inline TopKBlock topk_block(int64_t b, int64_t block, int64_t num_full, int64_t k_full,
                                   int64_t tail, int64_t k_tail) {
    TopKBlock g = {b * block, b < num_full ? block : tail, b < num_full ? k_full : k_tail,
                   b * k_full};
    return g;
}

/* a thread's scratch could not be allocated: every thread skips its remaining blocks */
static inline void mark_failed(int *failed) {
    OMP(omp atomic write)
    *failed = 1;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if (f != f) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_val(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_val(void *p, int bf16, int64_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* The k-th largest of a[0..n) (1 <= k <= n), by quickselect; reorders a. */
static uint32_t kth_largest(uint32_t *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        uint32_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        uint32_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                uint32_t t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (target <= j)
            hi = j;
        else if (target >= i)
            lo = i;
        else
            return a[target];
    }
    return a[lo];
}

/* the twin's filter constants (topk.py); the magnitude order is torch.topk's on |x|: the bit
 * pattern without the sign (NaN above inf) */
#define FILTER_STRIDE 8
#define LEVEL_BINS 1024 /* histogram bins below the block's largest magnitude, */
#define LEVEL_SHIFT 16  /* each 2^16 float ulps (1/128 octave) wide */

/* Block top-k by magnitude, ties to the lowest index, ascending indices written to `out`.
 * As the twin's filter: element i belongs to strided sub-chunk i mod (n / 8); a histogram of
 * the sub-chunk maxima gives a threshold with at least k maxima (hence k elements) at or above
 * it, and the exact selection runs on the elements at or above it in the sub-chunks whose
 * maximum is, visited in ascending index order. */
static void select_block(const float *x, int64_t n, int64_t k, int16_t *out, uint32_t *work) {
    if (k <= 0) return;
    if (k >= n) {
        for (int64_t i = 0; i < n; i++) out[i] = (int16_t)i;
        return;
    }
    uint32_t *cand = work;          /* n: candidate positions, ascending */
    uint32_t *cmag = work + n;      /* n: their magnitudes */
    uint32_t *tmp = work + 2 * n;   /* n */
    uint32_t *peak = work + 3 * n;  /* n / 8 sub-chunk maxima, then the kept sub-chunks */
    const uint32_t *bits = (const uint32_t *)x;
    int64_t nc = 0;
    if (n % FILTER_STRIDE == 0 && 4 * k <= n / FILTER_STRIDE) {
        int64_t subs = n / FILTER_STRIDE;
        uint32_t top = 0;
        for (int64_t c = 0; c < subs; c++) {
            uint32_t m = bits[c] & 0x7FFFFFFFu;
            for (int s = 1; s < FILTER_STRIDE; s++) {
                uint32_t v = bits[s * subs + c] & 0x7FFFFFFFu;
                m = v > m ? v : m;
            }
            peak[c] = m;
            top = m > top ? m : top;
        }
        int64_t hist[LEVEL_BINS];
        memset(hist, 0, sizeof(hist));
        for (int64_t c = 0; c < subs; c++) {
            uint32_t d = (top - peak[c]) >> LEVEL_SHIFT;
            hist[d < LEVEL_BINS - 1 ? d : LEVEL_BINS - 1]++;
        }
        int64_t seen = 0, level = 0;
        while (seen + hist[level] < k) seen += hist[level++];
        /* at least k maxima lie in bins <= level: all >= floor (the last bin: everything) */
        /* the maxima in bins <= level are those > floor (the last bin: all of them) */
        int64_t floor = level < LEVEL_BINS - 1 ? (int64_t)top - ((level + 1) << LEVEL_SHIFT) : -1;
        int64_t nkept = 0;
        for (int64_t c = 0; c < subs; c++) {
            int keep = (int64_t)peak[c] > floor;
            peak[nkept] = (uint32_t)c;  /* nkept <= c: overwrites only what was read */
            nkept += keep;
        }
        for (int s = 0; s < FILTER_STRIDE; s++) {
            for (int64_t j = 0; j < nkept; j++) {
                uint32_t i = (uint32_t)(s * subs) + peak[j];
                uint32_t m = bits[i] & 0x7FFFFFFFu;
                cand[nc] = i;
                cmag[nc] = m;
                nc += (int64_t)m > floor;
            }
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            cand[i] = (uint32_t)i;
            cmag[i] = bits[i] & 0x7FFFFFFFu;
        }
        nc = n;
    }
    memcpy(tmp, cmag, (size_t)nc * sizeof(uint32_t));
    uint32_t kth = kth_largest(tmp, nc, k);
    int64_t above = 0;
    for (int64_t c = 0; c < nc; c++) above += cmag[c] > kth;
    int64_t budget = k - above, j = 0;
    for (int64_t c = 0; c < nc; c++) {
        uint32_t m = cmag[c];
        if (m > kth || (m == kth && budget-- > 0)) out[j++] = (int16_t)cand[c];
    }
}

/* Quantize x[0..n) (one bucket, n >= 1): min/max stored in the stats' dtype, then the codes
 * floor((x - min) / step + 0.5) clamped to [0, 15], as quant4.quantize4. */
static void quantize_bucket(const float *restrict x, int64_t n, int64_t q, void *mins,
                            void *maxs, int stats_bf16, uint8_t *restrict codes_out) {
    /* min/max in 16 lanes (vectorised); the result is order-free, NaN (propagated by
     * amin/amax) is tracked apart */
    float lo16[16], hi16[16];
    int nan = 0;
    for (int l = 0; l < 16; l++) lo16[l] = hi16[l] = x[0];
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int l = 0; l < 16; l++) {
            float v = x[i + l];
            lo16[l] = v < lo16[l] ? v : lo16[l];
            hi16[l] = v > hi16[l] ? v : hi16[l];
            nan |= v != v;
        }
    }
    for (; i < n; i++) {
        float v = x[i];
        lo16[0] = v < lo16[0] ? v : lo16[0];
        hi16[0] = v > hi16[0] ? v : hi16[0];
        nan |= v != v;
    }
    float lo = lo16[0], hi = hi16[0];
    for (int l = 1; l < 16; l++) {
        lo = lo16[l] < lo ? lo16[l] : lo;
        hi = hi16[l] > hi ? hi16[l] : hi;
    }
    if (nan) lo = hi = NAN;
    float lo32, hi32;
    if (stats_bf16) {
        uint16_t a = f32_to_bf16(lo), b = f32_to_bf16(hi);
        ((uint16_t *)mins)[q] = a;
        ((uint16_t *)maxs)[q] = b;
        lo32 = bf16_to_f32(a);
        hi32 = bf16_to_f32(b);
    } else {
        ((float *)mins)[q] = lo;
        ((float *)maxs)[q] = hi;
        lo32 = lo;
        hi32 = hi;
    }
    float scale = (hi32 - lo32) / 15.0f;
    float safe = scale > 0.0f ? scale : 1.0f;
    for (int64_t i = 0; i < n; i++) {
        /* clamp(floor(y), 0, 15) == trunc(clamp(y, 0, 15)) for every y (NaN -> 0) */
        float y = (x[i] - lo32) / safe + 0.5f;
        y = y > 0.0f ? y : 0.0f;
        y = y < 15.0f ? y : 15.0f;
        codes_out[i] = (uint8_t)(int)y;
    }
}

/* a = grad + Q^-1(e); the window row gets the block top-k of a; e <- Q(a, selected zeroed),
 * or with `keep_rounding` (EFCP) the selected entries minus their stored (rounded) values.
 * Every block must start on a bucket boundary. Returns 0, or -1 when scratch is unavailable. */
int hco_ef_compress(const void *grad, int grad_bf16, uint8_t *codes, void *mins, void *maxs,
                    int stats_bf16, int64_t bucket, int64_t block,
                    int64_t num_full, int64_t k_full, int64_t tail, int64_t k_tail,
                    int16_t *idx_out, void *val_out, int val_bf16, int keep_rounding,
                    int threads) {
    int64_t nblocks = num_full + (tail > 0);
    int64_t width = num_full ? block : tail;
    int failed = 0;
    if (threads < 1) threads = 1;
    OMP(omp parallel num_threads(threads) if (threads > 1 && nblocks > 1))
    {
        float *acc = malloc((size_t)(width + 1) * sizeof(float));
        uint8_t *qc = malloc((size_t)(width + 1));
        uint32_t *work = malloc((size_t)4 * (width + 1) * sizeof(uint32_t));
        int16_t *sel = malloc((size_t)(width + 1) * sizeof(int16_t));
        if (!acc || !qc || !work || !sel) {
            mark_failed(&failed);
        }
        OMP(omp for schedule(static))
        for (int64_t b = 0; b < nblocks; b++) {
            if (failed) continue;
            TopKBlock g = topk_block(b, block, num_full, k_full, tail, k_tail);
            int64_t start = g.start, len = g.len, k = g.k, col0 = g.col0;
            /* 1. a = (code * step + min) + g, bucket by bucket (buckets are even) */
            for (int64_t o = 0; o < len; o += bucket) {
                int64_t q = (start + o) / bucket;
                float lo = load_val(mins, stats_bf16, q);
                float hi = load_val(maxs, stats_bf16, q);
                float scale = (hi - lo) / 15.0f;
                int64_t m = len - o < bucket ? len - o : bucket;
                const uint8_t *restrict cb = codes + (start + o) / 2;
                float *restrict a = acc + o;
                for (int64_t j = 0; j < m / 2; j++) {
                    a[2 * j] = (float)(cb[j] >> 4) * scale + lo;
                    a[2 * j + 1] = (float)(cb[j] & 15) * scale + lo;
                }
                if (m & 1) a[m - 1] = (float)(cb[m / 2] >> 4) * scale + lo;
                if (grad_bf16) {
                    const uint16_t *g = (const uint16_t *)grad + start + o;
                    for (int64_t i = 0; i < m; i++) a[i] = a[i] + bf16_to_f32(g[i]);
                } else {
                    const float *g = (const float *)grad + start + o;
                    for (int64_t i = 0; i < m; i++) a[i] = a[i] + g[i];
                }
            }
            /* 2. top-k, values out, zero them */
            select_block(acc, len, k, sel, work);
            for (int64_t j = 0; j < k; j++) {
                int64_t i = sel[j];
                idx_out[col0 + j] = sel[j];
                store_val(val_out, val_bf16, col0 + j, acc[i]);
            }
            for (int64_t j = 0; j < k; j++)
                acc[sel[j]] = keep_rounding
                    ? acc[sel[j]] - load_val(val_out, val_bf16, col0 + j) : 0.0f;
            /* 3. re-quantize, pack two codes per byte (element 2i in the high nibble) */
            for (int64_t o = 0; o < len; o += bucket) {
                int64_t m = len - o < bucket ? len - o : bucket;
                quantize_bucket(acc + o, m, (start + o) / bucket, mins, maxs, stats_bf16, qc + o);
            }
            int64_t pairs = len / 2;
            uint8_t *cb = codes + start / 2;
            for (int64_t p = 0; p < pairs; p++) cb[p] = (uint8_t)(qc[2 * p] << 4 | qc[2 * p + 1]);
            if (len & 1) cb[pairs] = (uint8_t)(qc[len - 1] << 4);
        }
        free(acc);
        free(qc);
        free(work);
        free(sel);
    }
    return failed ? -1 : 0;
}

/* ---- window update ---------------------------------------------------------------------- */
static inline uint32_t sr_noise16(uint32_t seed32, uint32_t pos) {
    uint32_t h = pos * 0x9E3779B1u + seed32;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h & 0xFFFFu;
}

/* fp32 square root rounded once, as the twin's (fp64 root, one rounding) */
static inline float sqrt_rn(float x) { return (float)sqrt((double)x); }

/* fp32 -> the parameter's dtype (0 fp32, 1 bf16 round to nearest even, 2 bf16 stochastic) */
static inline void store_param(void *p, int mode, int64_t i, float v, uint32_t seed32) {
    if (mode == 0) {
        ((float *)p)[i] = v;
    } else if (mode == 1 || !isfinite(v)) {
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    } else {
        uint32_t u = (f32_bits(v) + sr_noise16(seed32, (uint32_t)i)) & 0xFFFF0000u;
        ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    }
}

/* MicroAdam's update from the window: m and v rebuilt per block in a block-sized scratch (rows
 * in storage order, as the twin's scatter_add_), then the parameter updated where the window
 * has entries (everywhere when `decay` != 1: weight decay touches every element). */
int hco_window_adam(void *param, int param_mode, const int16_t *idx, const void *vals,
                    int vals_bf16, int64_t k, int64_t nrows, const float *w1, const float *w2,
                    int64_t block, int64_t num_full, int64_t k_full, int64_t tail,
                    int64_t k_tail, float c1, float c2, float eps, float lr, float decay,
                    int has_decay, uint32_t seed32, int threads) {
    int64_t nblocks = num_full + (tail > 0);
    int64_t width = num_full ? block : tail;
    int pbf = param_mode != 0;
    int failed = 0;
    if (threads < 1) threads = 1;
    OMP(omp parallel num_threads(threads) if (threads > 1 && nblocks > 1))
    {
        float *m = calloc((size_t)(width + 1), sizeof(float));
        float *v = calloc((size_t)(width + 1), sizeof(float));
        uint8_t *hit = calloc((size_t)(width + 1), 1);
        if (!m || !v || !hit) {
            mark_failed(&failed);
        }
        OMP(omp for schedule(static))
        for (int64_t b = 0; b < nblocks; b++) {
            if (failed) continue;
            TopKBlock g = topk_block(b, block, num_full, k_full, tail, k_tail);
            int64_t start = g.start, len = g.len, kb = g.k, col0 = g.col0;
            for (int64_t r = 0; r < nrows; r++) {
                float a1 = w1[r], a2 = w2[r];
                const int16_t *ri = idx + r * k + col0;
                /* indices are unique within a row's block (top-k): vector gathers/scatters */
#pragma GCC ivdep
                for (int64_t j = 0; j < kb; j++) {
                    int64_t i = ri[j];
                    float x = load_val(vals, vals_bf16, r * k + col0 + j);
                    float sq = x * x;
                    m[i] += a1 * x;
                    v[i] += a2 * sq;
                    hit[i] = 1;
                }
            }
            if (has_decay) {
                for (int64_t i = 0; i < len; i++) {
                    float p = load_val(param, pbf, start + i) * decay;
                    if (hit[i]) {
                        float upd = (m[i] * c1) / (sqrt_rn(v[i] * c2) + eps);
                        p = fmaf(upd, -lr, p);
                        m[i] = v[i] = 0.0f;
                        hit[i] = 0;
                    }
                    store_param(param, param_mode, start + i, p, seed32);
                }
            } else {
                for (int64_t r = 0; r < nrows; r++) {
                    const int16_t *ri = idx + r * k + col0;
                    for (int64_t j = 0; j < kb; j++) {
                        int64_t i = ri[j];
                        if (!hit[i]) continue;
                        float upd = (m[i] * c1) / (sqrt_rn(v[i] * c2) + eps);
                        float p = fmaf(upd, -lr, load_val(param, pbf, start + i));
                        store_param(param, param_mode, start + i, p, seed32);
                        m[i] = v[i] = 0.0f;
                        hit[i] = 0;
                    }
                }
            }
        }
        free(m);
        free(v);
        free(hit);
    }
    return failed ? -1 : 0;
}

/* ---- EFCP's window passes ------------------------------------------------------------------- */
/* SP: dots[r] = sum_j vals[r, j] * x[pos(r, j)] for r < nrows: fp64 products (exact), summed
 * as the twin's tree (sparse_rows._tree_sum: zero-padded to a power of two, halved until one
 * is left). With `slot` >= 0, x is the window's own row `slot` as a dense vector (zero off its
 * entries), built per block in a block-sized scratch instead of in memory. Rows are split over
 * threads, each with a row-sized scratch. */
int hco_sparse_dot(const int16_t *idx, const void *vals, int vals_bf16, const float *x,
                   int64_t slot, int64_t k, int64_t nrows, int64_t block, int64_t num_full,
                   int64_t k_full, int64_t tail, int64_t k_tail, double *dots, int threads) {
    int64_t nblocks = num_full + (tail > 0);
    int64_t width = 1;
    while (width < k) width *= 2;
    int failed = 0;
    if (threads < 1) threads = 1;
    OMP(omp parallel num_threads(threads) if (threads > 1 && nrows > 1))
    {
        double *prod = malloc((size_t)width * sizeof(double));
        float *row = slot >= 0 ? calloc((size_t)block + 1, sizeof(float)) : NULL;
        if (!prod || (slot >= 0 && !row)) {
            mark_failed(&failed);
        }
        OMP(omp for schedule(static))
        for (int64_t r = 0; r < nrows; r++) {
            if (failed) continue;
            int64_t j = 0;
            for (int64_t b = 0; b < nblocks; b++) {
                TopKBlock g = topk_block(b, block, num_full, k_full, tail, k_tail);
                const int16_t *ri = idx + r * k + g.col0;
                const float *xb = x ? x + g.start : row;
                const int16_t *si = idx + slot * k + g.col0;
                if (!x)
                    for (int64_t e = 0; e < g.k; e++)
                        row[si[e]] = load_val(vals, vals_bf16, slot * k + g.col0 + e);
                for (int64_t e = 0; e < g.k; e++, j++)
                    prod[j] = (double)load_val(vals, vals_bf16, r * k + j) * (double)xb[ri[e]];
                if (!x)
                    for (int64_t e = 0; e < g.k; e++) row[si[e]] = 0.0f;
            }
            for (; j < width; j++) prod[j] = 0.0;
            for (int64_t h = width / 2; h >= 1; h /= 2)
                for (int64_t i = 0; i < h; i++) prod[i] += prod[i + h];
            dots[r] = prod[0];
        }
        free(prod);
        free(row);
    }
    return failed ? -1 : 0;
}

/* LCG: out[pos(r, j)] += fp32(coeffs[r] * vals[r, j]), rows in order; blocks split over
 * threads (a block's entries stay in one thread, so every element sums in row order).
 * `zero_first`: each block of `out` is cleared just before (it may be uninitialised). */
int hco_sparse_combine(const int16_t *idx, const void *vals, int vals_bf16, const float *coeffs,
                       float *out, int64_t k, int64_t nrows, int64_t block, int64_t num_full,
                       int64_t k_full, int64_t tail, int64_t k_tail, int zero_first,
                       int threads) {
    int64_t nblocks = num_full + (tail > 0);
    if (threads < 1) threads = 1;
    OMP(omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nblocks > 1))
    for (int64_t b = 0; b < nblocks; b++) {
        TopKBlock g = topk_block(b, block, num_full, k_full, tail, k_tail);
        int64_t kb = g.k, col0 = g.col0;
        float *o = out + g.start;
        if (zero_first) memset(o, 0, (size_t)g.len * sizeof(float));
        for (int64_t r = 0; r < nrows; r++) {
            float c = coeffs[r];
            const int16_t *ri = idx + r * k + col0;
            /* indices are unique within a row's block (top-k), so the compiler may gather and
             * scatter a vector at a time (rows never written hold zeros: a repeated index
             * there only adds zeros) */
            if (vals_bf16) {
                const uint16_t *vr = (const uint16_t *)vals + r * k + col0;
#pragma GCC ivdep
                for (int64_t j = 0; j < kb; j++) o[ri[j]] += bf16_to_f32(vr[j]) * c;
            } else {
                const float *vr = (const float *)vals + r * k + col0;
#pragma GCC ivdep
                for (int64_t j = 0; j < kb; j++) o[ri[j]] += vr[j] * c;
            }
        }
    }
    return 0;
}
