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
// Per-row logs (a handful per row) keep the C library's correctly rounded log.
inline float flog(float x) { return std::log(x); }
inline double flog(double x) { return std::log(x); }

template <typename T>
inline T neg_inf() { return -std::numeric_limits<T>::infinity(); }

constexpr int64_t SUM_BLOCK = 512;  // vocabulary entries per partial sum (see rkl_full_row)

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

// Full support, reverse KL, no clip, no softcap: the one-pass form of docs/kernels.md,
//   A = sum e^{zs-ms}((zs-ms)-(zt-mt)),  KL = A/S_s - log S_s + log S_t,
//   dKL/dzs_j = q_j (ls_j - lt_j - KL) = (e_j/S_s) (d_j - A/S_s)   with d_j = (zs-ms)-(zt-mt).
// Two exponentials per vocabulary entry, none in the gradient pass.
template <typename T>
T rkl_full_row(T* zs, T* zt, int64_t V, T tg, bool grad, const LogitParams& lp) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
  T ms, mt;
  row_max2(zs, zt, V, ms, mt);
  T Ss = 0, St = 0, A = 0;
  // Two-level sums (vector partial sums per SUM_BLOCK entries, added into the totals) keep fp32
  // rounding independent of V and of the ISA's lane count.
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
    T s1 = 0, s2 = 0, a = 0;
    if (grad) {
#pragma omp simd reduction(+ : s1, s2, a)
      for (int64_t j = b0; j < b1; ++j) {
        const T ds = zs[j] - ms, dt = zt[j] - mt;
        const T es = fexp(ds);
        const T d = ds - dt;
        s1 += es;
        s2 += fexp(dt);
        a += es * d;
        zs[j] = es;
        zt[j] = d;
      }
    } else {
#pragma omp simd reduction(+ : s1, s2, a)
      for (int64_t j = b0; j < b1; ++j) {
        const T ds = zs[j] - ms, dt = zt[j] - mt;
        const T es = fexp(ds);
        s1 += es;
        s2 += fexp(dt);
        a += es * (ds - dt);
      }
    }
    Ss += s1;
    St += s2;
    A += a;
  }
  const T inv_s = T(1) / Ss;
  const T loss = A * inv_s - flog(Ss) + flog(St);
  if (grad) {
    const T c1 = inv_s * tg * static_cast<T>(lp.logit_scale / lp.temperature);
    const T c2 = A * inv_s;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zs[j] = zs[j] * c1 * (zt[j] - c2);
  }
  return loss;
}

// Full support, forward KL, no clip, no softcap: with e^s_j = e^{zs_j-ms}, e^t_j = e^{zt_j-mt} and
// d_j = (zt_j-mt)-(zs_j-ms),
//   B = sum e^t_j d_j,  KL(p||q) = B/S_t - log S_t + log S_s,
//   dKL/dzs_j = q_j - p_j = e^s_j/S_s - e^t_j/S_t.
// The gradient is formed from the two exponentials relative to the row maxima and the two sums: no
// log S rounding (up to half an ulp of log V, the same relative error on every p_j / q_j) and no
// computed sum of p (which is exactly 1) enters it, so at a 150k vocabulary d_hidden is as accurate as
// the dense log_softmax + autograd form.  Two exponentials per entry, none in the gradient pass.
template <typename T>
T fkl_full_row(T* zs, T* zt, int64_t V, T tg, bool grad, const LogitParams& lp) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
  T ms, mt;
  row_max2(zs, zt, V, ms, mt);
  T Ss = 0, St = 0, B = 0;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
    T s1 = 0, s2 = 0, b = 0;
    if (grad) {
#pragma omp simd reduction(+ : s1, s2, b)
      for (int64_t j = b0; j < b1; ++j) {
        const T ds = zs[j] - ms, dt = zt[j] - mt;
        const T es = fexp(ds), et = fexp(dt);
        s1 += es;
        s2 += et;
        b += et * (dt - ds);
        zs[j] = es;
        zt[j] = et;
      }
    } else {
#pragma omp simd reduction(+ : s1, s2, b)
      for (int64_t j = b0; j < b1; ++j) {
        const T ds = zs[j] - ms, dt = zt[j] - mt;
        const T et = fexp(dt);
        s1 += fexp(ds);
        s2 += et;
        b += et * (dt - ds);
      }
    }
    Ss += s1;
    St += s2;
    B += b;
  }
  const T loss = B / St - flog(St) + flog(Ss);
  if (grad) {
    const T f = tg * static_cast<T>(lp.logit_scale / lp.temperature);
    const T cs = f / Ss, ct = f / St;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zs[j] = zs[j] * cs - zt[j] * ct;
  }
  return loss;
}

