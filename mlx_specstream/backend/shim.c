/* mlx-specstream's cblas_sgemm / cblas_dgemm, loaded before MLX so that MLX binds to
   them.  Decode-time GEMMs are skinny: a few rows of activations (M = 1 token, or the
   few nodes of a draft tree) against a whole weight matrix.  OpenBLAS runs those
   through its packing GEMM and reaches about a third of the memory bandwidth.  For
   M <= max_m (row-major, x @ W.T, the layout of every nn.Linear) this file computes
   the product in register tiles (up to 4 activation rows x 4 rows of W) that read W
   once, prefetching the next tile's rows, split over threads by rows of W.  Each
   output element is summed in the same order whatever M is, so a token's logits do not
   depend on how many tokens share its pass.  Every other call goes to
   the real BLAS, whose functions the loader passes in (mlxss_init). */
#include <stdlib.h>
#include <string.h>
/* Each intrinsic below sits under the macro of the instruction set it needs: __AVX__
   (256-bit lane sums), __FMA__ (256-bit fused multiply-add), __AVX512F__ (the 16-lane
   kernel).  Any subset compiles; what is missing falls back to generic vector code. */
#if defined(__AVX__) || defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
typedef int I;
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_t)(I, I, I, I, I, I, float, const float *, I, const float *, I, float,
                        float *, I);
typedef void (*dgemm_t)(I, I, I, I, I, I, double, const double *, I, const double *, I,
                        double, double *, I);
static sgemm_t real_sgemm;
static dgemm_t real_dgemm;
static int max_m, one_pool;
/* set_threads: the BLAS's openblas_set_num_threads, or NULL.  With OpenMP, the BLAS is
   made single-threaded and this file's pool runs every GEMM. */
void mlxss_init(void *sgemm, void *dgemm, int m, void *set_threads) {
  real_sgemm = (sgemm_t)sgemm; real_dgemm = (dgemm_t)dgemm; max_m = m;
#ifdef _OPENMP
  if (set_threads) { ((void (*)(int))set_threads)(1); one_pool = 1; }
#endif
}
int mlxss_max_m(void) { return max_m; }
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
#if defined(__FMA__)
/* An explicit fused multiply-add in every variant: rounding is the same whatever the
   number of rows (FMA contraction by the compiler is off). */
