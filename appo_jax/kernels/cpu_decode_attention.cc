// Decode-step attention on a CPU (one new query token per row) over the KV cache in its own layout, as an XLA FFI
// handler on XLA's intra-op thread pool. See cpu_attention.py for the contract.
//
//   appo_decode_attention: out[b, h] = sum_s p[b, h, s] v[layer, b, s, h / G],
//     p[b, h, :] = softmax_s(q[b, h] . k[layer, b, s, h / G] * hd^-0.5, masked slots at -inf)
//
// q [B, H, hd], k / v [L, B, S, KV, hd] (G = H / KV query heads share a kv head), layer int32 [], mask bool [B, S],
// out [B, H, hd], all float32. A row with no visible slot gets the uniform average over its S slots (what a
// finite mask value gives). Work units are (row, kv head) pairs: each reads that head's keys and values once, and
// only at visible slots, with no copy of the cache window (XLA's einsum transposes [B, S, KV, hd] to
// [B, KV, S, hd] first, for every layer and step).
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

// out[j] += p * v[j] for j < n
inline void axpy(float p, const float* v, float* out, int64_t n) {
  vec pv = vset(p);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(out + i, vfma(pv, vload(v + i), vload(out + i)));
  if (i < n) vstore_n(out + i, vfma(pv, vload_n(v + i, int(n - i)), vload_n(out + i, int(n - i))), int(n - i));
}

struct AttentionJob {
  const float *q, *k, *v;
  const bool* mask;
  float* out;
  int64_t B, H, KV, S, hd, layer;
  float scale;
  std::atomic<int64_t> next{0}, done{0};
  int64_t units() const { return B * KV; }

  void unit(int64_t u, std::vector<float>& scores) {
    const int64_t b = u / KV, kvh = u % KV, G = H / KV, stride = KV * hd;
    const int64_t base = ((layer * B + b) * S) * stride + kvh * hd;
    const float* kb = k + base;
    const float* vb = v + base;
    const float* qb = q + (b * H + kvh * G) * hd;
    const bool* mb = mask + b * S;
    float* ob = out + (b * H + kvh * G) * hd;
    scores.assign(size_t(G * S), 0.0f);
    int64_t visible = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (!mb[s]) {
        for (int64_t g = 0; g < G; ++g) scores[g * S + s] = -INFINITY;
        continue;
      }
      ++visible;
      for (int64_t g = 0; g < G; ++g) scores[g * S + s] = dot(qb + g * hd, kb + s * stride, hd) * scale;
    }
    for (int64_t i = 0; i < G * hd; ++i) ob[i] = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      float* sc = scores.data() + g * S;
      if (visible == 0) {
        for (int64_t s = 0; s < S; ++s) sc[s] = 1.0f / float(S);
      } else {
        float m = -INFINITY, total = 0.0f;
        for (int64_t s = 0; s < S; ++s) m = sc[s] > m ? sc[s] : m;
        int64_t s = 0;
        vec neg_m = vset(-m), sum = vzero();
        for (; s + W <= S; s += W) {
          vec e = vexp_nonpositive(vadd(vload(sc + s), neg_m));
          vstore(sc + s, e);
          sum = vadd(sum, e);
        }
        if (s < S) {
          vec e = vexp_nonpositive(vadd(vload_n(sc + s, int(S - s)), neg_m));
          vstore_n(sc + s, e, int(S - s));
          total += vsum(vload_n(sc + s, int(S - s)));
        }
        total += vsum(sum);
        const float inv = 1.0f / total;
        for (s = 0; s < S; ++s) sc[s] *= inv;
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      if (visible != 0 && !mb[s]) continue;
      for (int64_t g = 0; g < G; ++g) axpy(scores[g * S + s], vb + s * stride, ob + g * hd, hd);
    }
  }

  void work() {
    std::vector<float> scores;
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units();) {
      unit(u, scores);
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
  const int64_t units = job->units();
  if (units == 0 || job->hd == 0) return ffi::Error::Success();
  int64_t helpers = (pool.num_threads() > 0 ? pool.num_threads() : 1) - 1;
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
