"""Put an optimized BLAS into the global symbol scope before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links the netlib *reference* BLAS: fp32 GEMM runs at a
few GFLOP/s, so a 16-token forward costs ~18x a 1-token forward and no speculative
method can win.  MLX resolves its ``cblas_*``/``sgemm_`` symbols at load time; a
library loaded earlier with ``RTLD_GLOBAL`` takes precedence.  OpenBLAS (Debian's
``libopenblas0-pthread``) was measured best for this workload on the project's
machines (PLATFORM.md): ~120 GFLOP/s GEMM, 1.7x cost for 16 tokens vs 1.

In front of that BLAS sits a small shim (C, compiled once per machine with the system
compiler into the cache folder): decode-time GEMMs are skinny (1 to 16 activation rows
against a whole weight matrix), where OpenBLAS's packing GEMM reaches only about a third
of the memory bandwidth.  The shim computes those as dot products that read each weight
once (2-3x faster on the LM head here) and hands every other call to OpenBLAS.
``MLX_SPECSTREAM_SHIM=0`` disables it; ``MLX_SPECSTREAM_SKINNY_M`` sets the row limit.

Optional: OpenBLAS 0.3.3x from the PyPI wheel ``scipy-openblas32``
(``MLX_SPECSTREAM_BLAS=wheel``), whose symbols carry a ``scipy_`` prefix; the same shim
exports them.  When other processes load the cores its threads collapse (speculative
passes 10-60x slower were measured), so it is not the default.

Set ``MLX_SPECSTREAM_BLAS`` to a library path to choose one, ``wheel`` for the wheel,
or ``none`` to keep MLX's own.  macOS uses Accelerate through MLX and needs none of this.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

#: What was loaded: a path, "none" (disabled), "unavailable", "not-linux" or
#: "too-late" (mlx.core was imported first).
ACTIVE: str = "unset"
_handle: ctypes.CDLL | None = None
#: The compiled GEMM shim in front of that BLAS (None: MLX calls the BLAS directly).
SHIM: Path | None = None
#: The row limit of its skinny kernel (0: off).
SHIM_MAX_M = 0


def find_blas() -> str | None:
    """Return the path of an optimized BLAS on this machine, or None."""
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in ("/usr/lib/*/openblas*/libopenblas*.so*", "/usr/lib/*/libopenblas*.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


_SHIM_C = r"""
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
#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
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
"""

#: Largest number of activation rows the skinny kernel takes.  16 covers a 4-node draft
#: chain with its 3 streams per node in the MSA layers, so that the whole verification
#: pass is batch-invariant.  Measured on the project's 2-core Zen 5 machines (SmolLM2,
#: context 256, medians of 6 alternating runs against the previous one-column kernel): a
#: 1-token pass 24.8 ms either way, a 4-node pass with streams 41.8 vs 44.2 ms, a
#: 16-node pass with streams 92.8 vs 106.2 ms.  ``MLX_SPECSTREAM_SKINNY_M`` overrides;
#: 0 turns the kernel off (the shim then only forwards).
SKINNY_MAX_M = 16


def cache_home() -> Path:
    return Path(os.environ.get("MLX_SPECSTREAM_HOME", Path.home() / ".cache" / "mlx-specstream"))


def find_wheel_blas() -> Path | None:
    """libscipy_openblas.so of the scipy-openblas32 wheel, located without importing it."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(list(spec.submodule_search_locations)[0]).glob("lib/libscipy_openblas*.so"))
    return hits[0] if hits else None


# No FMA contraction: every path sums a row the same way (batch-invariant rows).
_CFLAGS = "-O3 -ffp-contract=off -shared -fPIC"
_CFLAGS_TRIES = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])


def _machine_tag() -> str:
    """The CPU the shim is compiled for (it is built with -march=native)."""
    tag = os.uname().machine
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    tag += line
    except OSError:
        pass
    return tag


def build_shim() -> Path | None:
    """Compile (once per machine) the cblas shim; None when no C compiler works."""
    digest = hashlib.sha1((_SHIM_C + _CFLAGS + _machine_tag()).encode()).hexdigest()[:12]
    out = cache_home() / "blas" / f"libmlxss_cblas_{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "shim.c"
        src.write_text(_SHIM_C)
        lib = Path(tmp) / out.name
        base = [cc, *_CFLAGS.split(), "-o", str(lib), str(src)]
        for extra in _CFLAGS_TRIES:
            try:
                subprocess.run(base + extra, check=True, capture_output=True, timeout=120)
                break
            except (OSError, subprocess.SubprocessError):
                continue
        else:
            return None
        os.replace(lib, out)
    return out


def _skinny_max_m() -> int:
    raw = os.environ.get("MLX_SPECSTREAM_SKINNY_M", "").strip()
    try:
        return max(0, int(raw)) if raw else SKINNY_MAX_M
    except ValueError:
        return SKINNY_MAX_M


def _install_shim(lib: ctypes.CDLL, sgemm: str, dgemm: str, set_threads: str) -> bool:
    """Load the shim globally (before ``lib``'s own symbols are looked up by MLX) and
    point it at ``lib``'s GEMMs.  False when no shim could be built or loaded."""
    global SHIM, SHIM_MAX_M
    # Worker threads sleep between GEMMs instead of spinning: spinning workers of two
    # processes (or one process and any other load) on a few cores starve each other;
    # measured here, two concurrent generations fell from ~28 to 0.8 tokens/s each.
    # libgomp reads this when the shim loads it, so it must be set first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    shim_path = build_shim()
    if shim_path is None:
        return False
    try:
        shim = ctypes.CDLL(str(shim_path), mode=ctypes.RTLD_GLOBAL)
        s_ptr = ctypes.cast(getattr(lib, sgemm), ctypes.c_void_p)
        d_ptr = ctypes.cast(getattr(lib, dgemm), ctypes.c_void_p)
    except (OSError, AttributeError):
        return False
    try:
        t_ptr = ctypes.cast(getattr(lib, set_threads), ctypes.c_void_p)
    except AttributeError:
        t_ptr = ctypes.c_void_p(None)
    if os.environ.get("MLX_SPECSTREAM_ONE_POOL", "1").strip() == "0":
        t_ptr = ctypes.c_void_p(None)
    shim.mlxss_init(s_ptr, d_ptr, ctypes.c_int(_skinny_max_m()), t_ptr)
    SHIM = shim_path
    SHIM_MAX_M = _skinny_max_m()
    return True


