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

// exp(x) in float, branch-free so loops over it vectorise at the full width of the ISA the file
// is compiled for (16 lanes with AVX-512, 8 with AVX2, 4 at the SSE baseline).  Cody-Waite
// reduction plus a degree-6 minimax polynomial: max relative error 8.4e-8 (< 1 ulp) against
// float64 exp over [-87.3, 88] (tests/test_cpu_kernels.py).  Edges: NaN propagates,
// x < -87.34 -> 0 (no denormals), x > 88 -> inf; callers pass x <= 0 (a logit minus a maximum)
// or tiny ranges.  double uses the C library's exp.
inline float fexp(float x) {
  const float hi = 88.0f, lo = -87.33654f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
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
  float out = p * scale;
  out = x < lo ? 0.0f : out;
  out = x > hi ? std::numeric_limits<float>::infinity() : out;
  return out;
}

inline double fexp(double x) { return std::exp(x); }

// exp(x) for x <= 0 or NaN (a logit minus a running maximum): fexp without its overflow edge, a shorter
// vectorised loop body with the same results (x < -87.34 -> 0, NaN propagates).
inline float fexp0(float x) {
  const float lo = -87.33654f;
  const bool under = x < lo;
  const float xc = under ? lo : x;
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
  const float out = p * scale;
  return under ? 0.0f : out;
}

inline double fexp0(double x) { return std::exp(x); }

// vlog: log(x) in float, branch-free like fexp (so the JSD's per-entry mixture log vectorises): x = 2^e m with
// m in [sqrt(1/2), sqrt(2)), log m from a degree-9 polynomial in f = m - 1 (the classic single-precision
// minimax fit), e ln 2 added in two parts.  Max relative error 1.2e-7 against float64 log over the
// normal floats (tests/test_cpu_kernels.py).  Edges: denormals are scaled up first, 0 -> -inf,
// x < 0 or NaN -> NaN, +inf -> +inf.
inline float vlog(float x) {
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
  const int32_t d = bits - 0x3f3504f3;  // bits of sqrt(1/2): m lands in [sqrt(1/2), sqrt(2))
  const int32_t e = d >> 23;
  const int32_t mb = (d & 0x007fffff) + 0x3f3504f3;
  float m;
  std::memcpy(&m, &mb, sizeof(m));
  const float fe = static_cast<float>(e - (tiny ? 23 : 0));
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
  float out = (f + y) + fe * 0.693359375f;
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
inline float vlog_normal(float x) {
  int32_t bx;
  std::memcpy(&bx, &x, sizeof(bx));
  const int32_t d = bx - 0x3f3504f3;
  const int32_t e = d >> 23;
  const int32_t mb = (d & 0x007fffff) + 0x3f3504f3;
  float m;
  std::memcpy(&m, &mb, sizeof(m));
  const float fe = static_cast<float>(e);
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
inline double vlog_normal(double x) { return std::log(x); }
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
    for (int64_t j = 0; j < n; ++j) z[j] = c_over_t * std::tanh(s_over_c * z[j]);
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

template <typename T, int KIND>
inline void clipped(T ls, T lt, const DivParams& dp, T beta, T log_b, T log_1mb, T clip, T& s, T& g) {
  summand<T, KIND>(ls, lt, beta, log_b, log_1mb, s, g);
  if (dp.has_clip && s > clip) {
    s = clip;
    g = T(0);
  }
}

// ------------------------------------------------------------------------------ log-probs

template <typename T>
void logprob_row_fwd(T* z, int64_t V, int64_t id, const LogitParams& lp, T* out_lp, T* out_ent, T* out_lse) {
  transform_row(z, V, lp);
  const T m = row_max(z, V);
  T s = 0, w = 0;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
    T ps = 0, pw = 0;
#pragma omp simd reduction(+ : ps, pw)
    for (int64_t j = b0; j < b1; ++j) {
      const T d = z[j] - m;
      const T e = fexp(d);
      ps += e;
      pw += e * d;
    }
    s += ps;
    w += pw;
  }
  const T log_s = flog(s);
  const T lse = m + log_s;
  *out_lse = lse;
  *out_ent = log_s - w / s;
  *out_lp = z[id] - lse;
}

// In place: y -> d(a*lp + b*H + c*lse)/dy.
template <typename T>
void logprob_row_bwd(T* z, int64_t V, int64_t id, T lse, T ent, T g_lp, T g_ent, T g_lse,
                     const LogitParams& lp, bool transformed) {
  if (!transformed) transform_row(z, V, lp);
  const Chain<T> chain(lp);
  const T z_id = z[id];
  const T a = g_lp - g_lse + g_ent * (ent - lse);  // dz_j = -q_j (a + g_ent z_j) off id
  if (lp.softcap > 0) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T zj = z[j];
      z[j] = -fexp(zj - lse) * (a + g_ent * zj) * chain(zj);
    }
  } else {
    const T f = chain.base;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T zj = z[j];
      z[j] = -fexp(zj - lse) * (a + g_ent * zj) * f;
    }
  }
  z[id] += g_lp * chain(z_id);
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
#endif

