// Per-row epilogues of the fused loss ops: everything that happens to one row of logits
// after the lm_head GEMM.  Framework-free (raw pointers, no torch headers) so that the
// same code can be compiled several times under different `#pragma GCC target` ISAs
// (loss_rows_*.cpp) and picked at run time (loss.cpp).  Everything here has internal
// linkage on purpose: a header-inline function compiled for AVX-512 must never be merged
// by the linker into a caller on a machine without it.
//
// Conventions (see docs/kernels.md / the reference backend):
//   z = (softcap ? c * tanh(s * y / c) : s * y) / T,  y = x . w
//   ls/lt = student/teacher log-softmax on the support; summand s(ls, lt), g = ds/dls;
//   loss = sum s', dz_j = a_j - q_j G with G = sum g'.
// Each row routine receives the raw GEMM output y and transforms it in place first, so the
// transform is fused into the first pass over a row that is already in cache.
//
// The includer defines COPSD_ISA (a namespace name) before including this file.

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "loss_rows_api.h"

// No code here reads floating-point exception flags, so let the compiler assume float operations do not trap:
// with trapping math (GCC's default) it will not if-convert a select whose operands may raise an exception,
// and a loop with such a select (the special cases of vlog, the term clip, NaN guards) is not vectorised.
// Results are unchanged: this allows no reassociation or contraction, only speculation of IEEE operations.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace copsd_cpu {
namespace COPSD_ISA {
namespace {

// ------------------------------------------------------------------------------ exp
// The elementwise cores below are called inside `omp simd` loops, which vectorise only if they are inlined: GCC
// otherwise may keep one out-of-line scalar copy once a function has many callers (measured: the top-k-support
// gradient loop ran one scalar fexp call per entry), so inlining is forced.
#if defined(__GNUC__)
#define COPSD_VEC_INLINE inline __attribute__((always_inline))
#else
#define COPSD_VEC_INLINE inline
#endif


// exp(x) in float, branch-free so loops over it vectorise at the full width of the ISA the file
// is compiled for (16 lanes with AVX-512, 8 with AVX2, 4 at the SSE baseline).  Cody-Waite
// reduction plus a degree-6 minimax polynomial: max relative error 8.4e-8 (< 1 ulp) against
// float64 exp over [-87.3, 88] (tests/test_cpu_kernels.py).  Edges: NaN propagates,
// x < -87.34 -> 0 (no denormals), x > 88 -> inf; callers pass x <= 0 (a logit minus a maximum)
// or tiny ranges.  double uses the C library's exp.
// The shared core: exp(xc) for xc already clamped to [-87.34, 88].
COPSD_VEC_INLINE float exp_clamped(float xc) {
  // Round to nearest with the 1.5*2^23 trick (no libm call, so masked loops still vectorise).
  const float magic = 12582912.0f;
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

COPSD_VEC_INLINE float fexp(float x) {
  const float hi = 88.0f, lo = -87.33654f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  float out = exp_clamped(xc);
  out = x < lo ? 0.0f : out;
  out = x > hi ? std::numeric_limits<float>::infinity() : out;
  return out;
}

inline double fexp(double x) { return std::exp(x); }

// exp(x) for x <= 0 or NaN (a logit minus a running maximum): fexp without its overflow edge, a shorter
// vectorised loop body with the same results (x < -87.34 -> 0, NaN propagates).
COPSD_VEC_INLINE float fexp0(float x) {
  const float lo = -87.33654f;
  const bool under = x < lo;
  const float xc = under ? lo : x;
  const float out = exp_clamped(xc);
  return under ? 0.0f : out;
}

inline double fexp0(double x) { return std::exp(x); }

// log of the float whose bits are `bits` (positive, normal), times 2^-e_shift: x = 2^e m with
// m in [sqrt(1/2), sqrt(2)), log m from a degree-9 polynomial in f = m - 1 (the classic single-precision minimax
// fit), e ln 2 added in two parts.
COPSD_VEC_INLINE float log_of_bits(int32_t bits, int32_t e_shift) {
  const int32_t d = bits - 0x3f3504f3;  // bits of sqrt(1/2): m lands in [sqrt(1/2), sqrt(2))
  const int32_t e = d >> 23;
  const int32_t mb = (d & 0x007fffff) + 0x3f3504f3;
  float m;
  std::memcpy(&m, &mb, sizeof(m));
  const float fe = static_cast<float>(e - e_shift);
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (f + y) + fe * 0.693359375f;
}

// vlog: log(x) in float, branch-free like fexp (so the JSD's per-entry mixture log vectorises), on the core
// above.  Max relative error 1.2e-7 against float64 log over the normal floats (tests/test_cpu_kernels.py).
// Edges: denormals are scaled up first, 0 -> -inf, x < 0 or NaN -> NaN, +inf -> +inf.
COPSD_VEC_INLINE float vlog(float x) {
  // Every select below is on an integer condition: a float compare may trap (-ftrapping-math), which stops
  // GCC from if-converting it and so from vectorising the loop.
  int32_t bx;
  std::memcpy(&bx, &x, sizeof(bx));
  const bool tiny = bx < 0x00800000;  // denormal (or zero / negative, overridden at the end)
  const int32_t sb = tiny ? 0x4b000000 : 0x3f800000;  // 2^23 or 1, chosen as bits (no conditional multiply)
  float scale;
  std::memcpy(&scale, &sb, sizeof(scale));
  const float xs = x * scale;
  int32_t bits;
  std::memcpy(&bits, &xs, sizeof(bits));
  float out = log_of_bits(bits, tiny ? 23 : 0);
  const int32_t ax = bx & 0x7fffffff;
  out = ax == 0 ? -std::numeric_limits<float>::infinity() : out;
  out = ((bx < 0) & (ax != 0)) | (ax > 0x7f800000) ? std::numeric_limits<float>::quiet_NaN() : out;
  out = bx == 0x7f800000 ? x : out;
  return out;
}
inline double vlog(double x) { return std::log(x); }
// vlog for a positive normal float: without the edge cases (denormal, 0, negative, inf, NaN give garbage), a
// shorter vectorised body with vlog's value.  For callers whose argument is >= FLT_MIN by construction and whose
// result is NaN through other terms whenever the argument is not finite (the JSD's mixture log).
COPSD_VEC_INLINE float vlog_normal(float x) {
  int32_t bx;
  std::memcpy(&bx, &x, sizeof(bx));
  return log_of_bits(bx, 0);
}
inline double vlog_normal(double x) { return std::log(x); }
// vtanh: tanh(x) in float, branch-free like fexp (the softcap logit transform, one per logit: the C library's
// tanhf kept that pass scalar, ~20 ns per logit).  |x| < 0.625: x + x^3 P(x^2) with the classic single-precision
// minimax coefficients; otherwise sign(x) (1 - 2 / (e^{2|x|} + 1)), exactly +-1 once e^{2|x|} overflows.  Max
// relative error 2.4e-7 against float64 tanh (tests/test_cpu_kernels.py); NaN propagates, tanh(-0) = -0.
COPSD_VEC_INLINE float vtanh(float x) {
  const float ax = __builtin_fabsf(x);  // (the std:: wrappers are not inlined under the ISA pragma)
  const float big = 1.0f - 2.0f / (fexp(2.0f * ax) + 1.0f);
  const float s = ax * ax;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * ax + ax;
  return __builtin_copysignf(ax < 0.625f ? small : big, x);  // tanh is odd: the sign of x (-0 stays -0)
}
inline double vtanh(double x) { return std::tanh(x); }
// Per-row logs (a handful per row) keep the C library's correctly rounded log.
inline float flog(float x) { return std::log(x); }
inline double flog(double x) { return std::log(x); }

template <typename T>
inline T neg_inf() { return -std::numeric_limits<T>::infinity(); }

constexpr int64_t SUM_BLOCK = 512;  // vocabulary entries per partial sum (see online_row)

// ------------------------------------------------------------------------------ passes

// In-place logit transform of a raw GEMM row (y -> z).
template <typename T>
void transform_row(T* z, int64_t n, const LogitParams& lp) {
  const T inv_t = static_cast<T>(1.0 / lp.temperature);
  const T s = static_cast<T>(lp.logit_scale);
  if (lp.softcap > 0) {
    const T c = static_cast<T>(lp.softcap);
    const T s_over_c = s / c, c_over_t = c * inv_t;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = c_over_t * vtanh(s_over_c * z[j]);
  } else if (s * inv_t != T(1)) {
    const T f = s * inv_t;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] *= f;
  }
}

// d z / d y at a transformed logit z (softcap: tanh = z * T / c).
template <typename T>
struct Chain {
  T base;       // logit_scale / temperature
  T inv_cap;    // temperature / softcap, 0 when no softcap
  explicit Chain(const LogitParams& lp)
      : base(static_cast<T>(lp.logit_scale / lp.temperature)),
        inv_cap(lp.softcap > 0 ? static_cast<T>(lp.temperature / lp.softcap) : T(0)) {}
  inline T operator()(T z) const {
    const T t = z * inv_cap;
    return base * (T(1) - t * t);
  }
};

template <typename T>
inline T row_max(const T* z, int64_t n) {
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

template <typename T>
inline void row_max2(const T* a, const T* b, int64_t n, T& ma, T& mb) {
  T x = neg_inf<T>(), y = neg_inf<T>();
#pragma omp simd reduction(max : x, y)
  for (int64_t j = 0; j < n; ++j) {
    x = a[j] > x ? a[j] : x;
    y = b[j] > y ? b[j] : y;
  }
  ma = x;
  mb = y;
}

// sum_j e^{z_j - m}; m may be -inf only when every z_j is -inf (returns 0 then).
template <typename T>
inline T row_sumexp(const T* z, int64_t n, T m) {
  if (m == neg_inf<T>()) return T(0);
  T s = 0;
  for (int64_t b0 = 0; b0 < n; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < n ? b0 + SUM_BLOCK : n;
    T p = 0;
#pragma omp simd reduction(+ : p)
    for (int64_t j = b0; j < b1; ++j) p += fexp(z[j] - m);
    s += p;
  }
  return s;
}

// log-sum-exp of a row, -inf for an empty / all -inf row.
template <typename T>
inline T row_lse(const T* z, int64_t n) {
  if (n == 0) return neg_inf<T>();
  const T m = row_max(z, n);
  if (m == neg_inf<T>()) return m;
  return m + flog(row_sumexp(z, n, m));
}

// log-sum-exp over gathered values (k small, strided by 1).
template <typename T>
inline T small_lse(const T* v, int64_t k) {
  T m = neg_inf<T>();
  for (int64_t i = 0; i < k; ++i) m = v[i] > m ? v[i] : m;
  if (m == neg_inf<T>() || m != m) return m;
  T s = 0;
  for (int64_t i = 0; i < k; ++i) s += fexp(v[i] - m);
  return m + flog(s);
}

// ------------------------------------------------------------------------------ summands

// Per-element summand s(ls, lt) and g = ds/dls (docs/kernels.md / reference `_summand`).
template <typename T, int KIND>
inline void summand(T ls, T lt, T beta, T log_b, T log_1mb, T& s, T& g) {
  if (KIND == KIND_REVERSE_KL) {
    const T q = fexp(ls), d = ls - lt;
    s = q * d;
    g = q * (d + T(1));
  } else if (KIND == KIND_FORWARD_KL) {
    const T p = fexp(lt);
    s = p * (lt - ls);
    g = -p;
  } else {
    // lm = log((1-b) q + b p) as a log-add-exp: finite even when q and p underflow.
    const T a = ls + log_1mb, b = lt + log_b;
    const T mx = a > b ? a : b;
    const T lm = mx + vlog(fexp(a - mx) + fexp(b - mx));
    const T q = fexp(ls), p = fexp(lt);
    s = beta * p * (lt - lm) + (T(1) - beta) * q * (ls - lm);
    g = (T(1) - beta) * q * (ls - lm);
  }
}

// The term clip as selects on a by-value flag (a branch on a DivParams member read through a reference kept the
// callers' omp simd loops scalar).
template <typename T, int KIND>
inline void clipped(T ls, T lt, bool has_clip, T beta, T log_b, T log_1mb, T clip, T& s, T& g) {
  summand<T, KIND>(ls, lt, beta, log_b, log_1mb, s, g);
  const bool cut = has_clip & (s > clip);
  s = cut ? clip : s;
  g = cut ? T(0) : g;
}

#if defined(COPSD_HAVE_AVX512) || defined(COPSD_HAVE_AVX2)
// fexp's reduction and polynomial, specialised to arguments x <= 0: no overflow side; x is clamped from below
// at -87.3 (e^x is then 1.2e-38 instead of 0, an absolute error far below the sum's rounding since the
// maximum itself contributes 1); NaN passes the clamp (maxps returns its second operand for NaN).
#define COPSD_EXP_NEG_BODY(V, set1, add, mul, fma, fnma, maxop, roundop)             \
  x = maxop(set1(-87.33654f), x);                                                       \
  const V nf = roundop(mul(x, set1(1.44269504088896341f)));                            \
  V r = fnma(nf, set1(0.693359375f), x);                                                \
  r = fnma(nf, set1(-2.12194440e-4f), r);                                               \
  V p = set1(1.9875691500e-4f);                                                         \
  p = fma(p, r, set1(1.3981999507e-3f));                                                \
  p = fma(p, r, set1(8.3334519073e-3f));                                                \
  p = fma(p, r, set1(4.1665795894e-2f));                                                \
  p = fma(p, r, set1(1.6666665459e-1f));                                                \
  p = fma(p, r, set1(5.0000001201e-1f));                                                \
  p = fma(mul(p, r), r, add(r, set1(1.0f)));

// Horizontal sum / maximum of 8 float lanes.
inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline float hmax8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
#endif
#if defined(COPSD_HAVE_AVX512)
inline __m512 round16(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
inline __m512 exp_neg16(__m512 x) {
  COPSD_EXP_NEG_BODY(__m512, _mm512_set1_ps, _mm512_add_ps, _mm512_mul_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps,
                     _mm512_max_ps, round16)
  return _mm512_scalef_ps(p, nf);
}
#elif defined(COPSD_HAVE_AVX2)
inline __m256 round8(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m256 exp_neg8(__m256 x) {
  COPSD_EXP_NEG_BODY(__m256, _mm256_set1_ps, _mm256_add_ps, _mm256_mul_ps, _mm256_fmadd_ps, _mm256_fnmadd_ps,
                     _mm256_max_ps, round8)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif
#undef COPSD_EXP_NEG_BODY

template <typename T>
inline bool any_nan(const T* z, int64_t n) {
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) nan |= z[j] != z[j];
  return nan;
}

// ------------------------------------------------------------------------------ log-probs

// A block that left the running maximum at -inf (every entry -inf or NaN) adds nothing to S and W, except that
// a NaN in it must still make the row's statistics NaN (NaN compares false, so the maximum skipped it).
template <typename T>
inline void lp_empty_block(const T* s, int64_t n, T& S, T& W) {
  if (any_nan(s, n)) S = W = std::numeric_limits<T>::quiet_NaN();
}


// The log-prob rows (`logprob_stats` or, in pieces, `logprob_scan` / `logprob_end`, then after the caller's
// coefficients `logprob_bwd` / `logprob_grad`; docs/kernels.md "CPU log-prob rows") are bound by reading a
// [V] row the GEMM wrote a while ago (L3 / DRAM) and by one exp per logit per pass.  So: one pass per kernel,
// the linear part of the logit transform (f = logit_scale / temperature > 0) folded into the arithmetic instead
// of a pass of its own, the next blocks prefetched, and at AVX2 / AVX-512 explicit vector code.
//
// Statistics pass, online over SUM_BLOCK-entry blocks: the block's maximum (of the raw row: f > 0, so the
// transformed maximum is f times it, exactly), the running maximum m raised to it with S = sum e^{z - m} and
// W = sum e^{z - m} (z - m) rescaled (a shift h: S <- e^-h S, W <- e^-h (W - h S)), then the block's
// exponentials from L1.  z_j = f y_j is formed as fma(y_j, f, -m), never stored: the row is only read, and
// the gradient pass folds f into its constants the same way.  A softcap row is transformed in place first
// (one tanh per logit) and then treated as a row with f = 1; it keeps the transformed logits for the gradient.

// Lines ahead of the one being read that the passes prefetch: two blocks (a block of 512 fp32 is half a
// page, and the hardware's stream prefetcher stops at page boundaries).
constexpr int64_t LP_PREFETCH_BYTES = 2 * SUM_BLOCK * 4;

template <typename T>
inline void lp_prefetch_block(const T* p, int64_t n_left) {
  const int64_t ahead = LP_PREFETCH_BYTES / static_cast<int64_t>(sizeof(T));
  const int64_t step = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t len = SUM_BLOCK < n_left - ahead ? SUM_BLOCK : n_left - ahead;
  for (int64_t j = 0; j < len; j += step) __builtin_prefetch(p + ahead + j, 0, 3);
}

// f = logit_scale / temperature, as transform_row computes it.
template <typename T>
inline T lp_factor(const LogitParams& lp) {
  return static_cast<T>(lp.logit_scale) * static_cast<T>(1.0 / lp.temperature);
}

// Raises the running state (m, S, W) to a block maximum bm (a NaN or -inf never raises it).
template <typename T>
inline void lp_raise(T bm, T& m, T& S, T& W) {
  if (!(bm > m)) return;
  if (S > 0) {  // an empty state (m = -inf) has nothing to rescale
    const T h = bm - m, r = fexp(-h);
    W = r * (W - h * S);
    S *= r;
  }
  m = bm;
}

// (m, S, W) of the row z = f y (see above), continued from the state passed in (m = -inf, S = W = 0 for a whole
// row; a row in pieces passes each piece the state the previous one left); m = -inf when no entry exceeds -inf.
template <typename T>
void lp_stats(const T* y, int64_t V, T f, T& m_io, T& S_io, T& W_io) {
  T m = m_io, S = S_io, W = W_io;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
    const T* s = y + b0;
    lp_prefetch_block(s, V - b0);
    T bm = neg_inf<T>();
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < n; ++j) bm = s[j] > bm ? s[j] : bm;
    lp_raise(bm * f, m, S, W);
    if (m == neg_inf<T>()) {
      lp_empty_block(s, n, S, W);
      continue;
    }
    T ps = 0, pw = 0;
#pragma omp simd reduction(+ : ps, pw)
    for (int64_t j = 0; j < n; ++j) {
      const T d = s[j] * f - m;
      const T e = fexp0(d);
      ps += e;
      pw += e * d;
    }
    S += ps;
    W += pw;
  }
  m_io = m;
  S_io = S;
  W_io = W;
}

// Gradient pass over a raw row (z = f y): with d_j = z_j - lse, y_j <- e^{d_j} (c0 + c1 d_j); without ENT, c1 is 0.
template <typename T, bool ENT>
void lp_grad(T* y, int64_t V, T f, T lse, T c0, T c1) {
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
    T* s = y + b0;
    lp_prefetch_block(s, V - b0);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T d = s[j] * f - lse;
      const T p = fexp0(d);
      s[j] = ENT ? p * (c0 + c1 * d) : p * c0;
    }
  }
}

#if defined(COPSD_HAVE_AVX512) || defined(COPSD_HAVE_AVX2)
// The vector log-prob passes, written once over the float lanes of the build's ISA (16 on AVX-512, 8 on AVX2).
// LpLanes::exp is e^x for x <= ~0 (a logit minus the row maximum or the LSE): the shared exp_neg with x < -87.34
// -> 0 as fexp0 (exp_neg clamps there); NaN propagates.  Row tails shorter than two vectors run the scalar fexp0
// (under 2 x 16 entries a row: nothing in time).
#if defined(COPSD_HAVE_AVX512)
struct LpLanes {
  using V = __m512;
  static constexpr int64_t W = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static V exp(V x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);  // x >= lo, or NaN
    return _mm512_maskz_mov_ps(live, exp_neg16(x));
  }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
};
#else
struct LpLanes {
  using V = __m256;
  static constexpr int64_t W = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static V exp(V x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_NLT_UQ);  // x >= lo, or NaN
    return _mm256_and_ps(exp_neg8(x), live);
  }
  static float hmax(V v) { return hmax8(v); }
  static float hsum(V v) { return hsum8(v); }
};
#endif