def _load_wheel_blas() -> str | None:
    """The scipy-openblas32 wheel behind the shim (its own symbols are prefixed)."""
    lib = find_wheel_blas()
    if lib is None:
        return None
    global _handle
    try:
        handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
    except OSError:
        return None
    if not _install_shim(handle, "scipy_cblas_sgemm", "scipy_cblas_dgemm",
                         "scipy_openblas_set_num_threads"):
        return None
    _handle = handle
    return str(lib)


def _load_system_blas(path: str) -> None:
    """A system OpenBLAS, behind the shim when it builds (else directly)."""
    global _handle
    handle = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    if os.environ.get("MLX_SPECSTREAM_SHIM", "1").strip() != "0":
        _install_shim(handle, "cblas_sgemm", "cblas_dgemm", "openblas_set_num_threads")
    # Then globally, for MLX's other BLAS/LAPACK symbols; the shim's GEMMs, loaded
    # first, stay the ones MLX binds to.
    _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _address(a) -> int:
    """Address of an evaluated fp32 MLX array's first element."""
    import numpy as np

    return int(np.asarray(memoryview(a)).ctypes.data)


def _aligned_copy(w):
    """``w`` as a view at a 64-byte boundary inside a slightly larger buffer, or None."""
    import mlx.core as mx

    n, item = w.size, w.itemsize
    for _ in range(3):
        buf = mx.zeros((n + 64 // item,), w.dtype)
        mx.eval(buf)
        off = (-_address(buf) % 64) // item
        buf[off : off + n] = w.reshape(-1)
        view = buf[off : off + n].reshape(w.shape)
        mx.eval(view)
        if _address(view) % 64 == 0:  # the update may have landed in a new buffer
            return view
    return None


def align_weights(module, min_size: int = 4096) -> int:
    """Re-place a module's 2-D fp32 weights at 64-byte boundaries (views into buffers a
    line longer).  MLX's CPU buffers start 8-byte aligned (24 bytes past a cache line on
    the project's machines), so the skinny kernel reads every weight row through an extra
    line and two masked chunks.  Measured there (SmolLM2, context 256, medians of 6
    alternating rounds): a 1-token pass 27.1 -> 26.0 ms, a 4-node pass with streams
    44.1 -> 41.9, a 16-node one 98.6 -> 91.0.  The kernel's results
    do not depend on the alignment (its lanes hold the same sums, rotated, and the lane
    tree is rotation-invariant), so logits stay bit-identical.  Returns how many arrays
    were moved; nothing is done without the shim or off Linux."""
    if SHIM is None:
        return 0
    import mlx.core as mx

    moved = 0
    for _, sub in module.named_modules():
        for key in list(sub.keys()):
            w = sub[key]
            if not (isinstance(w, mx.array) and w.ndim == 2 and w.size >= min_size
                    and w.dtype == mx.float32):
                continue
            mx.eval(w)
            if _address(w) % 64:
                view = _aligned_copy(w)
                if view is not None:
                    sub[key] = view  # one weight at a time: the old buffer goes at once
                    moved += 1
    return moved


def setup() -> str:
    """Load the BLAS globally (idempotent). Returns the value of ``ACTIVE``."""
    global ACTIVE, _handle
    if ACTIVE != "unset":
        return ACTIVE
    if not sys.platform.startswith("linux"):
        ACTIVE = "not-linux"
        return ACTIVE
    choice = os.environ.get("MLX_SPECSTREAM_BLAS", "").strip()
    if choice.lower() == "none":
        ACTIVE = "none"
        return ACTIVE
    if "mlx.core" in sys.modules:
        ACTIVE = "too-late"
        warnings.warn(
            "mlx.core was imported before mlx_specstream, so the optimized BLAS could not "
            "be installed; CPU matmuls use the wheel's slow reference BLAS. Import "
            "mlx_specstream first.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ACTIVE
    if choice == "wheel":
        wheel = _load_wheel_blas()
        if wheel is not None:
            ACTIVE = wheel
            return ACTIVE
    path = find_blas() if choice in ("", "system", "wheel") else choice
    if path is None and not choice:
        path = _load_wheel_blas()  # no system OpenBLAS: the wheel beats the reference BLAS
        if path is not None:
            ACTIVE = path
            return ACTIVE
    if path is None:
        ACTIVE = "unavailable"
        warnings.warn(
            "No optimized BLAS found: MLX on the CPU will use its reference BLAS and "
            "multi-token forwards run ~18x slower, which defeats speculative decoding. "
            "Install it with `apt-get install libopenblas0-pthread` (Debian/Ubuntu) or "
            "point MLX_SPECSTREAM_BLAS at a libopenblas.so.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ACTIVE
    try:
        _load_system_blas(path)
    except OSError as e:
        ACTIVE = "unavailable"
        warnings.warn(f"Could not load BLAS {path}: {e}", RuntimeWarning, stacklevel=3)
        return ACTIVE
    ACTIVE = path
    return ACTIVE
