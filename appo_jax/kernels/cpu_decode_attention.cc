// Decode-step attention on a CPU (one new query token per row) over the KV cache in its own layout, as an XLA FFI
// handler on XLA's intra-op thread pool. See cpu_attention.py for the contract.
//
//   appo_decode_attention: out[b, h] = sum_s p[b, h, s] v[layer, b, s, h / G],
//     p[b, h, :] = softmax_s(q[b, h] . k[layer, b, s, h / G] * hd^-0.5, masked slots at -inf)
//
// q [B, H, hd], k / v [L, B, S, KV, hd] (G = H / KV query heads share a kv head), layer int32 [], mask bool [B, S],
// out [B, H, hd], all float32. A row with no visible slot gets the uniform average over its S slots (what a
// finite mask value gives). A work unit is a row (all its kv heads: a slot's keys are one contiguous run), or a
// (row, kv head) pair when there are fewer rows than threads; it reads its keys and values once, only at visible
// slots, with no copy of the cache window (XLA's einsum transposes [B, S, KV, hd] to [B, KV, S, hd] first, for
// every layer and step).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
using namespace appo;

inline float dot(const float* a, const float* b, int64_t n) {
  vec acc = vzero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = vfma(vload(a + i), vload(b + i), acc);
  if (i < n) acc = vfma(vload_n(a + i, int(n - i)), vload_n(b + i, int(n - i)), acc);
  return vsum(acc);
}

// Slots ahead of the one being read whose rows are prefetched: a (row, kv head) reads its slots at a stride of
// KV * hd floats, which the hardware prefetcher does not follow far enough ahead on its own.
constexpr int64_t AHEAD = 8;

inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// out[j] += p * v[j] for j < n (out: a few KB that stay in L1).
inline void axpy(float p, const float* v, float* out, int64_t n) {
  vec pv = vset(p);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(out + i, vfma(pv, vload(v + i), vload(out + i)));
  if (i < n) vstore_n(out + i, vfma(pv, vload_n(v + i, int(n - i)), vload_n(out + i, int(n - i))), int(n - i));
}

// p[:n] = softmax(p[:n]) in place.
inline void softmax(float* p, int64_t n) {
  float m = -INFINITY, total = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = p[i] > m ? p[i] : m;
  const vec neg_m = vset(-m);
  vec sum = vzero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vec e = vexp_nonpositive(vadd(vload(p + i), neg_m));
    vstore(p + i, e);
    sum = vadd(sum, e);
  }
  if (i < n) {
    vec e = vexp_nonpositive(vadd(vload_n(p + i, int(n - i)), neg_m));
    vstore_n(p + i, e, int(n - i));
    total += vsum(vload_n(p + i, int(n - i)));
  }
  const float inv = 1.0f / (total + vsum(sum));
  for (i = 0; i < n; ++i) p[i] *= inv;
}

struct AttentionJob {
  const float *q, *k, *v;
  const bool* mask;
  float* out;
  int64_t B, H, KV, S, hd, layer;
  float scale;
  bool whole_rows = true;  // a unit is a row (all its kv heads), else a (row, kv head) pair
  std::atomic<int64_t> next{0}, done{0};
  int64_t units() const { return whole_rows ? B : B * KV; }

  // Row b's kv heads [h0, h1) and their G query heads each, over the row's visible slots only (listed first, so
  // that no loop runs over masked slots); no visible slot: the uniform average over all S. A slot's keys (and
  // values) of those heads are one contiguous run of (h1 - h0) hd floats, read once, the next ones prefetched.
  void unit(int64_t u, std::vector<float>& scores, std::vector<int32_t>& slots) {
    const int64_t b = whole_rows ? u : u / KV, h0 = whole_rows ? 0 : u % KV, h1 = whole_rows ? KV : h0 + 1;
    const int64_t G = H / KV, heads = (h1 - h0) * G, stride = KV * hd, run = (h1 - h0) * hd;
    const int64_t base = ((layer * B + b) * S) * stride + h0 * hd;
    const float* kb = k + base;
    const float* vb = v + base;
    const float* qb = q + (b * H + h0 * G) * hd;  // query head j of this unit: qb + j hd, kv head h0 + j / G
    const bool* mb = mask + b * S;
    float* ob = out + (b * H + h0 * G) * hd;
    slots.clear();
    for (int64_t s = 0; s < S; ++s)
      if (mb[s]) slots.push_back(int32_t(s));
    int64_t n = int64_t(slots.size());
    scores.resize(size_t(heads * (n > 0 ? n : S)));
    if (n == 0) {  // the finite mask value's uniform distribution over every slot
      for (int64_t s = 0; s < S; ++s) slots.push_back(int32_t(s));
      n = S;
      for (auto& p : scores) p = 1.0f / float(S);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        if (i + AHEAD < n) prefetch(kb + slots[i + AHEAD] * stride, run);
        const float* row = kb + slots[i] * stride;
        for (int64_t j = 0; j < heads; ++j) scores[j * n + i] = dot(qb + j * hd, row + (j / G) * hd, hd) * scale;
      }
      for (int64_t j = 0; j < heads; ++j) softmax(scores.data() + j * n, n);
    }
    for (int64_t i = 0; i < heads * hd; ++i) ob[i] = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      if (i + AHEAD < n) prefetch(vb + slots[i + AHEAD] * stride, run);
      const float* row = vb + slots[i] * stride;
      for (int64_t j = 0; j < heads; ++j) axpy(scores[j * n + i], row + (j / G) * hd, ob + j * hd, hd);
    }
  }

  void work() {
    std::vector<float> scores;
    std::vector<int32_t> slots;
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units();) {
      unit(u, scores, slots);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> mask,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  bool ok = qd.size() == 3 && kd.size() == 5 && vd.size() == 5 && md.size() == 2 && layer.dimensions().size() == 0;
  for (int i = 0; ok && i < 5; ++i) ok = kd[i] == vd[i];
  ok = ok && kd[1] == qd[0] && kd[4] == qd[2] && kd[3] > 0 && qd[1] % kd[3] == 0 && md[0] == qd[0] && md[1] == kd[2];
  if (!ok)
    return ffi::Error::InvalidArgument(
        "appo_decode_attention: expects q [B, H, hd], k and v [L, B, S, KV, hd] with H % KV == 0, layer [], "
        "mask [B, S]");
  const int64_t L = kd[0], lay = *layer.typed_data();
  if (lay < 0 || lay >= L) return ffi::Error::InvalidArgument("appo_decode_attention: layer out of range");
  auto job = std::make_shared<AttentionJob>();
  job->q = q.typed_data(); job->k = k.typed_data(); job->v = v.typed_data();
  job->mask = mask.typed_data(); job->out = out->typed_data();
  job->B = qd[0]; job->H = qd[1]; job->KV = kd[3]; job->S = kd[2]; job->hd = qd[2]; job->layer = lay;
  job->scale = float(std::pow(double(job->hd), -0.5));
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  job->whole_rows = job->B >= threads;  // fewer rows than threads: split rows by kv head to keep them all busy
  const int64_t units = job->units();
  if (units == 0 || job->hd == 0) return ffi::Error::Success();
  int64_t helpers = threads - 1;
  if (helpers > units - 1) helpers = units - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < units) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AppoDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