template <>
void lp_stats<float>(const float* y, int64_t V, float f, float& m_io, float& S_io, float& W_io) {
  using L = LpLanes;
  constexpr int64_t W1 = L::W;
  const L::V ninf = L::set1(-std::numeric_limits<float>::infinity()), fv = L::set1(f);
  float m = m_io, S = S_io, W = W_io;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
    const float* s = y + b0;
    lp_prefetch_block(s, V - b0);
    L::V a0 = ninf, a1 = ninf, a2 = ninf, a3 = ninf;
    int64_t j = 0;
    for (; j + 4 * W1 <= n; j += 4 * W1) {
      a0 = L::max(L::load(s + j), a0);  // a NaN entry is skipped here (any_nan reports it)
      a1 = L::max(L::load(s + j + W1), a1);
      a2 = L::max(L::load(s + j + 2 * W1), a2);
      a3 = L::max(L::load(s + j + 3 * W1), a3);
    }
    float bm = L::hmax(L::max(L::max(a0, a1), L::max(a2, a3)));
    for (int64_t t = j; t < n; ++t) bm = s[t] > bm ? s[t] : bm;
    lp_raise(bm * f, m, S, W);
    if (m == -std::numeric_limits<float>::infinity()) {
      lp_empty_block(s, n, S, W);
      continue;
    }
    const L::V mv = L::set1(m);
    L::V s0 = L::set1(0.f), s1 = s0, w0 = s0, w1 = s0;
    j = 0;
    for (; j + 2 * W1 <= n; j += 2 * W1) {
      const L::V d0 = L::fmsub(L::load(s + j), fv, mv), d1 = L::fmsub(L::load(s + j + W1), fv, mv);
      const L::V e0 = L::exp(d0), e1 = L::exp(d1);
      s0 = L::add(s0, e0);
      s1 = L::add(s1, e1);
      w0 = L::fmadd(e0, d0, w0);
      w1 = L::fmadd(e1, d1, w1);
    }
    float ps = L::hsum(L::add(s0, s1)), pw = L::hsum(L::add(w0, w1));
    for (; j < n; ++j) {
      const float d = s[j] * f - m;
      const float e = fexp0(d);
      ps += e;
      pw += e * d;
    }
    S += ps;
    W += pw;
  }
  m_io = m;
  S_io = S;
  W_io = W;
}

template <bool ENT>
void lp_grad_f32(float* y, int64_t V, float f, float lse, float c0, float c1) {
  using L = LpLanes;
  constexpr int64_t W1 = L::W;
  const L::V fv = L::set1(f), lv = L::set1(lse), c0v = L::set1(c0), c1v = L::set1(c1);
  auto one = [&](L::V v) {
    const L::V d = L::fmsub(v, fv, lv);
    return L::mul(L::exp(d), ENT ? L::fmadd(c1v, d, c0v) : c0v);
  };
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
    float* s = y + b0;
    lp_prefetch_block(s, V - b0);
    int64_t j = 0;
    for (; j + 2 * W1 <= n; j += 2 * W1) {
      const L::V v0 = L::load(s + j), v1 = L::load(s + j + W1);
      L::store(s + j, one(v0));
      L::store(s + j + W1, one(v1));
    }
    for (; j < n; ++j) {
      const float d = s[j] * f - lse;
      const float p = fexp0(d);
      s[j] = ENT ? p * (c0 + c1 * d) : p * c0;
    }
  }
}
template <>
void lp_grad<float, true>(float* y, int64_t V, float f, float lse, float c0, float c1) {
  lp_grad_f32<true>(y, V, f, lse, c0, c1);
}
template <>
void lp_grad<float, false>(float* y, int64_t V, float f, float lse, float c0, float c1) {
  lp_grad_f32<false>(y, V, f, lse, c0, c1);
}
#endif

// Row statistics in vocabulary pieces (RowKernels::logprob_scan / logprob_end): log-prob of id, entropy, the
// maximum m and log S (LSE = m + log S), the online state carried from piece to piece.  Leaves the row unchanged,
// or, with a softcap, transformed.
template <typename T>
void logprob_scan(LpRow<T>& st, T* y, int64_t j0, int64_t n, int64_t id, const LogitParams& lp) {
  T f = lp_factor<T>(lp);
  if (lp.softcap > 0) {
    transform_row(y, n, lp);
    f = T(1);
  }
  lp_stats(y, n, f, st.m, st.S, st.W);
  if (id >= j0 && id < j0 + n) st.z_id = y[id - j0] * f;
}

template <typename T>
void logprob_end(const LpRow<T>& st, T* out_lp, T* out_ent, T* out_lse, T* out_m, T* out_log_s) {
  const T log_s = flog(st.S);
  *out_ent = log_s - st.W / st.S;
  *out_lp = (st.z_id - st.m) - log_s;
  if (out_lse != nullptr) *out_lse = st.m + log_s;
  if (out_m != nullptr) *out_m = st.m;
  if (out_log_s != nullptr) *out_log_s = log_s;
}

// The same for a whole row in one piece.
template <typename T>
void logprob_row_stats(T* z, int64_t V, int64_t id, const LogitParams& lp, T* out_lp, T* out_ent, T* out_m,
                       T* out_log_s) {
  LpRow<T> st;
  logprob_scan(st, z, 0, V, id, lp);
  logprob_end<T>(st, out_lp, out_ent, nullptr, out_m, out_log_s);
}

