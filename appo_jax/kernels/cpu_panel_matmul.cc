// Skinny float32 matrix products for decoding on a CPU (few rows, every weight read once from memory), as XLA FFI
// handlers that run on XLA's intra-op thread pool. See cpu_matmul.py for the contract, the layout and the build.
//
//   appo_panel_matmul:      y[m, n] = sum_k x'[m, k] . wp[n / P, k, n % P]      (P = PANEL = 48 columns a panel)
//   appo_panel_matmul_add:  y[m, n] = r[m, n] + sum_k x[m, k] . wp[n / P, k, n % P]      (a residual added)
//   appo_panel_swiglu:      y[m, n] = silu(g[m, n]) . u[m, n],  g / u = sum_k x'[m, k] . wp[n / P, 0 / 1, k, n % P]
//
// x' = x, or with a norm scale s [K] (an empty s: none) x's rows RMS-normalised first, as the decoder's RMSNorm:
// x'[m, k] = s[k] . (x[m, k] . rsqrt(mean_k x[m, k]^2 + eps))    (eps: the handler's attribute)
//
// wp [panels, K, PANEL] holds w [K, N] in column panels (`pack_panels`): each panel is one contiguous stream of
// K rows of PANEL floats, so a thread that owns a range of panels reads one sequential stream, and a panel's
// MR x PANEL sums stay in registers through all K (no partial sums in memory). The SwiGLU weights hold the gate's
// and the up projection's panels p side by side (wp [panels, 2, K, PANEL], `pack_swiglu`): the thread that sums
// the gate's columns sums the up's next and multiplies in place. x, r and y are float32; wp float32 or bfloat16
// (the _bf16 handlers, widened to float32 in registers: half the bytes read, the same float32 accumulation). Rows
// go in passes of at most 8; a pass after the first finds the panel in the core's L2. Compiled with
// -march=native: AVX-512 where the CPU has it, else AVX2 + FMA.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

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

// What a chunk does with its sums `acc` for the y columns at `out` (row stride N): STORE them; ADD them to the
// residual r (same layout as y); GATE: store them (the gate's sums, read back by the up's chunk); SWIGLU: y =
// silu(y) * acc (y holds the gate's sums).
enum Epilogue { STORE, ADD, GATE, SWIGLU };

template <Epilogue E>
inline vec finish(vec acc, float* out, const float* r, int n) {
  if constexpr (E == ADD) return vadd(acc, n == W ? vload(r) : vload_n(r, n));
  if constexpr (E == SWIGLU) return vmul(vsilu(n == W ? vload(out) : vload_n(out, n)), acc);
  return acc;
}

