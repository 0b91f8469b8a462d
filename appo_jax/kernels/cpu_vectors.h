// The float32 vectors the CPU kernels are written in: AVX-512 (16 lanes) where the compiler targets it
// (-march=native), else AVX2 + FMA (8 lanes).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace appo {

#if defined(__AVX512F__)
constexpr int W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float a) { return _mm512_set1_ps(a); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vabs(vec a) { return _mm512_abs_ps(a); }
inline vec vselect_nonneg(vec x, vec a, vec b) {  // a where x >= 0, else b
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
}
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline __mmask16 lanes(int n) { return (__mmask16)((1u << n) - 1u); }
inline vec vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline void vstore_n(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
inline vec wload(const uint16_t* p) {  // 16 bfloat16 -> float32: the upper 16 bits of a float32 (exact)
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline vec vexp2i(vec n) { return _mm512_scalef_ps(_mm512_set1_ps(1.0f), n); }  // 2^n, n integral
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float a) { return _mm256_set1_ps(a); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vabs(vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline vec vselect_nonneg(vec x, vec a, vec b) {  // a where x >= 0, else b
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
}
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline __m256i lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec vload_n(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
inline void vstore_n(float* p, vec v, int n) { _mm256_maskstore_ps(p, lanes(n), v); }
inline vec wload(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline vec vexp2i(vec n) {  // 2^n for integral n in [-126, 127]: n + 127 in the exponent bits
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#else
#error "the appo_jax CPU kernels need AVX2 + FMA or AVX-512"
#endif
inline vec wload(const float* p) { return vload(p); }

// e^x for x <= 0 (softmax arguments), within ~1 ulp (Cephes' expf): x = n ln2 + r (|r| <= ln2 / 2, ln2 in two
// parts), e^r = 1 + r + r^2 P(r) with Cephes' minimax P, times 2^n; x below -87.33 gives 0 (float32's e^x
// underflows there).
inline vec vexp_nonpositive(vec x) {
  vec xc = vmax(x, vset(-87.33f));
#if defined(__AVX512F__)
  vec n = _mm512_roundscale_ps(vmul(xc, vset(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
#else
  vec n = _mm256_round_ps(vmul(xc, vset(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  vec r = vfma(n, vset(-0.693359375f), xc);
  r = vfma(n, vset(2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset(1.0f)));
  vec y = vmul(p, vexp2i(n));
#if defined(__AVX512F__)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset(-87.33f), _CMP_LT_OQ), y, vzero());
#else
  return _mm256_blendv_ps(y, vzero(), _mm256_cmp_ps(x, vset(-87.33f), _CMP_LT_OQ));
#endif
}

// silu(g) = g / (1 + e^-g), from e = e^-|g| <= 1 only: g / (1 + e) for g >= 0, g e / (1 + e) below (no overflow).
inline vec vsilu(vec g) {
  vec e = vexp_nonpositive(vsub(vzero(), vabs(g)));
  return vdiv(vmul(g, vselect_nonneg(g, vset(1.0f), e)), vadd(vset(1.0f), e));
}

}  // namespace appo