// In place: y -> d(a*lp + b*H + c*lse)/dy, the softmax given as q_j = e^{z_j - shift - log_s} (shift + log_s =
// LSE; the loss path passes the row maximum and log S, the recomputing backward LSE and 0).  transformed: a softcap
// row already holds its transformed logits (as logprob_row_stats leaves it); a row without softcap is always the
// raw GEMM output (logprob_row_stats leaves it so).  Off id, dz_j = -q_j (g_lp - g_lse + g_ent (H + ls_j)) with
// ls_j = (z_j - shift) - log_s formed from the exact z_j - shift: written as a + g_ent z_j with a holding
// -g_ent LSE, two terms of the logits' size would cancel (an fp32 error of ~|z| ulps), and an LSE-sized shift
// puts its own rounding into every q_j.
// A row whose three upstream gradients are all 0 (a masked token) gets exact zeros without reading the row.
// A row in vocabulary pieces (the tiled backward) passes each piece the id's place in it, or -1 where the piece
// does not hold it.
template <typename T>
void logprob_row_grad(T* z, int64_t V, int64_t id, T shift, T log_s, T ent, T g_lp, T g_ent, T g_lse,
                      const LogitParams& lp, bool transformed) {
  if (g_lp == T(0) && g_ent == T(0) && g_lse == T(0)) {
    std::memset(z, 0, sizeof(T) * static_cast<size_t>(V));
    return;
  }
  const T a = g_lp - g_lse + g_ent * (ent - log_s);  // dz_j = -(e^{d_j} / S) (a + g_ent d_j), d_j = z_j - shift
  const T inv_s = log_s == T(0) ? T(1) : fexp(-log_s);
  if (lp.softcap > 0) {
    if (!transformed) transform_row(z, V, lp);
    const Chain<T> chain(lp);
    const T z_id = id >= 0 ? z[id] : T(0);
    const T c0 = -inv_s * a, c1 = -inv_s * g_ent;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T zj = z[j], d = zj - shift;
      z[j] = fexp(d) * (c0 + c1 * d) * chain(zj);
    }
    if (id >= 0) z[id] += g_lp * chain(z_id);
    return;
  }
  // z = f y, dz/dy = f: dy_j = e^{d_j} (c0 + c1 d_j) with d_j = f y_j - shift, c0 = -f a / S, c1 = -f g_ent / S.
  const T f = lp_factor<T>(lp);
  if (g_ent != T(0)) {
    lp_grad<T, true>(z, V, f, shift, -f * inv_s * a, -f * inv_s * g_ent);
  } else {
    lp_grad<T, false>(z, V, f, shift, -f * inv_s * a, T(0));
  }
  if (id >= 0) z[id] += g_lp * f;
}

template <typename T>
void logprob_row_bwd(T* z, int64_t V, int64_t id, T lse, T ent, T g_lp, T g_ent, T g_lse, const LogitParams& lp,
                     bool transformed) {
  logprob_row_grad(z, V, id, lse, T(0), ent, g_lp, g_ent, g_lse, lp, transformed);
}

// ------------------------------------------------------------------------------ top-k

// Bit u set iff zb[u] > thr, for 16 consecutive logits (NaN compares false).
template <typename T>
inline uint32_t gt_mask16(const T* zb, T thr) {
  uint32_t m = 0;
  for (int u = 0; u < 16; ++u) m |= static_cast<uint32_t>(zb[u] > thr) << u;
  return m;
}
#if defined(COPSD_HAVE_AVX512)
template <>
inline uint32_t gt_mask16<float>(const float* zb, float thr) {
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(zb), _mm512_set1_ps(thr), _CMP_GT_OQ);
}
#elif defined(COPSD_HAVE_AVX2)
template <>
inline uint32_t gt_mask16<float>(const float* zb, float thr) {
  const __m256 t = _mm256_set1_ps(thr);
  const uint32_t lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(zb), t, _CMP_GT_OQ));
  const uint32_t hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(zb + 8), t, _CMP_GT_OQ));
  return lo | (hi << 8);
}
#elif defined(__SSE2__)
template <>
inline uint32_t gt_mask16<float>(const float* zb, float thr) {
  const __m128 t = _mm_set1_ps(thr);
  uint32_t m = 0;
  for (int q = 0; q < 4; ++q) m |= static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(zb + 4 * q), t))) << (4 * q);
  return m;
}
#endif

// Threshold-filtered selection.  A row is scanned in blocks of TOPK_BLOCK logits that stay in L1:
//   1. the block's maximum m_b (the logit scale is applied in the same loop);
//   2. only when m_b beats the running threshold `thr` (a lower bound on the row's k-th best) are the
//      block's logits compared with it, 16 at a time, and those above it appended with their ids to a
//      candidate buffer (AVX-512 compresses them in registers, AVX2 permutes them by a table indexed by
//      the mask); when the buffer reaches `hi` entries it is cut back to the k best (a quickselect with
//      vector counts and compactions) and `thr` rises to the k-th best value;
//   3. sum_j e^{z_j - m_b} over the block, folded into the row's running (M, S) with one rescale per block
//      (an online log-sum-exp).
// Steps 2 and 3 share one pass over the block (topk_select_sumexp).  A row's first block starts its threshold
// at a lower bound on its k-th best taken from the block's group maxima (step 1).  Once the row has a finite
// maximum M, a block (k > 1) is scanned in one pass on AVX-512 / AVX2 (topk_one_pass): its max, compare and sum of
// e^{z_j - M}, redone relative to m_b only when m_b > M + 60.
// For a random row only a small multiple of k ln(V/k) logits ever pass the threshold, so the scan costs one
// max, one compare and one exponential per logit.  An ascending row (every logit passes) costs an amortised
// O(1) per logit: each cut removes at least max(k, 128) entries; a quickselect that recurses too deep
// finishes with a heap sort, so no input makes it quadratic.  The final <= k candidates are ordered by
// counting ranks (<= 128) or by a stable radix sort.
//
// Order: by value, descending; equal values by ascending id.  The buffer is appended to in id order and the
// cuts keep that order, so among candidates equal to the cut value the first ones are the lowest ids, and a
// later logit equal to `thr` (strict compare) can never displace them.  NaN logits never pass (they make the
// LSE NaN); -inf logits never pass either: a row with fewer than k logits above -inf is completed in id order
// with its -inf ids, then its NaN ids.
constexpr int64_t TOPK_BLOCK = 1024;

template <typename T>
struct TopkEntry {
  T v;
  int64_t id;
};

// Per-thread candidate buffers, grown on demand and kept for the next rows (and calls).
template <typename T>
struct TopkScratch {
  T* val = nullptr;             // candidate values (+16 entries for full-vector stores)
  int64_t* id = nullptr;        // their ids, ascending
  T* tmp = nullptr;             // copy of the values for the selection of a cut
  TopkEntry<T>* ent = nullptr;   // (value, id) pairs of the final sort
  TopkEntry<T>* ent2 = nullptr;  // and its second buffer
  int64_t cap = 0;
  void reserve(int64_t n) {
    if (n <= cap) return;
    release();
    val = static_cast<T*>(std::malloc(sizeof(T) * (n + 16)));
    id = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (n + 16)));
    tmp = static_cast<T*>(std::malloc(sizeof(T) * (n + 16)));
    ent = static_cast<TopkEntry<T>*>(std::malloc(sizeof(TopkEntry<T>) * (n + 16)));
    ent2 = static_cast<TopkEntry<T>*>(std::malloc(sizeof(TopkEntry<T>) * (n + 16)));
    if (!val || !id || !tmp || !ent || !ent2) std::abort();  // out of memory inside a parallel region
    cap = n;
  }
  void release() {
    std::free(val);
    std::free(id);
    std::free(tmp);
    std::free(ent);
    std::free(ent2);
    val = tmp = nullptr;
    id = nullptr;
    ent = ent2 = nullptr;
    cap = 0;
  }
  ~TopkScratch() { release(); }
};

template <typename T>
TopkScratch<T>& topk_scratch() {
  static thread_local TopkScratch<T> s;
  return s;
}

// The order of values used below ("a comes first").
template <typename T>
struct Greater {
  bool operator()(T a, T b) const { return a > b; }
};

template <typename X>
inline void swap_items(X& a, X& b) {
  X t = a;
  a = b;
  b = t;
}

// Heap sort of a[0..n) into `first` order (a[0] first).  O(n log n) for every input.
template <typename X, typename First>
void heap_sort(X* a, int64_t n, First first) {
  auto sift = [&](int64_t i, int64_t m) {  // heap whose root is the last in `first` order
    for (;;) {
      const int64_t l = 2 * i + 1, r = l + 1;
      int64_t w = i;
      if (l < m && first(a[w], a[l])) w = l;
      if (r < m && first(a[w], a[r])) w = r;
      if (w == i) return;
      swap_items(a[i], a[w]);
      i = w;
    }
  };
  for (int64_t i = n / 2 - 1; i >= 0; --i) sift(i, n);
  for (int64_t m = n - 1; m > 0; --m) {
    swap_items(a[0], a[m]);
    sift(0, m);
  }
}

// Moves the values of w[0..m) with v > p (side > 0) or v < p (side < 0) to the front, in order; returns
// their number.  (In place: the write position never passes the read position.)
template <typename T>
inline int64_t compact_side(T* w, int64_t m, T p, int side) {
  int64_t c = 0;
  if (side > 0) {
    for (int64_t i = 0; i < m; ++i) {
      const T v = w[i];
      w[c] = v;
      c += v > p;
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      const T v = w[i];
      w[c] = v;
      c += v < p;
    }
  }
  return c;
}

// Keeps, in order, the entries of val/id[0..n) with val > t and the first `ties` with val == t; returns
// their number.
template <typename T>
inline int64_t compact_keep(T* val, int64_t* id, int64_t n, T t, int64_t ties) {
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = val[i];
    const bool keep = v > t || (v == t && ties > 0);
    ties -= v == t && keep;
    val[w] = v;
    id[w] = id[i];
    w += keep;
  }
  return w;
}

#if defined(COPSD_HAVE_AVX512)
inline __mmask16 tail_mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}
template <>
inline int64_t compact_side<float>(float* w, int64_t m, float p, int side) {
  const __m512 pv = _mm512_set1_ps(p);
  int64_t c = 0;
  for (int64_t i = 0; i < m; i += 16) {
    const __mmask16 live = tail_mask16(m - i);
    const __m512 v = _mm512_maskz_loadu_ps(live, w + i);
    const __mmask16 k = side > 0 ? _mm512_mask_cmp_ps_mask(live, v, pv, _CMP_GT_OQ)
                                 : _mm512_mask_cmp_ps_mask(live, v, pv, _CMP_LT_OQ);
    _mm512_storeu_ps(w + c, _mm512_maskz_compress_ps(k, v));  // the buffers have 16 spare entries
    c += __builtin_popcount(k);
  }
  return c;
}
template <>
inline int64_t compact_keep<float>(float* val, int64_t* id, int64_t n, float t, int64_t ties) {
  const __m512 tv = _mm512_set1_ps(t);
  int64_t w = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail_mask16(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(live, val + i);
    const __m512i ilo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(live), id + i);
    const __m512i ihi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(live >> 8), id + i + 8);
    uint32_t eq = _mm512_mask_cmp_ps_mask(live, v, tv, _CMP_EQ_OQ);
    if (ties <= 0) eq = 0;
    while (static_cast<int64_t>(__builtin_popcount(eq)) > ties) eq &= ~(1u << (31 - __builtin_clz(eq)));
    ties -= __builtin_popcount(eq);
    const uint32_t keep = _mm512_mask_cmp_ps_mask(live, v, tv, _CMP_GT_OQ) | eq;
    const __mmask8 klo = static_cast<__mmask8>(keep & 0xff), khi = static_cast<__mmask8>(keep >> 8);
    _mm512_storeu_ps(val + w, _mm512_maskz_compress_ps(static_cast<__mmask16>(keep), v));
    _mm512_storeu_si512(id + w, _mm512_maskz_compress_epi64(klo, ilo));
    _mm512_storeu_si512(id + w + __builtin_popcount(keep & 0xff), _mm512_maskz_compress_epi64(khi, ihi));
    w += __builtin_popcount(keep);
  }
  return w;
}
#endif

#if defined(COPSD_HAVE_AVX2) && !defined(COPSD_HAVE_AVX512)
// AVX2 has no compress: a lane permutation per 8-bit mask moves the selected lanes to the front.
struct PermTables {
  int32_t f32[256][8];  // 8 x 32-bit lanes
  int32_t i64[16][8];   // 4 x 64-bit lanes, as pairs of 32-bit lanes
};
constexpr PermTables make_perm_tables() {
  PermTables t{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int b = 0; b < 8; ++b)
      if ((m >> b) & 1) t.f32[m][c++] = b;
  }
  for (int m = 0; m < 16; ++m) {
    int c = 0;
    for (int b = 0; b < 4; ++b)
      if ((m >> b) & 1) {
        t.i64[m][2 * c] = 2 * b;
        t.i64[m][2 * c + 1] = 2 * b + 1;
        ++c;
      }
  }
  return t;
}
constexpr PermTables kPerm = make_perm_tables();

inline __m256i perm8(uint32_t m) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kPerm.f32[m])); }
inline __m256i perm4x64(uint32_t m) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kPerm.i64[m]));
}

