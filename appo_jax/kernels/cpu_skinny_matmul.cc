// Skinny float32 matrix products for decoding on a CPU (few rows, weights read once from memory), as XLA FFI
// handlers that run on XLA's intra-op thread pool. See cpu_matmul.py for the contract and the build.
//
//   appo_skinny_kn: y[M, N] = x[M, K] . w[K, N]      (w row-major, the model's [in, out] kernels)
//   appo_skinny_nk: y[M, N] = x[M, K] . w[N, K]^T    (w row-major, a tied embedding [vocab, hidden])
//
// x and y are float32; w float32 (appo_skinny_kn / _nk) or bfloat16 (appo_skinny_kn_bf16 / _nk_bf16, widened to
// float32 in registers: half the bytes read, the same float32 accumulation).
//
// Each thread of the pool gets one contiguous range of the weights (kn: rows of w, summed into its own partial
// y that the caller adds up; nk: rows of w, i.e. outputs), so that every thread reads one sequential stream; every
// weight element is loaded once and used for all M rows (M <= 8 per pass; larger M makes passes of 8). kn sweeps
// blocks of KB_ROWS rows in chunks of columns with MR x NV accumulators of W floats in registers (x[m, k]
// broadcast), prefetching the next block; nk keeps MR x NR dot products, reduced horizontally at the end, and
// prefetches the next tile's rows. Compiled with -march=native: AVX-512 where the CPU has it, else AVX2 + FMA.
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p); }
inline void vstore_n(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec vload_n(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
inline void vstore_n(float* p, vec v, int n) { _mm256_maskstore_ps(p, tail_mask(n), v); }
#else
#error "cpu_skinny_matmul needs AVX2 + FMA or AVX-512"
#endif

// Weights: float32, or bfloat16 (the upper 16 bits of a float32, widened by a shift: exact).
inline vec wload(const float* p) { return vload(p); }
inline vec wload_n(const float* p, int n) { return vload_n(p, n); }
inline vec wload(const uint16_t* p) {
#if defined(__AVX512F__)
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#else
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
#endif
}
inline vec wload_n(const uint16_t* p, int n) {
  alignas(64) uint16_t part[W] = {};
  for (int i = 0; i < n; ++i) part[i] = p[i];
  return wload(part);
}

// One chunk: columns [n0, n0 + NV * W) (the last vector holding `last` columns) over rows [kb, ke), accumulated
// into p[M, N] (`fresh`: p is overwritten). Prefetches the same columns KB_ROWS rows further: the next block.
constexpr int64_t KB_ROWS = 8;
template <typename T>
constexpr int VECS_PER_LINE = 64 / (W * int(sizeof(T))) > 0 ? 64 / (W * int(sizeof(T))) : 1;

template <typename T, int MR, int NV>
void chunk_kn(const float* x, const T* w, float* p, int64_t K, int64_t N, int64_t kb, int64_t ke, int64_t n0,
              int last, bool fresh) {
  vec acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NV - 1; ++j) acc[m][j] = fresh ? vzero() : vload(p + m * N + n0 + j * W);
    acc[m][NV - 1] = fresh ? vzero() : vload_n(p + m * N + n0 + (NV - 1) * W, last);
  }
  const T* wp = w + kb * N + n0;
  for (int64_t k = kb; k < ke; ++k, wp += N) {
    vec wv[NV];
    for (int j = 0; j < NV - 1; ++j) wv[j] = wload(wp + j * W);
    wv[NV - 1] = last == W ? wload(wp + (NV - 1) * W) : wload_n(wp + (NV - 1) * W, last);
    if (k + KB_ROWS < K)
      for (int j = 0; j < NV; j += VECS_PER_LINE<T>)
        _mm_prefetch(reinterpret_cast<const char*>(wp + KB_ROWS * N + j * W), _MM_HINT_T0);
    for (int m = 0; m < MR; ++m) {
      vec xv = vbcast(x + m * K + k);
      for (int j = 0; j < NV; ++j) acc[m][j] = vfma(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NV - 1; ++j) vstore(p + m * N + n0 + j * W, acc[m][j]);
    vstore_n(p + m * N + n0 + (NV - 1) * W, acc[m][NV - 1], last);
  }
}

// The widest panel (vectors) that keeps MR x NV accumulators + NV weights + 1 broadcast within 32 (AVX-512) / 16
// (AVX2) registers.
constexpr int nv_max(int mr) {
#if defined(__AVX512F__)
  return mr <= 2 ? 8 : mr <= 4 ? 6 : mr <= 6 ? 4 : 3;
#else
  return mr <= 1 ? 6 : mr <= 2 ? 4 : mr <= 4 ? 2 : 1;
#endif
}

template <typename T, int MR, int NV>
void chunk_kn_dispatch(int nv, const float* x, const T* w, float* p, int64_t K, int64_t N, int64_t kb,
                       int64_t ke, int64_t n0, int last, bool fresh) {
  if constexpr (NV >= 1) {
    if (nv == NV) return chunk_kn<T, MR, NV>(x, w, p, K, N, kb, ke, n0, last, fresh);
    return chunk_kn_dispatch<T, MR, NV - 1>(nv, x, w, p, K, N, kb, ke, n0, last, fresh);
  }
}

// Rows [k0, k1) of w for MR rows of x, into p: block by block of KB_ROWS rows (contiguous in memory), each block
// swept in chunks of nv_max(MR) vectors across all N columns.
template <typename T, int MR>
void range_kn(const float* x, const T* w, float* p, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  constexpr int NV = nv_max(MR);
  for (int64_t kb = k0; kb < k1; kb += KB_ROWS) {
    int64_t ke = kb + KB_ROWS < k1 ? kb + KB_ROWS : k1;
    for (int64_t n0 = 0; n0 < N; n0 += int64_t(NV) * W) {
      int64_t cols = N - n0 < int64_t(NV) * W ? N - n0 : int64_t(NV) * W;
      int vecs = int((cols + W - 1) / W);
      chunk_kn_dispatch<T, MR, NV>(vecs, x, w, p, K, N, kb, ke, n0, int(cols - int64_t(vecs - 1) * W), kb == k0);
    }
  }
}

// f(std::integral_constant<int, MR>{}, m0) for each pass of MR <= 8 rows (starting at row m0) over M rows.
template <typename F>
void for_row_passes(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (M - m0 < 8 ? M - m0 : 8) {
      case 1: f(std::integral_constant<int, 1>{}, m0); break;
      case 2: f(std::integral_constant<int, 2>{}, m0); break;
      case 3: f(std::integral_constant<int, 3>{}, m0); break;
      case 4: f(std::integral_constant<int, 4>{}, m0); break;
      case 5: f(std::integral_constant<int, 5>{}, m0); break;
      case 6: f(std::integral_constant<int, 6>{}, m0); break;
      case 7: f(std::integral_constant<int, 7>{}, m0); break;
      default: f(std::integral_constant<int, 8>{}, m0); break;
    }
  }
}

