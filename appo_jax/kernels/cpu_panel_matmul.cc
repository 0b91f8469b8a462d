// Skinny float32 matrix products for decoding on a CPU (few rows, every weight read once from memory), as XLA FFI
// handlers that run on XLA's intra-op thread pool. See cpu_matmul.py for the contract, the layout and the build.
//
//   appo_panel_matmul:  y[m, n] = sum_k x[m, k] . wp[n / P, k, n % P]      (P = PANEL = 48 columns a panel)
//
// wp [panels, K, PANEL] holds w [K, N] in column panels (`pack_panels`): each panel is one contiguous stream of
// K rows of PANEL floats, so a thread that owns a range of panels reads one sequential stream, and a panel's
// MR x PANEL sums stay in registers through all K (no partial sums in memory). x and y are float32; wp float32
// (appo_panel_matmul) or bfloat16 (appo_panel_matmul_bf16, widened to float32 in registers: half the bytes read,
// the same float32 accumulation). Rows go in passes of at most 8; a pass after the first finds the panel in the
// core's L2. Compiled with -march=native: AVX-512 where the CPU has it, else AVX2 + FMA.
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "cpu_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
using namespace appo;

constexpr int PANEL = 48;
static_assert(PANEL % W == 0, "a panel is whole vectors");

// Vectors of a chunk (a slice of the panel's columns) for MR rows: MR x NV accumulators + NV weights + 1 broadcast
// within the 32 (AVX-512) / 16 (AVX2) registers; the chunk widths divide the panel.
#if defined(__AVX512F__)
constexpr int chunk_vecs(int) { return 3; }
#else
constexpr int chunk_vecs(int mr) { return mr <= 1 ? 6 : mr <= 3 ? 3 : mr <= 6 ? 2 : 1; }
#endif

// MR rows of x times columns [c0, c0 + NV * W) of one panel (wp: the panel's K x PANEL block), into y's columns
// [col, col + NV * W) cut at `cols` valid columns.
template <typename T, int MR, int NV>
void chunk(const float* x, const T* wp, float* y, int64_t K, int64_t N, int c0, int64_t col, int64_t cols) {
  vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = vzero();
  const T* w = wp + c0;
  for (int64_t k = 0; k < K; ++k, w += PANEL) {
    vec wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = wload(w + j * W);
    for (int m = 0; m < MR; ++m) {
      vec xv = vbcast(x + m * K + k);
      for (int j = 0; j < NV; ++j) acc[m][j] = vfma(wv[j], xv, acc[m][j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    int64_t left = cols - int64_t(j) * W;  // valid columns from this vector on
    if (left <= 0) break;
    for (int m = 0; m < MR; ++m) {
      if (left >= W) vstore(y + m * N + col + j * W, acc[m][j]);
      else vstore_n(y + m * N + col + j * W, acc[m][j], int(left));
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

// Panels [p0, p1) for all M rows: panel by panel (read from memory once), every pass of rows over it.
template <typename T>
void panels(int64_t M, const float* x, const T* wp, float* y, int64_t K, int64_t N, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* panel = wp + p * K * PANEL;
    for_row_passes(M, [&](auto mr, int64_t m0) {
      constexpr int NV = chunk_vecs(mr.value);
      for (int c0 = 0; c0 < PANEL; c0 += NV * W) {
        int64_t col = p * PANEL + c0, cols = N - col < NV * W ? N - col : NV * W;
        if (cols <= 0) break;
        chunk<T, mr.value, NV>(x + m0 * K, panel, y + m0 * N, K, N, c0, col, cols);
      }
    });
  }
}

// ---- the pool: one contiguous range of panels per thread (sequential streams); the caller works too ----------
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

template <typename T>
struct PanelJob : Job {
  const float* x;
  const T* wp;
  float* y;
  int64_t M, K, N, P;
  void unit(int64_t u) override { panels(M, x, wp, y, K, N, P * u / units, P * (u + 1) / units); }
};

template <typename T, ffi::DataType D>
ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> wp,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != PANEL || xd[1] != wd[1] || yd[0] != xd[0] ||
      yd[1] > wd[0] * PANEL || yd[1] <= (wd[0] - 1) * PANEL)
    return ffi::Error::InvalidArgument("appo_panel_matmul: expects x [M, K], wp [ceil(N / 48), K, 48], y [M, N]");
  auto job = std::make_shared<PanelJob<T>>();
  job->x = x.typed_data(); job->wp = static_cast<const T*>(wp.untyped_data()); job->y = y->typed_data();
  job->M = xd[0]; job->K = xd[1]; job->N = yd[1]; job->P = wd[0];
  if (job->M == 0 || job->N == 0) return ffi::Error::Success();
  int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  job->units = threads < job->P ? threads : job->P;
  for (int64_t t = 0; t < job->units - 1; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->units) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

#define APPO_PANEL(NAME, T, D)                                                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (PanelMatmul<T, ffi::D>),                                          \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Arg<ffi::Buffer<ffi::D>>().Ret<ffi::Buffer<ffi::F32>>());
APPO_PANEL(AppoPanelMatmul, float, F32)
APPO_PANEL(AppoPanelMatmulBf16, uint16_t, BF16)