template <>
inline int64_t compact_side<float>(float* w, int64_t m, float p, int side) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t c = 0, i = 0;
  for (; i + 8 <= m; i += 8) {
    const __m256 v = _mm256_loadu_ps(w + i);
    const uint32_t k = _mm256_movemask_ps(side > 0 ? _mm256_cmp_ps(v, pv, _CMP_GT_OQ) : _mm256_cmp_ps(v, pv, _CMP_LT_OQ));
    _mm256_storeu_ps(w + c, _mm256_permutevar8x32_ps(v, perm8(k)));  // the buffers have 16 spare entries
    c += __builtin_popcount(k);
  }
  for (; i < m; ++i) {
    const float v = w[i];
    w[c] = v;
    c += side > 0 ? v > p : v < p;
  }
  return c;
}
template <>
inline int64_t compact_keep<float>(float* val, int64_t* id, int64_t n, float t, int64_t ties) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t w = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(val + i);
    const __m256i ilo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(id + i));
    const __m256i ihi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(id + i + 4));
    uint32_t eq = _mm256_movemask_ps(_mm256_cmp_ps(v, tv, _CMP_EQ_OQ));
    if (ties <= 0) eq = 0;
    while (static_cast<int64_t>(__builtin_popcount(eq)) > ties) eq &= ~(1u << (31 - __builtin_clz(eq)));
    ties -= __builtin_popcount(eq);
    const uint32_t keep = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, tv, _CMP_GT_OQ))) | eq;
    _mm256_storeu_ps(val + w, _mm256_permutevar8x32_ps(v, perm8(keep)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(id + w), _mm256_permutevar8x32_epi32(ilo, perm4x64(keep & 15)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(id + w + __builtin_popcount(keep & 15)),
                        _mm256_permutevar8x32_epi32(ihi, perm4x64(keep >> 4)));
    w += __builtin_popcount(keep);
  }
  for (; i < n; ++i) {
    const float v = val[i];
    const bool keep = v > t || (v == t && ties > 0);
    ties -= v == t && keep;
    val[w] = v;
    id[w] = id[i];
    w += keep;
  }
  return w;
}
#endif

// The value of rank r (0-based, descending) of w[0..m) (no NaN); w (m + 16 entries) is clobbered.  A
// quickselect whose steps are branch-free: the values above / equal to a median-of-three pivot are counted
// (vector compares) and the side that holds rank r is compacted to the front; a rank among the equal values
// ends it at once.  After 2 log2(m) + 8 steps without reaching 32 values it finishes with a heap sort, so no
// input makes it quadratic.  The extreme ranks are a plain minimum / maximum: the top-k's first block asks for
// rank k - 1 of its group maxima, the minimum when k equals the group count (k = 64 at AVX-512), where the
// quickselect's steps and final O(32^2) count cost ~3 us a row (~7 ms of a top-k call at N = 2048).
template <typename T>
T select_desc(T* w, int64_t m, int64_t r) {
  if (r == m - 1 || r == 0) {
    T v = w[0];
    if (r == 0) {
#pragma omp simd reduction(max : v)
      for (int64_t i = 1; i < m; ++i) v = w[i] > v ? w[i] : v;
    } else {
#pragma omp simd reduction(min : v)
      for (int64_t i = 1; i < m; ++i) v = w[i] < v ? w[i] : v;
    }
    return v;
  }
  int budget = 8;
  for (int64_t q = m; q > 1; q >>= 1) budget += 2;
  while (m > 32 && budget-- > 0) {
    T x = w[0], y = w[m / 2], z = w[m - 1];
    if (x < y) swap_items(x, y);
    if (y < z) swap_items(y, z);
    if (x < y) swap_items(x, y);
    const T p = y;  // median of the three
    int64_t gt = 0, eq = 0;
#pragma omp simd reduction(+ : gt, eq)
    for (int64_t i = 0; i < m; ++i) {
      gt += w[i] > p;
      eq += w[i] == p;
    }
    if (r < gt) {
      m = compact_side(w, m, p, 1);
    } else if (r < gt + eq) {
      return p;
    } else {
      m = compact_side(w, m, p, -1);
      r -= gt + eq;
    }
  }
  if (m > 32) {
    heap_sort(w, m, Greater<T>());
    return w[r];
  }
  // At most 32 values left: the one whose rank range [#greater, #greater + #equal) holds r.
  for (int64_t i = 0; i < m; ++i) {
    const T v = w[i];
    int64_t gt = 0, eq = 0;
#pragma omp simd reduction(+ : gt, eq)
    for (int64_t j = 0; j < m; ++j) {
      gt += w[j] > v;
      eq += w[j] == v;
    }
    if (gt <= r && r < gt + eq) return v;
  }
  return w[r];  // not reached: some value holds rank r
}

// Cuts the n candidates (ids ascending, no NaN) to the k best, in place and in id order; returns the k-th
// best value.  n > k.
template <typename T>
T topk_cut(T* val, int64_t* id, T* tmp, int64_t n, int64_t k) {
  std::memcpy(tmp, val, sizeof(T) * n);
  const T t = select_desc(tmp, n, k - 1);
  int64_t gt = 0;
#pragma omp simd reduction(+ : gt)
  for (int64_t i = 0; i < n; ++i) gt += val[i] > t;
  compact_keep(val, id, n, t, k - gt);  // entries equal to t that stay: the first ones (lowest ids)
  return t;
}

// Stable LSD radix sort of a[0..n) (no NaN) by value, descending, 8 bits per pass (b: scratch of n
// entries); entries of equal value keep their order.  Returns the buffer that holds the result.
inline uint32_t desc_key(float v) {
  v += 0.0f;  // -0 -> +0: equal values must get equal keys
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return ~(b ^ ((b >> 31) ? 0xffffffffu : 0x80000000u));
}
inline uint64_t desc_key(double v) {
  v += 0.0;
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return ~(b ^ ((b >> 63) ? ~uint64_t(0) : (uint64_t(1) << 63)));
}
template <typename T>
TopkEntry<T>* radix_sort_desc(TopkEntry<T>* a, TopkEntry<T>* b, int64_t n) {
  for (int shift = 0; shift < static_cast<int>(8 * sizeof(T)); shift += 8) {
    int64_t count[256] = {};
    for (int64_t i = 0; i < n; ++i) ++count[(desc_key(a[i].v) >> shift) & 0xff];
    if (count[(desc_key(a[0].v) >> shift) & 0xff] == n) continue;  // one digit value: nothing moves
    int64_t pos = 0;
    for (int d = 0; d < 256; ++d) {
      const int64_t c = count[d];
      count[d] = pos;
      pos += c;
    }
    for (int64_t i = 0; i < n; ++i) b[count[(desc_key(a[i].v) >> shift) & 0xff]++] = a[i];
    TopkEntry<T>* t = a;
    a = b;
    b = t;
  }
  return a;
}

// Appends zb[u] with its id j0 + u for every bit u of msk.  The buffer has 16 spare entries.
template <typename T>
inline int64_t topk_append_bits(const T* zb, int64_t j0, uint32_t msk, T* val, int64_t* id, int64_t n) {
  while (msk) {
    const int u = __builtin_ctz(msk);
    val[n] = zb[u];
    id[n] = j0 + u;
    ++n;
    msk &= msk - 1;
  }
  return n;
}
// The same for a full vector of 16 logits zb[0 .. 16).
template <typename T>
inline int64_t topk_append(const T* zb, int64_t j0, uint32_t msk, T* val, int64_t* id, int64_t n) {
  return topk_append_bits(zb, j0, msk, val, id, n);
}
#if defined(COPSD_HAVE_AVX512)
template <>
inline int64_t topk_append<float>(const float* zb, int64_t j0, uint32_t msk, float* val, int64_t* id, int64_t n) {
  const __mmask16 m = static_cast<__mmask16>(msk);
  _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(zb)));
  const __m512i base = _mm512_add_epi64(_mm512_set1_epi64(j0), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  const __mmask8 lo = static_cast<__mmask8>(msk & 0xff), hi = static_cast<__mmask8>(msk >> 8);
  const int nlo = __builtin_popcount(msk & 0xff);
  _mm512_storeu_si512(id + n, _mm512_maskz_compress_epi64(lo, base));
  _mm512_storeu_si512(id + n + nlo, _mm512_maskz_compress_epi64(hi, _mm512_add_epi64(base, _mm512_set1_epi64(8))));
  return n + __builtin_popcount(msk);
}
#elif defined(COPSD_HAVE_AVX2)
template <>
inline int64_t topk_append<float>(const float* zb, int64_t j0, uint32_t msk, float* val, int64_t* id, int64_t n) {
  for (int h = 0; h < 2; ++h, j0 += 8, zb += 8, msk >>= 8) {
    const uint32_t m = msk & 0xff;
    const __m256i p = perm8(m);  // its first popcount(m) lanes: the selected lane numbers
    _mm256_storeu_ps(val + n, _mm256_permutevar8x32_ps(_mm256_loadu_ps(zb), p));
    const __m256i base = _mm256_set1_epi64x(j0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(id + n),
                        _mm256_add_epi64(base, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(p))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(id + n + 4),
                        _mm256_add_epi64(base, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(p, 1))));
    n += __builtin_popcount(m);
  }
  return n;
}
#endif

// sum_j e^{z_j - m} over n logits z_j <= m (m finite); a NaN logit makes it NaN.
template <typename T>
inline T block_sumexp(const T* z, int64_t n, T m) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += fexp(z[j] - m);
  return s;
}
#if defined(COPSD_HAVE_AVX512)
template <>
inline float block_sumexp<float>(const float* z, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    s0 = _mm512_add_ps(s0, exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(z + j), mv)));
    s1 = _mm512_add_ps(s1, exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(z + j + 16), mv)));
  }
  for (; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    s1 = _mm512_mask_add_ps(s1, k, s1, exp_neg16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, z + j), mv)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#elif defined(COPSD_HAVE_AVX2)
template <>
inline float block_sumexp<float>(const float* z, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    s0 = _mm256_add_ps(s0, exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(z + j), mv)));
    s1 = _mm256_add_ps(s1, exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(z + j + 8), mv)));
  }
  s0 = _mm256_add_ps(s0, s1);
  float s = hsum8(s0);
  for (; j < n; ++j) s += fexp(z[j] - m);
  return s;
}
#endif

// Maximum of z[0..n) (NaN compares false, so it is skipped); with SCALE, z is first multiplied by f in place.
// 32 independent running maxima (several vector registers): one would be bound by the latency of max.  Those
// running maxima are also written to groups[0 .. TOPK_GROUPS): the maxima of TOPK_GROUPS disjoint groups of the
// block's logits (-inf for a group without a number), from which topk_scan bounds the k-th best from below.
#if defined(COPSD_HAVE_AVX512) || defined(COPSD_HAVE_AVX2)
constexpr int TOPK_GROUPS = 64;
#else
constexpr int TOPK_GROUPS = 32;
#endif
template <typename T, bool SCALE>
inline T block_max(T* z, int64_t n, T f, T* groups) {
  T acc[32];
  for (int u = 0; u < 32; ++u) acc[u] = neg_inf<T>();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    for (int u = 0; u < 32; ++u) {
      T v = z[j + u];
      if (SCALE) {
        v *= f;
        z[j + u] = v;
      }
      acc[u] = v > acc[u] ? v : acc[u];
    }
  }
  T m = neg_inf<T>();
  for (int u = 0; u < 32; ++u) m = acc[u] > m ? acc[u] : m;
  for (int u = 0; u < TOPK_GROUPS; ++u) groups[u] = u < 32 ? acc[u] : neg_inf<T>();
  for (; j < n; ++j) {
    T v = z[j];
    if (SCALE) {
      v *= f;
      z[j] = v;
    }
    m = v > m ? v : m;
  }
  return m;
}
// Four accumulators: a single running maximum is bound by the latency of max (4 cycles per vector).  The
// operand order max(v, acc) returns acc for a NaN v.
#if defined(COPSD_HAVE_AVX512)
template <bool SCALE>
inline float block_max_f32(float* z, int64_t n, float f, float* groups) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), fv = _mm512_set1_ps(f);
  __m512 a0 = ninf, a1 = ninf, a2 = ninf, a3 = ninf;
  auto load = [&](int64_t j, __mmask16 live) {
    __m512 v = _mm512_mask_loadu_ps(ninf, live, z + j);
    if (SCALE) {
      v = _mm512_mul_ps(v, fv);
      _mm512_mask_storeu_ps(z + j, live, v);
    }
    return v;
  };
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    a0 = _mm512_max_ps(load(j, 0xffff), a0);
    a1 = _mm512_max_ps(load(j + 16, 0xffff), a1);
    a2 = _mm512_max_ps(load(j + 32, 0xffff), a2);
    a3 = _mm512_max_ps(load(j + 48, 0xffff), a3);
  }
  for (; j < n; j += 16) a0 = _mm512_max_ps(load(j, tail_mask16(n - j)), a0);
  _mm512_storeu_ps(groups, a0);
  _mm512_storeu_ps(groups + 16, a1);
  _mm512_storeu_ps(groups + 32, a2);
  _mm512_storeu_ps(groups + 48, a3);
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
}
template <>
inline float block_max<float, true>(float* z, int64_t n, float f, float* groups) {
  return block_max_f32<true>(z, n, f, groups);
}
template <>
inline float block_max<float, false>(float* z, int64_t n, float f, float* groups) {
  return block_max_f32<false>(z, n, f, groups);
}
#elif defined(COPSD_HAVE_AVX2)
template <bool SCALE>
inline float block_max_f32(float* z, int64_t n, float f, float* groups) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), fv = _mm256_set1_ps(f);
  // Eight running maxima (64 groups: k = 64 gets its first-block threshold as at AVX-512).
  __m256 a0 = ninf, a1 = ninf, a2 = ninf, a3 = ninf, a4 = ninf, a5 = ninf, a6 = ninf, a7 = ninf;
  auto load = [&](int64_t j) {
    __m256 v = _mm256_loadu_ps(z + j);
    if (SCALE) {
      v = _mm256_mul_ps(v, fv);
      _mm256_storeu_ps(z + j, v);
    }
    return v;
  };
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    a0 = _mm256_max_ps(load(j), a0);
    a1 = _mm256_max_ps(load(j + 8), a1);
    a2 = _mm256_max_ps(load(j + 16), a2);
    a3 = _mm256_max_ps(load(j + 24), a3);
    a4 = _mm256_max_ps(load(j + 32), a4);
    a5 = _mm256_max_ps(load(j + 40), a5);
    a6 = _mm256_max_ps(load(j + 48), a6);
    a7 = _mm256_max_ps(load(j + 56), a7);
  }
  for (; j + 8 <= n; j += 8) a0 = _mm256_max_ps(load(j), a0);
  _mm256_storeu_ps(groups, a0);
  _mm256_storeu_ps(groups + 8, a1);
  _mm256_storeu_ps(groups + 16, a2);
  _mm256_storeu_ps(groups + 24, a3);
  _mm256_storeu_ps(groups + 32, a4);
  _mm256_storeu_ps(groups + 40, a5);
  _mm256_storeu_ps(groups + 48, a6);
  _mm256_storeu_ps(groups + 56, a7);
  a0 = _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)),
                     _mm256_max_ps(_mm256_max_ps(a4, a5), _mm256_max_ps(a6, a7)));
  float m = hmax8(a0);
  for (; j < n; ++j) {
    const float v = SCALE ? z[j] * f : z[j];
    if (SCALE) z[j] = v;
    m = v > m ? v : m;
  }
  return m;
}
template <>
inline float block_max<float, true>(float* z, int64_t n, float f, float* groups) {
  return block_max_f32<true>(z, n, f, groups);
}
template <>
inline float block_max<float, false>(float* z, int64_t n, float f, float* groups) {
  return block_max_f32<false>(z, n, f, groups);
}
#endif