template <typename T>
void range_kn_rows(int64_t M, const float* x, const T* w, float* p, int64_t K, int64_t N, int64_t k0,
                   int64_t k1) {
  for_row_passes(M, [&](auto mr, int64_t m0) { range_kn<T, mr.value>(x + m0 * K, w, p + m0 * N, K, N, k0, k1); });
}

// ---- nk: y[M, N] = x[M, K] . w[N, K]^T ------------------------------------------------------------------------
template <typename T, int MR, int NR>
void tile_nk(const float* x, const T* w, float* y, int64_t K, int64_t N, int64_t n) {
  vec acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vec wv[NR];
    for (int j = 0; j < NR; ++j) {
      wv[j] = wload(w + (n + j) * K + k);
      if (n + NR + j < N) _mm_prefetch(reinterpret_cast<const char*>(w + (n + NR + j) * K + k), _MM_HINT_T0);
    }
    for (int m = 0; m < MR; ++m) {
      vec xv = vload(x + m * K + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = vfma(wv[j], xv, acc[m][j]);
    }
  }
  if (k < K) {
    int rest = int(K - k);
    vec wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = wload_n(w + (n + j) * K + k, rest);
    for (int m = 0; m < MR; ++m) {
      vec xv = vload_n(x + m * K + k, rest);
      for (int j = 0; j < NR; ++j) acc[m][j] = vfma(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) y[m * N + n + j] = vsum(acc[m][j]);
}

template <typename T, int MR>
void rows_nk(const float* x, const T* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int NR = MR <= 2 ? 4 : (MR <= 4 ? 3 : 2);
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_nk<T, MR, NR>(x, w, y, K, N, n);
  for (; n < n1; ++n) tile_nk<T, MR, 1>(x, w, y, K, N, n);
}

template <typename T>
void block_nk(int64_t M, const float* x, const T* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for_row_passes(M, [&](auto mr, int64_t m0) { rows_nk<T, mr.value>(x + m0 * K, w, y + m0 * N, K, N, n0, n1); });
}

// ---- the pool: `units` pieces of work, handed out through an atomic counter; the caller works too -----------
struct Job {
  int64_t units = 0;
  std::atomic<int64_t> next{0}, done{0};
  virtual void unit(int64_t u) = 0;
  virtual ~Job() = default;
  void work() {
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      unit(u);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void run_job(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job) {
  int64_t helpers = pool.num_threads() - 1;
  if (helpers > job->units - 1) helpers = job->units - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->units) _mm_pause();
}

template <typename T>
struct KnJob : Job {
  const float* x;
  const T* w;
  float* y;
  int64_t M, K, N;
  std::vector<float> partial;  // [units - 1, M, N]: the sums of ranges 1.. (range 0 sums into y)
  void unit(int64_t u) override {
    int64_t k0 = K * u / units, k1 = K * (u + 1) / units;
    float* p = u == 0 ? y : partial.data() + (u - 1) * M * N;
    if (k0 == k1) {
      for (int64_t i = 0; i < M * N; ++i) p[i] = 0.0f;
      return;
    }
    range_kn_rows(M, x, w, p, K, N, k0, k1);
  }
};

template <typename T>
struct NkJob : Job {
  const float* x;
  const T* w;
  float* y;
  int64_t M, K, N, rows;
  void unit(int64_t u) override {
    int64_t n0 = u * rows, n1 = n0 + rows < N ? n0 + rows : N;
    block_nk(M, x, w, y, K, N, n0, n1);
  }
};

int64_t threads_of(ffi::ThreadPool& pool) { return pool.num_threads() > 0 ? pool.num_threads() : 1; }

template <typename T, ffi::DataType D>
ffi::Error SkinnyKn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("appo_skinny_kn: expects x [M, K] and w [K, N]");
  auto job = std::make_shared<KnJob<T>>();
  job->x = x.typed_data(); job->w = static_cast<const T*>(w.untyped_data()); job->y = y->typed_data();
  job->M = xd[0]; job->K = xd[1]; job->N = wd[1];
  if (job->M == 0 || job->N == 0) return ffi::Error::Success();
  if (job->K == 0) {
    for (int64_t i = 0; i < job->M * job->N; ++i) job->y[i] = 0.0f;
    return ffi::Error::Success();
  }
  // one contiguous range of weight rows per thread (sequential streams), at least KB_ROWS rows each
  int64_t ranges = threads_of(pool);
  if (ranges > (job->K + KB_ROWS - 1) / KB_ROWS) ranges = (job->K + KB_ROWS - 1) / KB_ROWS;
  job->units = ranges;
  job->partial.resize(size_t((ranges - 1) * job->M * job->N));
  run_job(pool, job);
  for (int64_t u = 1; u < ranges; ++u) {
    const float* p = job->partial.data() + (u - 1) * job->M * job->N;
    for (int64_t i = 0; i < job->M * job->N; ++i) job->y[i] += p[i];
  }
  return ffi::Error::Success();
}

template <typename T, ffi::DataType D>
ffi::Error SkinnyNk(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("appo_skinny_nk: expects x [M, K] and w [N, K]");
  auto job = std::make_shared<NkJob<T>>();
  job->x = x.typed_data(); job->w = static_cast<const T*>(w.untyped_data()); job->y = y->typed_data();
  job->M = xd[0]; job->K = xd[1]; job->N = wd[0];
  int64_t threads = threads_of(pool);  // one contiguous range of rows per thread: sequential streams
  job->rows = (job->N + threads - 1) / threads;
  job->units = (job->N + job->rows - 1) / job->rows;
  if (job->M == 0 || job->N == 0) return ffi::Error::Success();
  run_job(pool, job);
  return ffi::Error::Success();
}

}  // namespace

#define APPO_SKINNY(NAME, FN, T, D)                                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (FN<T, ffi::D>),                                                   \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Arg<ffi::Buffer<ffi::D>>().Ret<ffi::Buffer<ffi::F32>>());
APPO_SKINNY(AppoSkinnyKn, SkinnyKn, float, F32)
APPO_SKINNY(AppoSkinnyNk, SkinnyNk, float, F32)
APPO_SKINNY(AppoSkinnyKnBf16, SkinnyKn, uint16_t, BF16)
APPO_SKINNY(AppoSkinnyNkBf16, SkinnyNk, uint16_t, BF16)