static inline v8 fma8(v8 a, v8 b, v8 c) {
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
#else
static inline v8 fma8(v8 a, v8 b, v8 c) { return a * b + c; }
#endif
/* The skinny kernel's vector: 16 lanes where AVX-512 is there, else 8.  Every tile
   shape below sums an output element in the same order (lane l takes the indices
   congruent to l, in order, chunk by chunk; the lanes are then added as a fixed tree;
   then any scalar tail), so results do not depend on the tile, hence not on how many
   rows share the call.  With AVX-512 the chunks follow W's 64-byte alignment: MLX's
   buffers are only 8-byte aligned, and loads that straddle cache lines cost ~30% here. */
#if defined(__AVX512F__)
#define VL 16
typedef float vf __attribute__((vector_size(64)));
static inline vf fmav(vf a, vf b, vf c) {
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#else
#define VL 8
typedef v8 vf;
static inline vf fmav(vf a, vf b, vf c) { return fma8(a, b, c); }
#endif
static inline vf ldv(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
/* Lanes summed as a fixed tree (halves, then quarters, ...): the same order in every
   tile, a few shuffles instead of VL dependent scalar adds. */
static inline float hsum(vf v) {
#if VL == 16
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
#else
  float h[4];
  for (int l = 0; l < 4; l++) h[l] = v[l] + v[l + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
#endif
}

/* The first index of a row of W at a 64-byte boundary (k when there is none). */
static inline I peel(const float *w, I k) {
  I p = (I)(((64 - ((unsigned long)w & 63)) & 63) / sizeof(float));
  return p < k ? p : k;
}
#if VL == 16
/* Lanes l with 0 <= t + l < k: the partial first and last chunks of a row, loaded with
   masks (masked-out lanes read nothing and are zero). */
static inline __mmask16 lanes(I t, I k) {
  unsigned lo = t < 0 ? (unsigned)-t : 0, hi = k - t >= 16 ? 16 : (unsigned)(k - t);
  return (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
}
#define LDM(ptr) ((vf)_mm512_maskz_loadu_ps(msk, (ptr)))
#endif
#define LDV(ptr) ldv(ptr)

/* One chunk of VL indices from T: each weight vector loaded once for all R rows, the
   rows of the next tile prefetched. */
#define STEP(R, J, T, LD)                                                                \
  {                                                                                      \
    vf w[J];                                                                             \
    for (int q = 0; q < J; q++) {                                                        \
      w[q] = LD(b + (long)(j0 + q) * ldb + (T));                                         \
      if (R > 1) __builtin_prefetch(b + (long)(j0 + q + J) * ldb + (T));                 \
    }                                                                                    \
    for (int r = 0; r < R; r++) {                                                        \
      vf x = LD(a + (long)(i0 + r) * lda + (T));                                         \
      for (int q = 0; q < J; q++) acc[r][q] = fmav(x, w[q], acc[r][q]);                  \
    }                                                                                    \
  }

/* C[i, j] = al * <A[i, :], B[j, :]> + be * C[i, j] for R rows from i0 and J columns from
   j0, in R x J independent accumulators.  The J rows of W must share their alignment
   (ldb a multiple of 16 floats, or J = 1).  With AVX-512, the chunks start where W's
   row is 64-byte aligned; the partial chunks at both ends are masked. */
#define TILE(R, J)                                                                       \
  static void tile##R##x##J(I i0, I j0, I k, float al, const float *a, I lda,             \
                            const float *b, I ldb, float be, float *c, I ldc) {           \
    vf acc[R][J];                                                                        \
    for (int r = 0; r < R; r++)                                                          \
      for (int q = 0; q < J; q++) acc[r][q] = (vf){0};                                   \
    I t = 0;                                                                             \
    MASKED_HEAD(R, J)                                                                    \
    for (; t + VL <= k; t += VL) STEP(R, J, t, LDV)                                      \
    MASKED_TAIL(R, J)                                                                    \
    for (int r = 0; r < R; r++)                                                          \
      for (int q = 0; q < J; q++) {                                                      \
        const float *x = a + (long)(i0 + r) * lda, *wr = b + (long)(j0 + q) * ldb;       \
        float s = hsum(acc[r][q]);                                                       \
        for (I u = t; u < k; u++) s += x[u] * wr[u];                                     \
        float *o = c + (long)(i0 + r) * ldc + j0 + q;                                    \
        *o = be == 0.0f ? al * s : al * s + be * *o;                                     \
      }                                                                                  \
  }
#if VL == 16
#define MASKED_HEAD(R, J)                                                                \
  t = peel(b + (long)j0 * ldb, k);                                                       \
  if (t > 0) {                                                                           \
    __mmask16 msk = lanes(t - VL, k);                                                    \
    STEP(R, J, t - VL, LDM)                                                              \
  }
#define MASKED_TAIL(R, J)                                                                \
  if (t < k) {                                                                           \
    __mmask16 msk = lanes(t, k);                                                         \
    STEP(R, J, t, LDM)                                                                   \
    t = k;                                                                               \
  }
#else /* 8 lanes: unaligned chunks from 0, a scalar tail */
#define MASKED_HEAD(R, J)
#define MASKED_TAIL(R, J)
#endif
TILE(1, 8)
TILE(1, 1)
TILE(2, 4)
#if VL == 16
TILE(4, 4)
#else
TILE(4, 2)
#endif

/* Rows i .. m-1 of columns j .. j+J-1 (J = the tile's columns). */
static inline void rows_of(I m, I j, I k, float al, const float *a, I lda, const float *b,
                           I ldb, float be, float *c, I ldc) {
  I i = 0;
#if VL == 16
  for (; i + 4 <= m; i += 4) tile4x4(i, j, k, al, a, lda, b, ldb, be, c, ldc);
#else
  for (; i + 4 <= m; i += 4) {
    tile4x2(i, j, k, al, a, lda, b, ldb, be, c, ldc);
    tile4x2(i, j + 2, k, al, a, lda, b, ldb, be, c, ldc);
  }
#endif
  for (; i + 2 <= m; i += 2) tile2x4(i, j, k, al, a, lda, b, ldb, be, c, ldc);
  for (; i < m; i++) {
    tile1x1(i, j, k, al, a, lda, b, ldb, be, c, ldc);
    tile1x1(i, j + 1, k, al, a, lda, b, ldb, be, c, ldc);
    tile1x1(i, j + 2, k, al, a, lda, b, ldb, be, c, ldc);
    tile1x1(i, j + 3, k, al, a, lda, b, ldb, be, c, ldc);
  }
}

/* Workers sleep between GEMMs (OMP_WAIT_POLICY=PASSIVE); waking one costs ~40 us here.
   One row reads W at ~35 GB/s on one core: only the LM head earns the wake-up back.
   With several rows the MLP's matrices do too (a second core's bandwidth). */
static void skinny(I m, I n, I k, float al, const float *a, I lda, const float *b, I ldb,
                   float be, float *c, I ldc) {
  /* The activations, copied so that their element t shares the alignment of W's: then
     both loads of every product are aligned (a few KB, ~1 us). */
  float *packed = NULL;
  if (ldb % 16 == 0 && m > 1) {
    I lda2 = (k + 15) & ~15;
    size_t off = (size_t)((unsigned long)b & 63);
    packed = aligned_alloc(64, ((size_t)m * lda2 * sizeof(float) + off + 63) & ~(size_t)63);
    if (packed) {
      float *dst = (float *)((char *)packed + off);
      for (I i = 0; i < m; i++) memcpy(dst + (long)i * lda2, a + (long)i * lda, k * sizeof(float));
      a = dst;
      lda = lda2;
    }
  }
  int par = (m >= 2 && (long)n * k >= 800000L) || (long)m * n * k > 8000000L;
#pragma omp parallel for schedule(static) if (par)
  for (I jb = 0; jb < n; jb += 64) {
    I j1 = jb + 64 < n ? jb + 64 : n;
    I j = jb;
    if (ldb % 16 == 0) { /* rows of W share their alignment: multi-column tiles */
      if (m == 1)
        for (; j + 8 <= j1; j += 8) tile1x8(0, j, k, al, a, lda, b, ldb, be, c, ldc);
      else
        for (; j + 4 <= j1; j += 4) rows_of(m, j, k, al, a, lda, b, ldb, be, c, ldc);
    }
    for (; j < j1; j++)
      for (I i = 0; i < m; i++) tile1x1(i, j, k, al, a, lda, b, ldb, be, c, ldc);
  }
  free(packed);
}

static inline v8 splat(float f) { v8 v = {f, f, f, f, f, f, f, f}; return v; }

/* C = al * A @ B + be * C with B (k x n) row-major, not transposed, and small: attention's
   probabilities @ values, which MLX issues once per head (270 calls in a 1-token pass of
   SmolLM2), each a tiny product for which OpenBLAS's packing costs more than the
   arithmetic.  Each row of C is its own sum over t, in order: batch-invariant too. */
#define NN_COLS(W)                                                                       \
  for (; j + 8 * W <= n; j += 8 * W) {                                                   \
    v8 acc[W];                                                                           \
    for (int q = 0; q < W; q++) acc[q] = (v8){0};                                        \
    for (I t = 0; t < k; t++) {                                                          \
      v8 xv = splat(x[t]);                                                               \
      const float *br = b + (long)t * ldb + j;                                           \
      for (int q = 0; q < W; q++) acc[q] = fma8(xv, ld(br + 8 * q), acc[q]);             \
    }                                                                                    \
    for (int q = 0; q < W; q++)                                                          \
      for (int l = 0; l < 8; l++) {                                                      \
        float *oo = o + j + 8 * q + l;                                                   \
        *oo = be == 0.0f ? al * acc[q][l] : al * acc[q][l] + be * *oo;                   \
      }                                                                                  \
  }
static void small_nn(I m, I n, I k, float al, const float *a, I lda, const float *b, I ldb,
                     float be, float *c, I ldc) {
  for (I i = 0; i < m; i++) {
    const float *x = a + (long)i * lda;
    float *o = c + (long)i * ldc;
    I j = 0;
    NN_COLS(4)
    NN_COLS(1)
    for (; j < n; j++) {
      float s = 0.0f;
      for (I t = 0; t < k; t++) s += x[t] * b[(long)t * ldb + j];
      o[j] = be == 0.0f ? al * s : al * s + be * o[j];
    }
  }
}

/* Everything else: OpenBLAS single-threaded on slices of C, one slice per thread of
   this file's OpenMP pool, so that one thread pool serves every GEMM (two pools that
   spin on two cores starve each other). */
static void sliced(I o, I ta, I tb, I m, I n, I k, float al, const float *a, I lda,
                   const float *b, I ldb, float be, float *c, I ldc) {
  int nt = 1;
#ifdef _OPENMP
  if ((double)m * n * k > 2e6) nt = omp_get_max_threads();
#endif
  if (nt <= 1 || o != RowMajor) {
    real_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
    return;
  }
  int by_cols = n >= m;
  I total = by_cols ? n : m;
  I step = ((total + nt - 1) / nt + 15) & ~15;
#pragma omp parallel for schedule(static, 1) num_threads(nt)
  for (int t = 0; t < nt; t++) {
    I lo = t * step, hi = lo + step < total ? lo + step : total;
    if (lo >= hi) continue;
    if (by_cols) {
      const float *bs = tb == Trans ? b + (long)lo * ldb : b + lo;
      real_sgemm(o, ta, tb, m, hi - lo, k, al, a, lda, bs, ldb, be, c + lo, ldc);
    } else {
      const float *as = ta == NoTrans ? a + (long)lo * lda : a + lo;
      real_sgemm(o, ta, tb, hi - lo, n, k, al, as, lda, b, ldb, be, c + (long)lo * ldc, ldc);
    }
  }
}

void cblas_sgemm(I o, I ta, I tb, I m, I n, I k, float al, const float *a, I lda,
                 const float *b, I ldb, float be, float *c, I ldc) {
  if (o == RowMajor && ta == NoTrans && tb == Trans && m <= max_m && m > 0 && k > 0) {
    skinny(m, n, k, al, a, lda, b, ldb, be, c, ldc);
    return;
  }
  if (o == RowMajor && ta == NoTrans && tb == NoTrans && m <= max_m && m > 0 && k > 0 &&
      (long)n * k <= 65536L) {
    small_nn(m, n, k, al, a, lda, b, ldb, be, c, ldc);
    return;
  }
  if (one_pool) sliced(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
  else real_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}

void cblas_dgemm(I o, I ta, I tb, I m, I n, I k, double al, const double *a, I lda,
                 const double *b, I ldb, double be, double *c, I ldc) {
  real_dgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