// The candidate buffer of a row while a block's logits are compared with its threshold (in registers).
template <typename T>
struct TopkSink {
  T* val;
  int64_t* id;
  int64_t n, hi, k;
  T thr;
  bool dense;
  int64_t passed = 0;  // logits appended in this block
  // The logits zb[u] (ids j + u) with bit u of msk set; a full vector of 16 logits.  While many logits pass,
  // every vector is appended without a test of its mask: a branch on an unpredictable mask costs more than an
  // empty append.
  inline void put16(const T* zb, int64_t j, uint32_t msk) {
    if (!dense && !msk) return;
    const int64_t n0 = n;
    n = topk_append(zb, j, msk, val, id, n);
    passed += n - n0;
    if (n >= hi) cut();
  }
  // The same for a partial vector (the piece's last one).
  inline void put_bits(const T* zb, int64_t j, uint32_t msk) {
    const int64_t n0 = n;
    n = topk_append_bits(zb, j, msk, val, id, n);
    passed += n - n0;
    if (n >= hi) cut();
  }
  // The cuts' scratch is this thread's, looked up here: a cut is rare, and the thread-local lookup costs a call
  // (a piece of a tiled row is only a few hundred logits long).  Out of line, so that put16 stays small enough to
  // be inlined into the scan loops.
  __attribute__((noinline, cold)) void cut() {
    TopkScratch<T>& sc = topk_scratch<T>();
    sc.reserve(hi + 16);
    thr = topk_cut(val, id, sc.tmp, n, k);
    n = k;
  }
};

// Appends the logits of z[0..len) (ids j0 + ...) above the sink's threshold, 16 at a time.
template <typename T>
inline void topk_select(const T* z, int64_t len, int64_t j0, TopkSink<T>& sk) {
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) sk.put16(z + j, j0 + j, gt_mask16(z + j, sk.thr));
  if (j < len) {
    uint32_t msk = 0;
    for (int64_t u = 0; j + u < len; ++u) msk |= static_cast<uint32_t>(z[j + u] > sk.thr) << u;
    sk.put_bits(z + j, j0 + j, msk);
  }
}

// topk_select followed by block_sumexp(z, len, m) (returned), in one pass over the block where the ISA has a
// vector exponential: each vector is loaded once for its compare and its exponentials.  The same appends, cuts
// and sum (the same order of additions) as the two passes.
template <typename T>
inline T topk_select_sumexp(const T* z, int64_t len, T m, int64_t j0, TopkSink<T>& sk) {
  topk_select(z, len, j0, sk);
  return block_sumexp(z, len, m);
}
#if defined(COPSD_HAVE_AVX512)
template <>
inline float topk_select_sumexp<float>(const float* z, int64_t len, float m, int64_t j0, TopkSink<float>& sk) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    const __m512 a = _mm512_loadu_ps(z + j), b = _mm512_loadu_ps(z + j + 16);
    s0 = _mm512_add_ps(s0, exp_neg16(_mm512_sub_ps(a, mv)));
    s1 = _mm512_add_ps(s1, exp_neg16(_mm512_sub_ps(b, mv)));
    sk.put16(z + j, j0 + j, _mm512_cmp_ps_mask(a, _mm512_set1_ps(sk.thr), _CMP_GT_OQ));
    sk.put16(z + j + 16, j0 + j + 16, _mm512_cmp_ps_mask(b, _mm512_set1_ps(sk.thr), _CMP_GT_OQ));  // thr may rise
  }
  for (; j < len; j += 16) {
    const bool full = len - j >= 16;
    const __mmask16 live = full ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (len - j)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(live, z + j);
    s1 = _mm512_mask_add_ps(s1, live, s1, exp_neg16(_mm512_sub_ps(a, mv)));
    const uint32_t msk = _mm512_mask_cmp_ps_mask(live, a, _mm512_set1_ps(sk.thr), _CMP_GT_OQ);
    if (full) {
      sk.put16(z + j, j0 + j, msk);
    } else {
      sk.put_bits(z + j, j0 + j, msk);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#elif defined(COPSD_HAVE_AVX2)
template <>
inline float topk_select_sumexp<float>(const float* z, int64_t len, float m, int64_t j0, TopkSink<float>& sk) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m256 a = _mm256_loadu_ps(z + j), b = _mm256_loadu_ps(z + j + 8);
    s0 = _mm256_add_ps(s0, exp_neg8(_mm256_sub_ps(a, mv)));
    s1 = _mm256_add_ps(s1, exp_neg8(_mm256_sub_ps(b, mv)));
    const __m256 t = _mm256_set1_ps(sk.thr);
    const uint32_t lo = _mm256_movemask_ps(_mm256_cmp_ps(a, t, _CMP_GT_OQ));
    const uint32_t hi = _mm256_movemask_ps(_mm256_cmp_ps(b, t, _CMP_GT_OQ));
    sk.put16(z + j, j0 + j, lo | (hi << 8));
  }
  s0 = _mm256_add_ps(s0, s1);
  float s = hsum8(s0);
  if (j < len) {
    uint32_t msk = 0;
    for (int64_t u = 0; j + u < len; ++u) msk |= static_cast<uint32_t>(z[j + u] > sk.thr) << u;
    sk.put_bits(z + j, j0 + j, msk);
  }
  for (; j < len; ++j) s += fexp(z[j] - m);
  return s;
}
#endif

// The one-pass block's exponential, leaner than exp_neg16 / exp_neg8 (10 / 13 vector operations instead of 15 /
// 18 with the subtraction of the reference): e^{z - ref} = 2^t with t = z * log2(e) - c, c = fl(ref * log2(e)), one
// FMA from the logit (no separate z - ref).  The rounding of c scales every term of the block by the same factor
// 2^(c - ref * L) (L: log2(e) in float), which the caller divides out in double precision, exactly; that needs
// |ref| small enough for c's rounding to be a small exponent (TOPK_LEAN_REF; larger references take exp_neg).
// Then 2^t = 2^n * 2^f, n = round(t), f = t - n in [-1/2, 1/2], 2^f by a degree-5 polynomial fitted to relative
// error (<= 1.7e-7 evaluated in float FMAs, like exp_neg's 2.4e-7).  t is clamped from below at -125: a term
// below 2^-125 of the reference adds nothing next to the reference's own 1, and the result stays a normal
// number (no denormal penalties); NaN passes the clamp (max returns its second operand for NaN).
constexpr float TOPK_LOG2E = 1.44269502162933349609375f;  // log2(e) rounded to float
constexpr float TOPK_LEAN_REF = 16384.0f;                  // |ref| below this: c's rounding error <= 2^-10
#if defined(COPSD_HAVE_AVX512) || defined(COPSD_HAVE_AVX2)
#define COPSD_EXP2_POLY(V, set1, fma, sub, roundop)                                    \
  t = maxop(set1(-125.0f), t);                                                         \
  const V n = roundop(t);                                                              \
  const V f = sub(t, n);                                                               \
  V p = set1(1.3264727313e-3f);                                                        \
  p = fma(p, f, set1(9.6715129912e-3f));                                               \
  p = fma(p, f, set1(5.5507335812e-2f));                                               \
  p = fma(p, f, set1(2.4022242427e-1f));                                               \
  p = fma(p, f, set1(6.9314700365e-1f));                                               \
  p = fma(p, f, set1(1.0f));
#endif
#if defined(COPSD_HAVE_AVX512)
inline __m512 topk_exp2_16(__m512 t) {
  auto maxop = [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); };
  COPSD_EXP2_POLY(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_sub_ps, round16)
  return _mm512_scalef_ps(p, n);
}
#elif defined(COPSD_HAVE_AVX2)
inline __m256 topk_exp2_8(__m256 t) {
  auto maxop = [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); };
  COPSD_EXP2_POLY(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_sub_ps, round8)
  // 2^n * p by adding n to p's exponent field (n >= -125 and p in [0.7, 1.42]: a normal result; n <= 127 for
  // the blocks whose sum is kept, z <= ref + 60).
  return _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}
#endif
#undef COPSD_EXP2_POLY
// The factor that turns a sum of topk_exp2 terms (t = z * L - fl(ref * L)) into sum e^{z - ref}: ref * L is exact
// in double (a product of two floats).
// The exponent is at most 2^-10 in size (TOPK_LEAN_REF), so three Taylor terms of e^x (x = exponent * ln 2) are
// exact to ~1e-14, without a libm call per block.
inline float topk_exp2_fix(float ref, float c) {
  const double x = (static_cast<double>(c) - static_cast<double>(ref) * TOPK_LOG2E) * 0.6931471805599453;
  return static_cast<float>(1.0 + x * (1.0 + x * (0.5 + x * (1.0 / 6.0))));
}