// MR rows of x times columns [c0, c0 + NV * W) of one panel (wp: the panel's K x PANEL block), into y's columns
// [col, col + NV * W) cut at `cols` valid columns, finished by epilogue E (r: the residual's rows, as y's).
template <typename T, int MR, int NV, Epilogue E>
void chunk(const float* x, const T* wp, float* y, const float* r, int64_t K, int64_t N, int c0, int64_t col,
           int64_t cols) {
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
    int n = left >= W ? W : int(left);
    for (int m = 0; m < MR; ++m) {
      const int64_t at = m * N + col + j * W;
      vec out = finish<E>(acc[m][j], y + at, E == ADD ? r + at : nullptr, n);
      if (n == W) vstore(y + at, out);
      else vstore_n(y + at, out, n);
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

// Output panels [p0, p1) for all M rows: panel by panel (read from memory once), every pass of rows over it. E is
// STORE or ADD over wp [panels, K, PANEL], or SWIGLU over wp [panels, 2, K, PANEL] (the gate's chunk, then the
// up's over the same columns).
template <typename T, Epilogue E>
void panels(int64_t M, const float* x, const T* wp, float* y, const float* r, int64_t K, int64_t N, int64_t p0,
            int64_t p1) {
  constexpr int64_t parts = E == SWIGLU ? 2 : 1;
  for (int64_t p = p0; p < p1; ++p) {
    const T* panel = wp + p * parts * K * PANEL;
    for_row_passes(M, [&](auto mr, int64_t m0) {
      constexpr int NV = chunk_vecs(mr.value);
      for (int c0 = 0; c0 < PANEL; c0 += NV * W) {
        int64_t col = p * PANEL + c0, cols = N - col < NV * W ? N - col : NV * W;
        if (cols <= 0) break;
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        const float* rm = E == ADD ? r + m0 * N : nullptr;
        if constexpr (E == SWIGLU) {
          chunk<T, mr.value, NV, GATE>(xm, panel, ym, rm, K, N, c0, col, cols);
          chunk<T, mr.value, NV, SWIGLU>(xm, panel + K * PANEL, ym, rm, K, N, c0, col, cols);
        } else {
          chunk<T, mr.value, NV, E>(xm, panel, ym, rm, K, N, c0, col, cols);
        }
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

template <typename T, Epilogue E>
struct PanelJob : Job {
  const float* x;
  const T* wp;
  float* y;
  const float* r = nullptr;
  int64_t M, K, N, P;
  void unit(int64_t u) override { panels<T, E>(M, x, wp, y, r, K, N, P * u / units, P * (u + 1) / units); }
};

// x's rows RMS-normalised and scaled (module comment), on the calling thread before the products (M x K is small).
std::vector<float> rms_normalised(const float* x, const float* scale, int64_t M, int64_t K, float eps) {
  std::vector<float> out(size_t(M * K));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float sum = 0.0f;
    for (int64_t k = 0; k < K; ++k) sum += row[k] * row[k];
    const float rs = 1.0f / std::sqrt(sum / float(K) + eps);
    for (int64_t k = 0; k < K; ++k) out[size_t(m * K + k)] = scale[k] * (row[k] * rs);
  }
  return out;
}

// y = x' . wp (finished by E) with the panels split into one contiguous range per thread of the pool (the caller
// takes one); x' = x, or x RMS-normalised when `scale` holds K values. wd: wp's dimensions, [P, K, PANEL] or, for
// SWIGLU, [P, 2, K, PANEL].
template <typename T, Epilogue E>
ffi::Error RunPanels(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const void* wp, ffi::Span<const int64_t> wd,
                     float* y, ffi::Span<const int64_t> yd, const float* r, const char* name,
                     const ffi::Buffer<ffi::F32>* scale = nullptr, float eps = 0.0f) {
  auto xd = x.dimensions();
  const size_t rank = E == SWIGLU ? 4 : 3;
  if (xd.size() != 2 || wd.size() != rank || yd.size() != 2 || wd[rank - 1] != PANEL || xd[1] != wd[rank - 2] ||
      (E == SWIGLU && wd[1] != 2) || yd[0] != xd[0] || yd[1] > wd[0] * PANEL || yd[1] <= (wd[0] - 1) * PANEL)
    return ffi::Error::InvalidArgument(std::string(name) + ": expects x [M, K], wp [ceil(N / 48), " +
                                       (E == SWIGLU ? "2, " : "") + "K, 48], y [M, N]");
  const bool norm = scale != nullptr && scale->element_count() > 0;
  if (norm && (scale->dimensions().size() != 1 || scale->dimensions()[0] != xd[1]))
    return ffi::Error::InvalidArgument(std::string(name) + ": the norm scale must be [K] (or [0]: no norm)");
  std::vector<float> normed;
  if (norm) normed = rms_normalised(x.typed_data(), scale->typed_data(), xd[0], xd[1], eps);
  auto job = std::make_shared<PanelJob<T, E>>();
  job->x = norm ? normed.data() : x.typed_data(); job->wp = static_cast<const T*>(wp); job->y = y; job->r = r;
  job->M = xd[0]; job->K = xd[1]; job->N = yd[1]; job->P = wd[0];
  if (job->M == 0 || job->N == 0) return ffi::Error::Success();
  int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  job->units = threads < job->P ? threads : job->P;
  for (int64_t t = 0; t < job->units - 1; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->units) _mm_pause();
  return ffi::Error::Success();
}

template <typename T, ffi::DataType D>
ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<D> wp, ffi::ResultBuffer<ffi::F32> y, float eps) {
  return RunPanels<T, STORE>(pool, x, wp.untyped_data(), wp.dimensions(), y->typed_data(), y->dimensions(), nullptr,
                             "appo_panel_matmul", &scale, eps);
}

template <typename T, ffi::DataType D>
ffi::Error PanelMatmulAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> wp,
                          ffi::Buffer<ffi::F32> r, ffi::ResultBuffer<ffi::F32> y) {
  auto rd = r.dimensions(), yd = y->dimensions();
  if (rd.size() != 2 || yd.size() != 2 || rd[0] != yd[0] || rd[1] != yd[1])
    return ffi::Error::InvalidArgument("appo_panel_matmul_add: the residual r must be [M, N] like y");
  return RunPanels<T, ADD>(pool, x, wp.untyped_data(), wp.dimensions(), y->typed_data(), yd, r.typed_data(),
                           "appo_panel_matmul_add");
}

template <typename T, ffi::DataType D>
ffi::Error PanelSwiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<D> wp, ffi::ResultBuffer<ffi::F32> y, float eps) {
  return RunPanels<T, SWIGLU>(pool, x, wp.untyped_data(), wp.dimensions(), y->typed_data(), y->dimensions(),
                              nullptr, "appo_panel_swiglu", &scale, eps);
}

}  // namespace

// x, then the norm scale ([K] or [0]), then the weights, for the handlers that may normalise x first.
#define APPO_BIND ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
#define APPO_BIND_NORM(D) \
  APPO_BIND.Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::D>>().Ret<ffi::Buffer<ffi::F32>>().Attr<float>("eps")
#define APPO_HANDLERS(SUFFIX, T, D)                                                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(AppoPanelMatmul##SUFFIX, (PanelMatmul<T, ffi::D>), APPO_BIND_NORM(D));          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                                               \
      AppoPanelMatmulAdd##SUFFIX, (PanelMatmulAdd<T, ffi::D>),                                                 \
      APPO_BIND.Arg<ffi::Buffer<ffi::D>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(AppoPanelSwiglu##SUFFIX, (PanelSwiglu<T, ffi::D>), APPO_BIND_NORM(D));
APPO_HANDLERS(, float, F32)
APPO_HANDLERS(Bf16, uint16_t, BF16)