// Full support, generalised JSD (beta in [0, 1]), no clip, no softcap.  From e^s_j, e^t_j (relative to the
// row maxima) and their sums, q_j = e^s_j/S_s, p_j = e^t_j/S_t and the mixture log lm_j = log((1-b) q_j + b p_j)
// (one vectorised log per entry instead of the summand's log-add-exp of four exponentials):
//   s_j = b p_j (lt_j - lm_j) + (1-b) q_j (ls_j - lm_j),  g_j = (1-b) q_j (ls_j - lm_j),
//   dJSD/dzs_j = g_j - q_j G,  G = sum g.
template <typename T>
T jsd_full_row(T* zs, T* zt, int64_t V, T tg, bool grad, const LogitParams& lp, T beta) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
  T ms, mt;
  row_max2(zs, zt, V, ms, mt);
  T Ss = 0, St = 0;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
    T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = b0; j < b1; ++j) {
      const T es = fexp(zs[j] - ms), et = fexp(zt[j] - mt);
      s1 += es;
      s2 += et;
    }
    Ss += s1;
    St += s2;
  }
  const T log_ss = flog(Ss), log_st = flog(St);
  const T inv_ss = T(1) / Ss, inv_st = T(1) / St;
  const T b = beta, omb = T(1) - beta;
  // tiny keeps the mixture log finite where q and p both underflow (their terms are then 0 x finite).
  const T tiny = static_cast<T>(1e-37);
  auto term = [&](int64_t j, T& q, T& gq) {
    const T ds = zs[j] - ms, dt = zt[j] - mt;
    q = fexp(ds) * inv_ss;
    const T p = fexp(dt) * inv_st;
    const T lm = vlog(omb * q + b * p + tiny);
    gq = omb * q * ((ds - log_ss) - lm);
    return b * p * ((dt - log_st) - lm) + gq;
  };
  T loss = 0, G = 0;
  for (int64_t b0 = 0; b0 < V; b0 += SUM_BLOCK) {
    const int64_t b1 = b0 + SUM_BLOCK < V ? b0 + SUM_BLOCK : V;
    T pl = 0, pg = 0;
    if (grad) {
#pragma omp simd reduction(+ : pl, pg)
      for (int64_t j = b0; j < b1; ++j) {
        T q, gq;
        pl += term(j, q, gq);
        pg += gq;
        zs[j] = q;
        zt[j] = gq;
      }
    } else {
#pragma omp simd reduction(+ : pl)
      for (int64_t j = b0; j < b1; ++j) {
        T q, gq;
        pl += term(j, q, gq);
      }
    }
    loss += pl;
    G += pg;
  }
  if (grad) {
    const T f = tg * static_cast<T>(lp.logit_scale / lp.temperature);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zs[j] = (zt[j] - zs[j] * G) * f;
  }
  return loss;
}

// Full support, any kind / clip / softcap.
template <typename T, int KIND>
T generic_full_row(T* zs, T* zt, int64_t V, T tg, bool grad, const LogitParams& lp, const DivParams& dp) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
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
                   const LogitParams& lp, const DivParams& dp, T* scratch) {
  transform_row(zs, V, lp);
  transform_row(zt, V, lp);
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
               const DivParams& dp, T* scratch) {
  if (dp.support == SUPPORT_TOPK) return topk_support_row<T, KIND>(zs, zt, V, K, k, tg, grad, lp, dp, scratch);
  if (KIND == KIND_REVERSE_KL && !dp.has_clip && !(lp.softcap > 0)) return rkl_full_row<T>(zs, zt, V, tg, grad, lp);
  if (KIND == KIND_FORWARD_KL && !dp.has_clip && !(lp.softcap > 0)) return fkl_full_row<T>(zs, zt, V, tg, grad, lp);
  if (KIND == KIND_JSD && !dp.has_clip && !(lp.softcap > 0))
    return jsd_full_row<T>(zs, zt, V, tg, grad, lp, static_cast<T>(dp.beta));
  return generic_full_row<T, KIND>(zs, zt, V, tg, grad, lp, dp);
}

template <typename T>
T div_row(T* zs, T* zt, int64_t V, const int64_t* K, int64_t k, T tg, bool grad, const LogitParams& lp,
          const DivParams& dp, T* scratch) {
  switch (dp.kind) {
    case KIND_REVERSE_KL: return div_row_kind<T, KIND_REVERSE_KL>(zs, zt, V, K, k, tg, grad, lp, dp, scratch);
    case KIND_FORWARD_KL: return div_row_kind<T, KIND_FORWARD_KL>(zs, zt, V, K, k, tg, grad, lp, dp, scratch);
    default: return div_row_kind<T, KIND_JSD>(zs, zt, V, K, k, tg, grad, lp, dp, scratch);
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