// One pass over a block of a row that already has a finite running maximum `ref`: the scale (in place), the
// block's maximum bm, the compare with the threshold and the appends, and s = sum_j e^{z_j - ref} (ref, not bm:
// the maximum is not known before the pass; topk_scan redoes the sum relative to bm when bm > ref + 60, where
// e^{z - ref} could lose range).  The max pass of a block reads it from L2 and the exp pass is bound by its
// arithmetic: one pass overlaps the two.  Returns false where the ISA has no such pass (two passes instead).
template <typename T>
inline bool topk_one_pass(T*, int64_t, T, bool, T, int64_t, TopkSink<T>&, T&, T&) {
  return false;
}
#if defined(COPSD_HAVE_AVX512)
template <bool SCALE, bool LEAN>
inline void topk_one_pass_f32(float* z, int64_t len, float f, float ref, int64_t j0, TopkSink<float>& sk, float& bm,
                              float& s) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), fv = _mm512_set1_ps(f),
               rv = _mm512_set1_ps(ref);
  const float c = ref * TOPK_LOG2E;
  const __m512 l2e = _mm512_set1_ps(TOPK_LOG2E), cv = _mm512_set1_ps(c);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), a0 = ninf, a1 = ninf;
  auto step = [&](int64_t j, __mmask16 live, __m512& acc, __m512& mx) {
    __m512 v = _mm512_maskz_loadu_ps(live, z + j);
    if (SCALE) {
      v = _mm512_mul_ps(v, fv);
      _mm512_mask_storeu_ps(z + j, live, v);
    }
    mx = _mm512_mask_max_ps(mx, live, v, mx);  // max(v, mx): mx for a NaN v
    const __m512 e = LEAN ? topk_exp2_16(_mm512_fmsub_ps(v, l2e, cv)) : exp_neg16(_mm512_sub_ps(v, rv));
    acc = _mm512_mask_add_ps(acc, live, acc, e);
    const uint32_t msk = _mm512_mask_cmp_ps_mask(live, v, _mm512_set1_ps(sk.thr), _CMP_GT_OQ);
    if (live == 0xffff) {
      sk.put16(z + j, j0 + j, msk);
    } else {
      sk.put_bits(z + j, j0 + j, msk);
    }
  };
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    step(j, 0xffff, s0, a0);
    step(j + 16, 0xffff, s1, a1);
  }
  for (; j < len; j += 16) step(j, len - j >= 16 ? 0xffff : tail_mask16(len - j), s1, a1);
  bm = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  if (LEAN) s *= topk_exp2_fix(ref, c);
}
#elif defined(COPSD_HAVE_AVX2)
template <bool SCALE, bool LEAN>
inline void topk_one_pass_f32(float* z, int64_t len, float f, float ref, int64_t j0, TopkSink<float>& sk, float& bm,
                              float& s) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), fv = _mm256_set1_ps(f),
               rv = _mm256_set1_ps(ref);
  const float c = ref * TOPK_LOG2E;
  const __m256 l2e = _mm256_set1_ps(TOPK_LOG2E), cv = _mm256_set1_ps(c);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), a0 = ninf, a1 = ninf;
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    __m256 a = _mm256_loadu_ps(z + j), b = _mm256_loadu_ps(z + j + 8);
    if (SCALE) {
      a = _mm256_mul_ps(a, fv);
      b = _mm256_mul_ps(b, fv);
      _mm256_storeu_ps(z + j, a);
      _mm256_storeu_ps(z + j + 8, b);
    }
    a0 = _mm256_max_ps(a, a0);  // max(v, acc): acc for a NaN v
    a1 = _mm256_max_ps(b, a1);
    if (LEAN) {
      s0 = _mm256_add_ps(s0, topk_exp2_8(_mm256_fmsub_ps(a, l2e, cv)));
      s1 = _mm256_add_ps(s1, topk_exp2_8(_mm256_fmsub_ps(b, l2e, cv)));
    } else {
      s0 = _mm256_add_ps(s0, exp_neg8(_mm256_sub_ps(a, rv)));
      s1 = _mm256_add_ps(s1, exp_neg8(_mm256_sub_ps(b, rv)));
    }
    const __m256 t = _mm256_set1_ps(sk.thr);
    const uint32_t lo = _mm256_movemask_ps(_mm256_cmp_ps(a, t, _CMP_GT_OQ));
    const uint32_t hi = _mm256_movemask_ps(_mm256_cmp_ps(b, t, _CMP_GT_OQ));
    sk.put16(z + j, j0 + j, lo | (hi << 8));
  }
  a0 = _mm256_max_ps(a0, a1);
  float m = hmax8(a0);
  s0 = _mm256_add_ps(s0, s1);
  float sum = hsum8(s0);
  if (LEAN) sum *= topk_exp2_fix(ref, c);
  if (j < len) {  // the piece's last, partial vector
    uint32_t msk = 0;
    for (int64_t u = 0; j + u < len; ++u) {
      float v = z[j + u];
      if (SCALE) {
        v *= f;
        z[j + u] = v;
      }
      m = v > m ? v : m;
      sum += fexp(v - ref);
      msk |= static_cast<uint32_t>(v > sk.thr) << u;
    }
    sk.put_bits(z + j, j0 + j, msk);
  }
  bm = m;
  s = sum;
}
#endif
#if defined(COPSD_HAVE_AVX512) || defined(COPSD_HAVE_AVX2)
inline bool topk_one_pass(float* z, int64_t len, float f, bool scale, float ref, int64_t j0, TopkSink<float>& sk,
                          float& bm, float& s) {
  const bool lean = std::fabs(ref) < TOPK_LEAN_REF;
  if (scale) {
    if (lean) {
      topk_one_pass_f32<true, true>(z, len, f, ref, j0, sk, bm, s);
    } else {
      topk_one_pass_f32<true, false>(z, len, f, ref, j0, sk, bm, s);
    }
  } else {
    if (lean) {
      topk_one_pass_f32<false, true>(z, len, f, ref, j0, sk, bm, s);
    } else {
      topk_one_pass_f32<false, false>(z, len, f, ref, j0, sk, bm, s);
    }
  }
  return true;
}
#endif

// Scans the logits z[0..len) of one row, whose first one has id j0, into the row's running state `st` (raw
// GEMM output in, transformed in place).  A row may be scanned in consecutive pieces (the tiled driver hands
// it one vocabulary tile at a time, while the tile is still in cache): the state carries the threshold, the
// candidates and the online (M, S) from one piece to the next, so the result does not depend on the split
// beyond the rounding of S.
template <typename T>
void topk_scan(TopkRow<T>& st, T* z, int64_t j0, int64_t len, int64_t k, const LogitParams& lp) {
  // Softcap: transformed up front (tanh per logit); otherwise the scale is fused into the block scan.
  T f = static_cast<T>(lp.logit_scale) * static_cast<T>(1.0 / lp.temperature);
  if (lp.softcap > 0) {
    transform_row(z, len, lp);
    f = T(1);
  }
  const bool scale = f != T(1);
  const int64_t hi = topk_cut_at(k);  // cut the buffer back to k at hi entries
  T* val = st.val;
  int64_t* id = st.id;
  int64_t n = st.n;
  T thr = st.thr, M = st.M, S = st.S;
  bool nan = st.nan, pinf = st.pinf, dense = st.dense;
  for (int64_t b0 = 0; b0 < len; b0 += TOPK_BLOCK) {
    const int64_t b1 = b0 + TOPK_BLOCK < len ? b0 + TOPK_BLOCK : len;
    {
      // A whole row usually comes from memory or L3 (the GEMM wrote a whole chunk); a block spans whole pages,
      // where the hardware's stream prefetch stops, so ask for the block after next explicitly.
      const int64_t p0 = b0 + 2 * TOPK_BLOCK, p1 = p0 + TOPK_BLOCK < len ? p0 + TOPK_BLOCK : len;
      for (int64_t j = p0; j < p1; j += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(z + j, 0, 3);
    }
    {
      // A row that has a finite maximum already (not its first block; k = 1 needs bm before its compare).
      TopkSink<T> sk{val, id, n, hi, k, thr, dense};
      T bm = 0, s = 0;
      if (k > 1 && M != neg_inf<T>() && topk_one_pass(z + b0, b1 - b0, f, scale, M, j0 + b0, sk, bm, s)) {
        n = sk.n;
        thr = sk.thr;
        dense = sk.passed * 8 > b1 - b0;
        if (bm == neg_inf<T>() || bm == std::numeric_limits<T>::infinity()) {
          pinf |= bm > T(0);
          nan |= any_nan(z + b0, b1 - b0);
        } else if (bm > M + T(60)) {
          const T sb = block_sumexp(z + b0, b1 - b0, bm);
          S = S * std::exp(M - bm) + sb;
          M = bm;
        } else {
          S += s;
          if (bm > M) {
            S *= std::exp(M - bm);
            M = bm;
          }
        }
        continue;
      }
    }
    T grp[TOPK_GROUPS + 16];  // + 16: select_desc's full-vector stores
    const T bm = scale ? block_max<T, true>(z + b0, b1 - b0, f, grp) : block_max<T, false>(z + b0, b1 - b0, f, grp);
    // k = 1: the block's maximum is its best logit, so only logits equal to it can enter.
    if (k == 1 && bm > thr) thr = std::nextafter(bm, neg_inf<T>());
    // A row's first block (nothing cut yet): the k-th best of the block's group maxima is k distinct logits'
    // lower bound, so no logit below it can be among the row's k best; those equal to it must still enter
    // (the ties' lowest ids), hence the next value down.  Otherwise every logit of the block would be appended.
    if (k > 1 && k <= TOPK_GROUPS && thr == neg_inf<T>() && bm > thr) {
      const T g = select_desc(grp, TOPK_GROUPS, k - 1);
      if (g > thr) thr = std::nextafter(g, neg_inf<T>());
    }
    const bool select = bm > thr;
    const bool finite = bm != neg_inf<T>() && bm != std::numeric_limits<T>::infinity();
    TopkSink<T> sk{val, id, n, hi, k, thr, dense};
    // Block sum relative to its own maximum.  The max does not see NaN (it compares false): a NaN
    // propagates through the exponentials when the block has a finite maximum and is looked for otherwise.
    T s = 0;
    if (select && finite) {
      s = topk_select_sumexp(z + b0, b1 - b0, bm, j0 + b0, sk);
    } else if (select) {
      topk_select(z + b0, b1 - b0, j0 + b0, sk);
    } else if (finite) {
      s = block_sumexp(z + b0, b1 - b0, bm);
    }
    n = sk.n;
    thr = sk.thr;
    dense = select && sk.passed * 8 > b1 - b0;
    if (!finite) {
      pinf |= bm > T(0);
      nan |= any_nan(z + b0, b1 - b0);
      continue;
    }
    if (bm > M) {
      S = S * std::exp(M - bm) + s;
      M = bm;
    } else {
      S += s * std::exp(bm - M);
    }
  }
  st.n = n;
  st.thr = thr;
  st.M = M;
  st.S = S;
  st.nan = nan;
  st.pinf = pinf;
  st.dense = dense;
}

// After the last piece of a row: its LSE, and its (at most k) candidates cut to the k best and written in order
// to out_ids / out_lp (as log-probs).  Returns how many were written: fewer than k only when the row has fewer
// than k logits above -inf, which needs the whole row (topk_complete).
template <typename T>
int64_t topk_end(TopkRow<T>& st, int64_t k, int64_t* out_ids, T* out_lp, T* out_lse) {
  TopkScratch<T>& sc = topk_scratch<T>();
  sc.reserve(topk_cut_at(k) + 16);
  T* val = st.val;
  int64_t* id = st.id;
  int64_t n = st.n;
  T lse;
  if (st.nan || st.S != st.S) {
    lse = std::numeric_limits<T>::quiet_NaN();
  } else if (st.pinf) {
    lse = std::numeric_limits<T>::infinity();  // as logsumexp: +inf wins over any finite logit
  } else {
    lse = st.M == neg_inf<T>() ? st.M : st.M + flog(st.S);
  }
  if (n > k) {
    topk_cut(val, id, sc.tmp, n, k);
    n = k;
  }
  // Descending order of the (at most k) candidates, ties by id (= by position: the buffer is in id order).
  // Up to 128 candidates: each one's rank is counted with vector compares (no data-dependent branch);
  // beyond, a stable radix sort.
  if (n <= 128) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = val[i];
      int32_t r = 0;  // entries before i in the order: greater ones, and equal ones with a lower id
#pragma omp simd reduction(+ : r)
      for (int64_t j = 0; j < i; ++j) r += val[j] >= v;
#pragma omp simd reduction(+ : r)
      for (int64_t j = i + 1; j < n; ++j) r += val[j] > v;
      out_ids[r] = id[i];
      out_lp[r] = v - lse;
    }
  } else {
    TopkEntry<T>* ent = sc.ent;
    for (int64_t i = 0; i < n; ++i) ent[i] = TopkEntry<T>{val[i], id[i]};
    ent = radix_sort_desc(ent, sc.ent2, n);
    for (int64_t i = 0; i < n; ++i) {
      out_ids[i] = ent[i].id;
      out_lp[i] = ent[i].v - lse;
    }
  }
  *out_lse = lse;
  return n;
}

// A row with only n < k logits above -inf (all of them written by topk_end): completed in id order with its
// -inf ids, then its NaN ids, from the whole transformed row z[0..V).
template <typename T>
void topk_complete(const T* z, int64_t V, int64_t k, int64_t n, T lse, int64_t* out_ids, T* out_lp) {
  for (int64_t j = 0; j < V && n < k; ++j) {
    if (z[j] == neg_inf<T>()) {
      out_ids[n] = j;
      out_lp[n++] = z[j] - lse;
    }
  }
  for (int64_t j = 0; j < V && n < k; ++j) {
    if (z[j] != z[j]) {
      out_ids[n] = j;
      out_lp[n++] = z[j] - lse;
    }
  }
}

// A whole row at once: its scan, the end and the completion.
template <typename T>
void topk_row(T* z, int64_t V, int64_t k, const LogitParams& lp, int64_t* out_ids, T* out_lp, T* out_lse) {
  TopkScratch<T>& sc = topk_scratch<T>();
  sc.reserve(topk_row_buffer(k));  // the row's candidates live in this thread's scratch (reserved first)
  TopkRow<T> st;
  topk_row_init(st, k, sc.val, sc.id);
  topk_scan(st, z, 0, V, k, lp);
  const int64_t n = topk_end(st, k, out_ids, out_lp, out_lse);
  if (n < k) topk_complete(z, V, k, n, *out_lse, out_ids, out_lp);
}

// ------------------------------------------------------------------------------ divergence

// Per-thread scratch of the row kernels: grows to the largest request and is freed when the thread exits.  A
// plain struct of this file's anonymous namespace (internal linkage, no template the linker could share
// between the ISA variants).
struct ThreadScratch {
  void* p = nullptr;
  size_t bytes = 0;
  ~ThreadScratch() { std::free(p); }
};

template <typename T>
T* thread_scratch(int64_t n) {
  static thread_local ThreadScratch buf;
  const size_t want = (sizeof(T) * static_cast<size_t>(n) + 63) / 64 * 64;
  if (buf.bytes < want) {
    std::free(buf.p);
    buf.p = std::aligned_alloc(64, want);
    buf.bytes = buf.p ? want : 0;
    if (!buf.p) {  // inside a parallel region: no exception can leave it
      std::fprintf(stderr, "copsd: out of memory for a %zu-byte row scratch\n", want);
      std::abort();
    }
  }
  return static_cast<T*>(buf.p);
}