// Min-heap on (value, -index): the root is the current k-th best; ties prefer lower ids.
template <typename T>
inline bool worse(T va, int64_t ia, T vb, int64_t ib) {
  return va < vb || (va == vb && ia > ib);
}

template <typename T>
inline void sift_down(T* v, int64_t* id, int64_t k, int64_t i) {
  for (;;) {
    int64_t l = 2 * i + 1, r = l + 1, w = i;
    if (l < k && worse(v[l], id[l], v[w], id[w])) w = l;
    if (r < k && worse(v[r], id[r], v[w], id[w])) w = r;
    if (w == i) return;
    T tv = v[i]; v[i] = v[w]; v[w] = tv;
    int64_t ti = id[i]; id[i] = id[w]; id[w] = ti;
    i = w;
  }
}

template <typename T>
void topk_row(T* z, int64_t V, int64_t k, const LogitParams& lp, int64_t* out_ids, T* out_lp, T* out_lse) {
  transform_row(z, V, lp);
  // Heap lives in the output buffers.
  T* hv = out_lp;
  int64_t* hi = out_ids;
  for (int64_t i = 0; i < k; ++i) {
    hv[i] = z[i];
    hi[i] = i;
  }
  for (int64_t i = k / 2 - 1; i >= 0; --i) sift_down(hv, hi, k, i);
  T thr = hv[0];
  auto offer = [&](int64_t j) {
    // A NaN logit never enters (the LSE reports it instead).
    if (z[j] > thr) {
      hv[0] = z[j];
      hi[0] = j;
      sift_down(hv, hi, k, 0);
      thr = hv[0];
    }
  };
  // Threshold filter, 16 logits per vector compare: after the first blocks almost no logit
  // beats the running k-th best, so the scan runs at memory speed.
  int64_t j = k;
  for (; j + 16 <= V; j += 16) {
    uint32_t msk = gt_mask16(z + j, thr);
    while (msk) {
      offer(j + __builtin_ctz(msk));
      msk &= msk - 1;
    }
  }
  for (; j < V; ++j) offer(j);
  // Heap-sort into descending order: repeatedly move the root (worst) to the end.
  for (int64_t end = k - 1; end > 0; --end) {
    T tv = hv[0]; hv[0] = hv[end]; hv[end] = tv;
    int64_t ti = hi[0]; hi[0] = hi[end]; hi[end] = ti;
    sift_down(hv, hi, end, 0);
  }
  // The best candidate is the row maximum (NaN aside, which the sum below propagates).
  T m = hv[0];
  if (m != m) m = row_max(z, V);
  const T lse = m == neg_inf<T>() ? m : m + flog(row_sumexp(z, V, m));
  for (int64_t i = 0; i < k; ++i) hv[i] -= lse;
  *out_lse = lse;
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
    // The rows come from memory (the GEMM wrote them a while ago): ask for the next block while this one
    // computes (measured: the first pass is otherwise bound by waiting for the loads).
    for (int64_t j = SUM_BLOCK; j < 2 * SUM_BLOCK && b0 + j < V; j += 64 / static_cast<int64_t>(sizeof(T))) {
      __builtin_prefetch(s + j, 0, 3);
      __builtin_prefetch(t + j, 0, 3);
    }
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
    if (KIND == KIND_REVERSE_KL) {
      if (grad) {
#pragma omp simd reduction(+ : s1, s2, x, w)
        for (int64_t j = 0; j < n; ++j) {
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
        for (int64_t j = 0; j < n; ++j) {
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
        for (int64_t j = 0; j < n; ++j) {
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
        for (int64_t j = 0; j < n; ++j) {
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
      for (int64_t j = 0; j < n; ++j) {
        const T ds = s[j] - ms0, dt = t[j] - mt0;
        const T es = fexp0(ds), et = fexp0(dt);
        s1 += es;
        s2 += et;
        if (STATS) w += es * ds;
        u[j] = es;
        v[j] = et;
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
  T loss = 0, G = 0;
  if (grad) {
    for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
      const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
      T pl = 0, pg = 0;
#pragma omp simd reduction(+ : pl, pg)
      for (int64_t j = b0; j < b1; ++j) {
        T s, g;
        clipped<T, KIND>((zs[j] - ms) - log_ss, (zt[j] - mt) - log_st, dp, beta, log_b, log_1mb,
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
        clipped<T, KIND>((zs[j] - ms) - log_ss, (zt[j] - mt) - log_st, dp, beta, log_b, log_1mb,
                         clip, s, g);
        pl += s;
      }
      loss += pl;
    }
  }
  return loss;
}

// Teacher-top-k support.  `scratch` holds 3k values.  The K entries are taken out of the
// rows (set to -inf) so the tail log-sum-exp is computed directly over V \ K.
template <typename T, int KIND>
T topk_support_row(T* zs, T* zt, int64_t V, const int64_t* K, int64_t k, T tg, bool grad,
                   const LogitParams& lp, const DivParams& dp, T* scratch, int64_t sid, T* stats) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
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
    if (has_tail) {
      tail_s = row_lse(zs, V);
      tail_t = row_lse(zt, V);
    }
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
  T loss = 0, G = 0;
  for (int64_t i = 0; i < k; ++i) {
    T s, g;
    clipped<T, KIND>(zsK[i] - Ls, ztK[i] - Lt, dp, beta, log_b, log_1mb, clip, s, g);
    loss += s;
    G += g;
    gK[i] = g;
  }
  T g_tail = 0;
  const bool bucket = dp.tail == TAIL_BUCKET && has_tail;
  if (bucket) {
    T s;
    clipped<T, KIND>(tail_s - Ls, tail_t - Lt, dp, beta, log_b, log_1mb, clip, s, g_tail);
    loss += s;
    G += g_tail;
  }
  if (!grad) return loss;

  const Chain<T> chain(lp);
  // Off K (entries of K hold -inf here and are overwritten below).
  if (dp.tail == TAIL_RENORM) {
    std::memset(zs, 0, sizeof(T) * V);
  } else if (bucket) {
    // dz_j = e^{ls_j - ls_tail} g_tail - q_j G; both exponents are <= 0 off K.
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const T zj = zs[j];
      zs[j] = (fexp(zj - tail_s) * g_tail - fexp(zj - Ls) * G) * tg * chain(zj);
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
    return topk_support_row<T, KIND>(zs, zt, V, K, k, tg, grad, lp, dp, scratch, sid, stats);
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
void exp_array(const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = fexp(x[i]);
}

template <typename T>
void log_array(const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = vlog(x[i]);
}

}  // namespace

// The exported table for this ISA.
template <typename T>
RowKernels<T> make_table() {
  RowKernels<T> t;
  t.logprob_fwd = &logprob_row_fwd<T>;
  t.logprob_bwd = &logprob_row_bwd<T>;
  t.topk = &topk_row<T>;
  t.div = &div_row<T>;
  t.exp = &exp_array<T>;
  t.log = &log_array<T>;
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