// The linear part of the logit transform (scale / temperature), computed as transform_row does.
template <typename T>
inline T linear_factor(const LogitParams& lp) {
  return static_cast<T>(lp.logit_scale) * static_cast<T>(1.0 / lp.temperature);
}

// Maxima of one block of both rows; when f != 1 the rows are first scaled by f in place (the logit transform,
// fused into the first pass over the raw GEMM output).
template <typename T>
inline void block_max2(T* a, T* b, int64_t n, T f, T& ma, T& mb) {
  T x = neg_inf<T>(), y = neg_inf<T>();
  if (f != T(1)) {
#pragma omp simd reduction(max : x, y)
    for (int64_t j = 0; j < n; ++j) {
      const T u = a[j] * f, v = b[j] * f;
      a[j] = u;
      b[j] = v;
      x = u > x ? u : x;
      y = v > y ? v : y;
    }
  } else {
#pragma omp simd reduction(max : x, y)
    for (int64_t j = 0; j < n; ++j) {
      x = a[j] > x ? a[j] : x;
      y = b[j] > y ? b[j] : y;
    }
  }
  ma = x;
  mb = y;
}

// Raises a running maximum m to a block maximum bm when larger (a NaN never raises it).  Returns e^{m_old-m_new},
// the factor of sums kept relative to m (1 when unchanged, 0 from -inf), and the shift m_new - m_old.
template <typename T>
inline T raise_max(T& m, T bm, T& shift) {
  if (!(bm > m)) {
    shift = 0;
    return T(1);
  }
  const T old = m;
  m = bm;
  shift = bm - old;
  return fexp(old - bm);
}

// The maximum exponentials are taken relative to: -inf (only -inf or NaN seen so far) counts as 0, so those
// entries give e^-inf = 0 (or NaN) instead of e^{-inf+inf}.
template <typename T>
inline T finite_or_zero(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// Entries of a block per software-prefetch step of online_row's first pass.
constexpr int64_t PREFETCH_SUB = 256;

// Prefetch entries [j0, j1) (clipped to n) of two rows, one cache line at a time.
template <typename T>
inline void prefetch_rows(const T* a, const T* b, int64_t j0, int64_t j1, int64_t n) {
  const int64_t end = j1 < n ? j1 : n;
  for (int64_t j = j0; j < end; j += 64 / static_cast<int64_t>(sizeof(T))) {
    __builtin_prefetch(a + j, 0, 3);
    __builtin_prefetch(b + j, 0, 3);
  }
}

// Full support, no clip, no softcap: "online" kernels.  Each reads the two raw GEMM rows from memory once, in
// SUM_BLOCK-entry blocks: per block the two block maxima (with the linear logit transform applied in place),
// then the exponentials relative to the running maxima ms / mt, with the sums accumulated so far rescaled
// whenever a maximum grows (the running maxima at each block are kept in `bm`, so later passes rescale each
// block's stored exponentials by one factor).  Sums are two-level (vector partial sums per block, added into
// the totals), so fp32 rounding does not depend on V or on the ISA's lane count.  Transcendentals per
// vocabulary entry: 2 exp (reverse / forward KL), 2 exp + 1 log (JSD); the gradient pass has none.
//
// Notation: ds_j = zs_j - ms, dt_j = zt_j - mt, es_j = e^ds_j, et_j = e^dt_j, S_s = sum es, S_t = sum et,
// W = sum es ds (student entropy H = log S_s - W/S_s, only with STATS).  When ms grows by a shift h, every
// stored es is scaled by e^-h and every ds decreases by h: a sum like A = sum es (ds - dt) becomes
// e^-h (A - (h_s - h_t) S_s) (same for the teacher side).
//
// Reverse KL:  A = sum es (ds - dt),  KL = A/S_s - log S_s + log S_t,
//              dKL/dzs_j = (es_j/S_s) (d_j - A/S_s)  with d_j = ds_j - dt_j (stored next to es_j).
// Forward KL:  B = sum et (dt - ds),  KL(p||q) = B/S_t - log S_t + log S_s,
//              dKL/dzs_j = es_j/S_s - et_j/S_t: from the two exponentials and the two sums, with no log S rounding
//              and no computed sum of p (exactly 1) in it, so at a 150k vocabulary d_hidden is as accurate as
//              the dense log_softmax + autograd form.
// JSD (beta):  q_j = es_j/S_s, p_j = et_j/S_t, lm_j = log((1-b) q_j + b p_j) (one vectorised log per entry;
//              a tiny constant keeps it finite where q and p both underflow, their terms are then 0 x finite),
//              s_j = b p_j (lt_j - lm_j) + (1-b) q_j (ls_j - lm_j),  g_j = (1-b) q_j (ls_j - lm_j),
//              dJSD/dzs_j = g_j - q_j G,  G = sum g.  es and et go to a per-thread scratch of 2 rows (the rows
//              keep the logits for ls / lt), so the terms pass needs no exponential.
template <typename T, int KIND, bool STATS>
T online_row(T* zs, T* zt, int64_t V, T tg, bool grad, const LogitParams& lp, T beta, int64_t sid, T* stats) {
  const int64_t nb = (V + SUM_BLOCK - 1) / SUM_BLOCK;
  T* buf = thread_scratch<T>(2 * nb + 2 * V);
  T* bm = buf;               // [2 nb]: running (ms, mt) at each block
  T* u_all = buf + 2 * nb;   // [V] es, then [V] d (reverse KL) / et (forward KL, JSD; JSD: later g)
  T* v_all = u_all + V;
  const T f = linear_factor<T>(lp);
  const T zsid = STATS ? zs[sid] * f : T(0);  // the transformed logits of sid (y * 1 == y)
  const T ztid = STATS ? zt[sid] * f : T(0);
  T ms = neg_inf<T>(), mt = neg_inf<T>();
  T Ss = 0, St = 0, X = 0, W = 0;  // X: A (reverse KL) / B (forward KL)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t b0 = b * SUM_BLOCK, n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
    T* s = zs + b0;
    T* t = zt + b0;
    T bs, bt, hs, ht;
    block_max2(s, t, n, f, bs, bt);
    const T rs = raise_max(ms, bs, hs), rt = raise_max(mt, bt, ht);
    // Only sums that hold something are corrected (an empty one stays 0: no inf x 0).
    if (KIND == KIND_REVERSE_KL && Ss > 0) X = rs * (X - (hs - ht) * Ss);
    if (KIND == KIND_FORWARD_KL && St > 0) X = rt * (X - (ht - hs) * St);
    if (STATS && Ss > 0) W = rs * (W - hs * Ss);
    Ss *= rs;
    St *= rt;
    bm[2 * b] = ms;
    bm[2 * b + 1] = mt;
    const T ms0 = finite_or_zero(ms), mt0 = finite_or_zero(mt);
    T* u = u_all + b0;
    T* v = v_all + b0;
    T s1 = 0, s2 = 0, x = 0, w = 0;
    // The rows come from memory (the GEMM wrote them a while ago): while a sub-block computes, the matching part
    // of the next block is asked for, so the loads overlap the exponentials (measured: prefetching the whole
    // next block at once, or not at all, leaves the pass waiting on the loads).
    for (int64_t sb = 0; sb < n; sb += PREFETCH_SUB) {
      const int64_t e = sb + PREFETCH_SUB < n ? sb + PREFETCH_SUB : n;
      prefetch_rows(s, t, SUM_BLOCK + sb, SUM_BLOCK + e, V - b0);
      if (KIND == KIND_REVERSE_KL) {
        if (grad) {
#pragma omp simd reduction(+ : s1, s2, x, w)
          for (int64_t j = sb; j < e; ++j) {
            const T ds = s[j] - ms0, dt = t[j] - mt0;
            const T es = fexp0(ds), d = ds - dt;
            s1 += es;
            s2 += fexp0(dt);
            x += es * d;
            if (STATS) w += es * ds;
            u[j] = es;
            v[j] = d;
          }
        } else {
#pragma omp simd reduction(+ : s1, s2, x, w)
          for (int64_t j = sb; j < e; ++j) {
            const T ds = s[j] - ms0, dt = t[j] - mt0;
            const T es = fexp0(ds);
            s1 += es;
            s2 += fexp0(dt);
            x += es * (ds - dt);
            if (STATS) w += es * ds;
          }
        }
      } else if (KIND == KIND_FORWARD_KL) {
        if (grad) {
#pragma omp simd reduction(+ : s1, s2, x, w)
          for (int64_t j = sb; j < e; ++j) {
            const T ds = s[j] - ms0, dt = t[j] - mt0;
            const T es = fexp0(ds), et = fexp0(dt);
            s1 += es;
            s2 += et;
            x += et * (dt - ds);
            if (STATS) w += es * ds;
            u[j] = es;
            v[j] = et;
          }
        } else {
#pragma omp simd reduction(+ : s1, s2, x, w)
          for (int64_t j = sb; j < e; ++j) {
            const T ds = s[j] - ms0, dt = t[j] - mt0;
            const T es = fexp0(ds), et = fexp0(dt);
            s1 += es;
            s2 += et;
            x += et * (dt - ds);
            if (STATS) w += es * ds;
          }
        }
      } else {
#pragma omp simd reduction(+ : s1, s2, w)
        for (int64_t j = sb; j < e; ++j) {
          const T ds = s[j] - ms0, dt = t[j] - mt0;
          const T es = fexp0(ds), et = fexp0(dt);
          s1 += es;
          s2 += et;
          if (STATS) w += es * ds;
          u[j] = es;
          v[j] = et;
        }
      }
    }
    Ss += s1;
    St += s2;
    X += x;
    W += w;
  }
  const T log_ss = flog(Ss), log_st = flog(St);
  const T inv_ss = T(1) / Ss, inv_st = T(1) / St;
  if (STATS) {
    stats[0] = (zsid - ms) - log_ss;
    stats[1] = log_ss - W * inv_ss;
    stats[2] = (ztid - mt) - log_st;
  }
  const T base = static_cast<T>(lp.logit_scale / lp.temperature);  // d z / d y (as Chain)
  if (KIND == KIND_REVERSE_KL) {
    const T loss = X * inv_ss - log_ss + log_st;
    if (grad) {
      const T c1 = inv_ss * tg * base, c2 = X * inv_ss;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t b0 = b * SUM_BLOCK, n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
        // This block's es / d are relative to the running maxima then: rescale to the final ones.
        const T c1b = c1 * fexp(bm[2 * b] - ms);
        const T c2b = c2 + ((ms - bm[2 * b]) - (mt - bm[2 * b + 1]));
        T* s = zs + b0;
        const T* u = u_all + b0;
        const T* v = v_all + b0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) s[j] = u[j] * c1b * (v[j] - c2b);
      }
    }
    return loss;
  }
  if (KIND == KIND_FORWARD_KL) {
    const T loss = X * inv_st - log_st + log_ss;
    if (grad) {
      const T c = tg * base;
      const T cs = c / Ss, ct = c / St;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t b0 = b * SUM_BLOCK, n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
        const T csb = cs * fexp(bm[2 * b] - ms), ctb = ct * fexp(bm[2 * b + 1] - mt);
        T* s = zs + b0;
        const T* u = u_all + b0;
        const T* v = v_all + b0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) s[j] = u[j] * csb - v[j] * ctb;
      }
    }
    return loss;
  }
  // JSD: the terms pass (one log per entry), then the gradient.
  const T bb = beta, omb = T(1) - beta;
  const T tiny = static_cast<T>(1e-37);
  T loss = 0, G = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t b0 = b * SUM_BLOCK, n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
    const T cq = fexp(bm[2 * b] - ms) * inv_ss, cp = fexp(bm[2 * b + 1] - mt) * inv_st;
    const T* s = zs + b0;
    const T* t = zt + b0;
    const T* u = u_all + b0;
    T* v = v_all + b0;
    T pl = 0, pg = 0;
    if (grad) {
#pragma omp simd reduction(+ : pl, pg)
      for (int64_t j = 0; j < n; ++j) {
        const T q = u[j] * cq, p = v[j] * cp;
        const T lm = vlog_normal(omb * q + bb * p + tiny);  // >= tiny; not finite only where q or p is not
        const T gq = omb * q * (((s[j] - ms) - log_ss) - lm);
        pl += bb * p * (((t[j] - mt) - log_st) - lm) + gq;
        pg += gq;
        v[j] = gq;
      }
    } else {
#pragma omp simd reduction(+ : pl)
      for (int64_t j = 0; j < n; ++j) {
        const T q = u[j] * cq, p = v[j] * cp;
        const T lm = vlog_normal(omb * q + bb * p + tiny);
        pl += bb * p * (((t[j] - mt) - log_st) - lm) + omb * q * (((s[j] - ms) - log_ss) - lm);
      }
    }
    loss += pl;
    G += pg;
  }
  if (grad) {
    const T c = tg * base;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t b0 = b * SUM_BLOCK, n = SUM_BLOCK < V - b0 ? SUM_BLOCK : V - b0;
      const T cqG = fexp(bm[2 * b] - ms) * inv_ss * G;
      T* s = zs + b0;
      const T* u = u_all + b0;
      const T* v = v_all + b0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] = (v[j] - u[j] * cqG) * c;
    }
  }
  return loss;
}

// Token statistics of a row pair already transformed (the generic and top-k paths): student log-prob of sid and
// entropy, teacher log-prob of sid (two more passes over the rows, only when asked for).
template <typename T>
void row_stats(const T* zs, const T* zt, int64_t V, int64_t sid, T* stats) {
  T ms, mt;
  row_max2(zs, zt, V, ms, mt);
  const T ms0 = finite_or_zero(ms), mt0 = finite_or_zero(mt);
  T Ss = 0, St = 0, W = 0;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
    T s1 = 0, s2 = 0, w = 0;
#pragma omp simd reduction(+ : s1, s2, w)
    for (int64_t j = b0; j < b1; ++j) {
      const T ds = zs[j] - ms0;
      const T es = fexp0(ds);
      s1 += es;
      w += es * ds;
      s2 += fexp0(zt[j] - mt0);
    }
    Ss += s1;
    St += s2;
    W += w;
  }
  const T log_ss = flog(Ss), log_st = flog(St);
  stats[0] = (zs[sid] - ms0) - log_ss;
  stats[1] = log_ss - W / Ss;
  stats[2] = (zt[sid] - mt0) - log_st;
}

// Full support, any kind / clip / softcap.
template <typename T, int KIND>
T generic_full_row(T* zs, T* zt, int64_t V, T tg, bool grad, const LogitParams& lp, const DivParams& dp,
                   int64_t sid, T* stats) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
  if (stats) row_stats(zs, zt, V, sid, stats);
  T ms, mt;
  row_max2(zs, zt, V, ms, mt);
  T Ss = 0, St = 0;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
    T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = b0; j < b1; ++j) {
      s1 += fexp(zs[j] - ms);
      s2 += fexp(zt[j] - mt);
    }
    Ss += s1;
    St += s2;
  }
  // ls = (zs - ms) - log S_s: relative to the max so large logits do not cancel.
  const T log_ss = flog(Ss), log_st = flog(St);
  const T beta = static_cast<T>(dp.beta);
  const T log_b = KIND == KIND_JSD ? static_cast<T>(std::log(dp.beta)) : T(0);
  const T log_1mb = KIND == KIND_JSD ? static_cast<T>(std::log1p(-dp.beta)) : T(0);
  const T clip = static_cast<T>(dp.clip);
  const bool has_clip = dp.has_clip;
  T loss = 0, G = 0;
  if (grad) {
    for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
      const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
      T pl = 0, pg = 0;
#pragma omp simd reduction(+ : pl, pg)
      for (int64_t j = b0; j < b1; ++j) {
        T s, g;
        clipped<T, KIND>((zs[j] - ms) - log_ss, (zt[j] - mt) - log_st, has_clip, beta, log_b, log_1mb,
                         clip, s, g);
        pl += s;
        pg += g;
        zt[j] = g;
      }
      loss += pl;
      G += pg;
    }
    const Chain<T> chain(lp);
    const T tgG = G;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T zj = zs[j];
      zs[j] = (zt[j] - fexp((zj - ms) - log_ss) * tgG) * tg * chain(zj);
    }
  } else {
    for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
      const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
      T pl = 0;
#pragma omp simd reduction(+ : pl)
      for (int64_t j = b0; j < b1; ++j) {
        T s, g;
        clipped<T, KIND>((zs[j] - ms) - log_ss, (zt[j] - mt) - log_st, has_clip, beta, log_b, log_1mb,
                         clip, s, g);
        pl += s;
      }
      loss += pl;
    }
  }
  return loss;
}

// Log-sum-exps of two rows (-inf for an all -inf row, NaN where a row holds NaN) in one pass over both: per
// SUM_BLOCK block the two maxima, then the block's exponentials relative to the running maxima (sums kept so far
// rescaled when a maximum grows), so each row is read from memory once instead of twice.
template <typename T>
void row_lse2(const T* a, const T* b, int64_t n, T& la, T& lb) {
  T ma = neg_inf<T>(), mb = neg_inf<T>(), sa = 0, sb = 0;
  for (int64_t b0 = 0; b0 < n; b0 += SUM_BLOCK) {
    const int64_t m = SUM_BLOCK < n - b0 ? SUM_BLOCK : n - b0;
    const T* x = a + b0;
    const T* y = b + b0;
    prefetch_rows(x, y, SUM_BLOCK, 2 * SUM_BLOCK, n - b0);
    T xa, xb, h;
    row_max2(x, y, m, xa, xb);
    sa *= raise_max(ma, xa, h);
    sb *= raise_max(mb, xb, h);
    const T a0 = finite_or_zero(ma), b0m = finite_or_zero(mb);
    T pa = 0, pb = 0;
#pragma omp simd reduction(+ : pa, pb)
    for (int64_t j = 0; j < m; ++j) {
      pa += fexp0(x[j] - a0);
      pb += fexp0(y[j] - b0m);
    }
    sa += pa;
    sb += pb;
  }
  la = n == 0 || ma == neg_inf<T>() ? neg_inf<T>() : ma + flog(sa);
  lb = n == 0 || mb == neg_inf<T>() ? neg_inf<T>() : mb + flog(sb);
}

// Teacher-top-k support.  `scratch` holds 3k values.  The K entries are taken out of the
// rows (set to -inf) so the tail log-sum-exp is computed directly over V \ K.  With `sel` (then K == sel), the
// row's teacher top-k is selected here first, from the transformed teacher row the divergence holds anyway, and
// written to sel[0..k) -- the same selection (topk_row, descending, ties to the lowest id) the top-k op makes, but
// without that op's own pass over the teacher's lm_head.
template <typename T, int KIND>
T topk_support_row(T* zs, T* zt, int64_t V, const int64_t* K, int64_t k, T tg, bool grad,
                   const LogitParams& lp, const DivParams& dp, T* scratch, int64_t sid, T* stats, int64_t* sel) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
  if (sel) {
    T lse_t;  // topk_row's by-products (the selected log-probs go to scratch, overwritten below) are not needed
    topk_row(zt, V, k, LogitParams{}, sel, scratch, &lse_t);  // zt is transformed already: identity transform
    K = sel;
  }
  if (stats) row_stats(zs, zt, V, sid, stats);
  T* zsK = scratch;
  T* ztK = scratch + k;
  T* gK = scratch + 2 * k;
  for (int64_t i = 0; i < k; ++i) {
    zsK[i] = zs[K[i]];
    ztK[i] = zt[K[i]];
    zs[K[i]] = neg_inf<T>();
    zt[K[i]] = neg_inf<T>();
  }
  const bool has_tail = k < V;
  const T lseK_s = small_lse(zsK, k), lseK_t = small_lse(ztK, k);
  T Ls, Lt, tail_s = neg_inf<T>(), tail_t = neg_inf<T>();
  if (dp.tail == TAIL_RENORM) {
    Ls = lseK_s;
    Lt = lseK_t;
  } else {
    if (has_tail) row_lse2(zs, zt, V, tail_s, tail_t);
    auto lae = [](T a, T b) {
      if (b == neg_inf<T>()) return a;
      const T mx = a > b ? a : b, mn = a > b ? b : a;
      return mx + std::log1p(fexp(mn - mx));
    };
    Ls = lae(lseK_s, tail_s);
    Lt = lae(lseK_t, tail_t);
  }
  const T beta = static_cast<T>(dp.beta);
  const T log_b = KIND == KIND_JSD ? static_cast<T>(std::log(dp.beta)) : T(0);
  const T log_1mb = KIND == KIND_JSD ? static_cast<T>(std::log1p(-dp.beta)) : T(0);
  const T clip = static_cast<T>(dp.clip);
  const bool has_clip = dp.has_clip;
  T loss = 0, G = 0;
  for (int64_t i = 0; i < k; ++i) {
    T s, g;
    clipped<T, KIND>(zsK[i] - Ls, ztK[i] - Lt, has_clip, beta, log_b, log_1mb, clip, s, g);
    loss += s;
    G += g;
    gK[i] = g;
  }
  T g_tail = 0;
  const bool bucket = dp.tail == TAIL_BUCKET && has_tail;
  if (bucket) {
    T s;
    clipped<T, KIND>(tail_s - Ls, tail_t - Lt, has_clip, beta, log_b, log_1mb, clip, s, g_tail);
    loss += s;
    G += g_tail;
  }
  if (!grad) return loss;

  const Chain<T> chain(lp);
  // Off K (entries of K hold -inf here and are overwritten below).
  if (dp.tail == TAIL_RENORM) {
    std::memset(zs, 0, sizeof(T) * V);
  } else if (bucket) {
    // dz_j = e^{ls_j - ls_tail} g_tail - q_j G = e^{z_j - tail_s} (g_tail - e^{tail_s - Ls} G): one exponential
    // per entry (q_j = e^{z_j - tail_s} e^{tail_s - Ls}); the exponent is <= 0 off K.
    const T c_tail = g_tail * tg, c_q = fexp(tail_s - Ls) * G * tg;
    if (lp.softcap > 0) {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const T zj = zs[j];
        zs[j] = fexp(zj - tail_s) * (c_tail - c_q) * chain(zj);
      }
    } else {
      const T f = chain.base;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) zs[j] = fexp(zs[j] - tail_s) * ((c_tail - c_q) * f);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T zj = zs[j];
      zs[j] = -fexp(zj - Ls) * G * tg * chain(zj);
    }
  }
  for (int64_t i = 0; i < k; ++i) zs[K[i]] = (gK[i] - fexp(zsK[i] - Ls) * G) * tg * chain(zsK[i]);
  return loss;
}

template <typename T, int KIND>
T div_row_kind(T* zs, T* zt, int64_t V, const int64_t* K, int64_t k, T tg, bool grad, const LogitParams& lp,
               const DivParams& dp, T* scratch, int64_t sid, T* stats) {
  if (dp.support == SUPPORT_TOPK)
    return topk_support_row<T, KIND>(zs, zt, V, K, k, tg, grad, lp, dp, scratch, sid, stats, nullptr);
  if (!dp.has_clip && !(lp.softcap > 0)) {
    const T beta = static_cast<T>(dp.beta);
    if (stats) return online_row<T, KIND, true>(zs, zt, V, tg, grad, lp, beta, sid, stats);
    return online_row<T, KIND, false>(zs, zt, V, tg, grad, lp, beta, sid, stats);
  }
  return generic_full_row<T, KIND>(zs, zt, V, tg, grad, lp, dp, sid, stats);
}

template <typename T>
T div_row(T* zs, T* zt, int64_t V, const int64_t* K, int64_t k, T tg, bool grad, const LogitParams& lp,
          const DivParams& dp, T* scratch, int64_t sid, T* stats) {
  switch (dp.kind) {
    case KIND_REVERSE_KL:
      return div_row_kind<T, KIND_REVERSE_KL>(zs, zt, V, K, k, tg, grad, lp, dp, scratch, sid, stats);
    case KIND_FORWARD_KL:
      return div_row_kind<T, KIND_FORWARD_KL>(zs, zt, V, K, k, tg, grad, lp, dp, scratch, sid, stats);
    default: return div_row_kind<T, KIND_JSD>(zs, zt, V, K, k, tg, grad, lp, dp, scratch, sid, stats);
  }
}

template <typename T>
T div_select_row(T* zs, T* zt, int64_t V, int64_t* sel, int64_t k, T tg, bool grad, const LogitParams& lp,
                 const DivParams& dp, T* scratch, int64_t sid, T* stats) {
  switch (dp.kind) {
    case KIND_REVERSE_KL:
      return topk_support_row<T, KIND_REVERSE_KL>(zs, zt, V, sel, k, tg, grad, lp, dp, scratch, sid, stats, sel);
    case KIND_FORWARD_KL:
      return topk_support_row<T, KIND_FORWARD_KL>(zs, zt, V, sel, k, tg, grad, lp, dp, scratch, sid, stats, sel);
    default: return topk_support_row<T, KIND_JSD>(zs, zt, V, sel, k, tg, grad, lp, dp, scratch, sid, stats, sel);
  }
}

template <typename T>
void exp_array(const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = fexp(x[i]);
}

template <typename T>
void log_array(const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = vlog(x[i]);
}

template <typename T>
void tanh_array(const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = vtanh(x[i]);
}

}  // namespace

// The exported table for this ISA.
template <typename T>
RowKernels<T> make_table() {
  RowKernels<T> t;
  t.logprob_bwd = &logprob_row_bwd<T>;
  t.logprob_stats = &logprob_row_stats<T>;
  t.logprob_grad = &logprob_row_grad<T>;
  t.logprob_scan = &logprob_scan<T>;
  t.logprob_end = &logprob_end<T>;
  t.topk = &topk_row<T>;
  t.topk_scan = &topk_scan<T>;
  t.topk_end = &topk_end<T>;
  t.div = &div_row<T>;
  t.div_select = &div_select_row<T>;
  t.exp = &exp_array<T>;
  t.log = &log_array<T>;
  t.tanh = &tanh_array<T>;
  return t;
}

const RowKernels<float>& kernels_f32() {
  static const RowKernels<float> t = make_table<float>();
  return t;
}
const RowKernels<double>& kernels_f64() {
  static const RowKernels<double> t = make_table<double>();
  return t;
}

}  // namespace COPSD_ISA
}  // namespace copsd_cpu
