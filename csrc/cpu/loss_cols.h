// Column-layout epilogues (see ColKernels in loss_rows_api.h): a chunk of R tokens is stored
// vocabulary-major, z[j * R + r], so every inner loop below runs over the R tokens of one
// vocabulary entry -- unit stride, full vector width (16 fp32 lanes with AVX-512, 8 with AVX2),
// and per-token running statistics that stay in L1.  The driver hands out vocabulary blocks of
// ~256 KiB per side (L2-resident) to threads; each block yields per-token partials that the
// driver merges in a fixed order (deterministic whatever the thread schedule).
//
// Included by loss_rows.h inside namespace copsd_cpu::COPSD_ISA::{anonymous}: it uses that
// file's fexp / summand / clipped / Chain / transform_row.

// Offset used for exponentials relative to a (block) maximum: a -inf maximum (every entry -inf)
// becomes 0 so e^{z - 0} = 0 instead of e^{-inf + inf} = NaN.
template <typename T>
inline T safe_max(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

template <typename T>
void col_exp(const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = fexp(x[i]);
}

template <typename T>
void col_transform(T* z, int64_t R, int64_t j0, int64_t j1, const LogitParams& lp) {
  transform_row(z + j0 * R, (j1 - j0) * R, lp);
}

// Token tiles of TT lanes keep a tile's running statistics in registers (TT is a compile-time trip
// count for full tiles, so the per-tile arrays are unrolled into vector registers; the last partial
// tile takes the same code with a run-time count).  Sums are two-level -- partial sums over JS
// vocabulary entries added into the running total -- so a block of a few thousand entries does not
// accumulate fp32 rounding sequentially.
constexpr int64_t TT = 32;
constexpr int64_t JS = 32;

template <typename T, int64_t NT>
inline void lse_tile(const T* z, int64_t R, int64_t j0, int64_t j1, int64_t t0, int64_t nt_rt, T* m, T* s, T* w) {
  const int64_t nt = NT ? NT : nt_rt;
  T mx[TT], off[TT], S[TT], W[TT], ps[TT], pw[TT];
  for (int64_t u = 0; u < nt; ++u) {
    mx[u] = neg_inf<T>();
    S[u] = W[u] = 0;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const T* zj = z + j * R + t0;
#pragma omp simd
    for (int64_t u = 0; u < nt; ++u) mx[u] = zj[u] > mx[u] ? zj[u] : mx[u];
  }
  for (int64_t u = 0; u < nt; ++u) off[u] = safe_max(mx[u]);
  for (int64_t jj = j0; jj < j1; jj += JS) {
    const int64_t je = std::min(j1, jj + JS);
    for (int64_t u = 0; u < nt; ++u) ps[u] = pw[u] = 0;
    if (w) {
      for (int64_t j = jj; j < je; ++j) {
        const T* zj = z + j * R + t0;
#pragma omp simd
        for (int64_t u = 0; u < nt; ++u) {
          const T d = zj[u] - off[u];
          const T e = fexp(d);
          ps[u] += e;
          pw[u] += e > T(0) ? e * d : T(0);  // e = 0 at d = -inf: 0 * -inf would be NaN
        }
      }
    } else {
      for (int64_t j = jj; j < je; ++j) {
        const T* zj = z + j * R + t0;
#pragma omp simd
        for (int64_t u = 0; u < nt; ++u) ps[u] += fexp(zj[u] - off[u]);
      }
    }
#pragma omp simd
    for (int64_t u = 0; u < nt; ++u) {
      S[u] += ps[u];
      W[u] += pw[u];
    }
  }
  for (int64_t u = 0; u < nt; ++u) {
    m[t0 + u] = mx[u];
    s[t0 + u] = S[u];
    if (w) w[t0 + u] = W[u];
  }
}

template <typename T>
void col_lse_stats(const T* z, int64_t R, int64_t j0, int64_t j1, T* m, T* s, T* w) {
  int64_t t0 = 0;
  for (; t0 + TT <= R; t0 += TT) lse_tile<T, TT>(z, R, j0, j1, t0, TT, m, s, w);
  if (t0 < R) lse_tile<T, 0>(z, R, j0, j1, t0, R - t0, m, s, w);
}

// With store, zs <- e^{zs - ms_b} and zt <- (zs - ms_b) - (zt - mt_b) (block maxima), so the gradient pass
// needs no exponential: it rescales by a per-(block, token) factor.
template <typename T, int64_t NT>
inline void rkl_tile(T* zs, T* zt, int64_t R, int64_t j0, int64_t j1, int64_t t0, int64_t nt_rt, T* ms, T* mt,
                     T* Ss, T* St, T* A, bool store) {
  const int64_t nt = NT ? NT : nt_rt;
  T xs[TT], xt[TT], os[TT], ot[TT], S1[TT], S2[TT], AA[TT], p1[TT], p2[TT], pa[TT];
  for (int64_t u = 0; u < nt; ++u) {
    xs[u] = xt[u] = neg_inf<T>();
    S1[u] = S2[u] = AA[u] = 0;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const T* a = zs + j * R + t0;
    const T* b = zt + j * R + t0;
#pragma omp simd
    for (int64_t u = 0; u < nt; ++u) {
      xs[u] = a[u] > xs[u] ? a[u] : xs[u];
      xt[u] = b[u] > xt[u] ? b[u] : xt[u];
    }
  }
  for (int64_t u = 0; u < nt; ++u) {
    os[u] = safe_max(xs[u]);
    ot[u] = safe_max(xt[u]);
  }
  for (int64_t jj = j0; jj < j1; jj += JS) {
    const int64_t je = std::min(j1, jj + JS);
    for (int64_t u = 0; u < nt; ++u) p1[u] = p2[u] = pa[u] = 0;
    for (int64_t j = jj; j < je; ++j) {
      T* a = zs + j * R + t0;
      T* b = zt + j * R + t0;
      if (store) {
#pragma omp simd
        for (int64_t u = 0; u < nt; ++u) {
          const T ds = a[u] - os[u], dt = b[u] - ot[u];
          const T es = fexp(ds), d = ds - dt;
          p1[u] += es;
          p2[u] += fexp(dt);
          pa[u] += es > T(0) ? es * d : T(0);
          a[u] = es;
          b[u] = d;
        }
      } else {
#pragma omp simd
        for (int64_t u = 0; u < nt; ++u) {
          const T ds = a[u] - os[u], dt = b[u] - ot[u];
          const T es = fexp(ds);
          p1[u] += es;
          p2[u] += fexp(dt);
          pa[u] += es > T(0) ? es * (ds - dt) : T(0);
        }
      }
    }
#pragma omp simd
    for (int64_t u = 0; u < nt; ++u) {
      S1[u] += p1[u];
      S2[u] += p2[u];
      AA[u] += pa[u];
    }
  }
  for (int64_t u = 0; u < nt; ++u) {
    ms[t0 + u] = xs[u];
    mt[t0 + u] = xt[u];
    Ss[t0 + u] = S1[u];
    St[t0 + u] = S2[u];
    A[t0 + u] = AA[u];
  }
}

template <typename T>
void col_rkl_stats(T* zs, T* zt, int64_t R, int64_t j0, int64_t j1, T* ms, T* mt, T* Ss, T* St, T* A, bool store) {
  int64_t t0 = 0;
  for (; t0 + TT <= R; t0 += TT) rkl_tile<T, TT>(zs, zt, R, j0, j1, t0, TT, ms, mt, Ss, St, A, store);
  if (t0 < R) rkl_tile<T, 0>(zs, zt, R, j0, j1, t0, R - t0, ms, mt, Ss, St, A, store);
}

// After rkl_stats with store: zs <- zs F (zt + Sh), F / Sh this block's per-token factors.
template <typename T>
void col_rkl_grad(T* zs, const T* zt, int64_t R, int64_t j0, int64_t j1, const T* F, const T* Sh) {
  for (int64_t j = j0; j < j1; ++j) {
    T* a = zs + j * R;
    const T* b = zt + j * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) a[r] = a[r] * F[r] * (b[r] + Sh[r]);
  }
}

template <typename T, int KIND>
void col_div_terms_kind(const T* zs, T* zt, int64_t R, int64_t j0, int64_t j1, const T* ms, const T* lss,
                        const T* mt, const T* lst, const DivParams& dp, bool store_g, T* loss, T* G) {
  const T beta = static_cast<T>(dp.beta);
  const T log_b = KIND == KIND_JSD ? static_cast<T>(std::log(dp.beta)) : T(0);
  const T log_1mb = KIND == KIND_JSD ? static_cast<T>(std::log1p(-dp.beta)) : T(0);
  const T clip = static_cast<T>(dp.clip);
  for (int64_t t0 = 0; t0 < R; t0 += TT) {
    const int64_t nt = std::min(TT, R - t0);
    T L[TT], GG[TT], pl[TT], pg[TT];
    for (int64_t u = 0; u < nt; ++u) L[u] = GG[u] = 0;
    const T *ms_t = ms + t0, *lss_t = lss + t0, *mt_t = mt + t0, *lst_t = lst + t0;
    for (int64_t jj = j0; jj < j1; jj += JS) {
      const int64_t je = std::min(j1, jj + JS);
      for (int64_t u = 0; u < nt; ++u) pl[u] = pg[u] = 0;
      for (int64_t j = jj; j < je; ++j) {
        const T* a = zs + j * R + t0;
        T* b = zt + j * R + t0;
        if (store_g) {
#pragma omp simd
          for (int64_t u = 0; u < nt; ++u) {
            T sv, g;
            clipped<T, KIND>((a[u] - ms_t[u]) - lss_t[u], (b[u] - mt_t[u]) - lst_t[u], dp, beta, log_b, log_1mb,
                             clip, sv, g);
            pl[u] += sv;
            pg[u] += g;
            b[u] = g;
          }
        } else {
#pragma omp simd
          for (int64_t u = 0; u < nt; ++u) {
            T sv, g;
            clipped<T, KIND>((a[u] - ms_t[u]) - lss_t[u], (b[u] - mt_t[u]) - lst_t[u], dp, beta, log_b, log_1mb,
                             clip, sv, g);
            pl[u] += sv;
            pg[u] += g;
          }
        }
      }
#pragma omp simd
      for (int64_t u = 0; u < nt; ++u) {
        L[u] += pl[u];
        GG[u] += pg[u];
      }
    }
    for (int64_t u = 0; u < nt; ++u) {
      loss[t0 + u] = L[u];
      G[t0 + u] = GG[u];
    }
  }
}

template <typename T>
void col_div_terms(const T* zs, T* zt, int64_t R, int64_t j0, int64_t j1, const T* ms, const T* lss, const T* mt,
                   const T* lst, const DivParams& dp, bool store_g, T* loss, T* G) {
  switch (dp.kind) {
    case KIND_REVERSE_KL:
      return col_div_terms_kind<T, KIND_REVERSE_KL>(zs, zt, R, j0, j1, ms, lss, mt, lst, dp, store_g, loss, G);
    case KIND_FORWARD_KL:
      return col_div_terms_kind<T, KIND_FORWARD_KL>(zs, zt, R, j0, j1, ms, lss, mt, lst, dp, store_g, loss, G);
    default:
      return col_div_terms_kind<T, KIND_JSD>(zs, zt, R, j0, j1, ms, lss, mt, lst, dp, store_g, loss, G);
  }
}

template <typename T>
void col_div_grad(T* zs, const T* zt, int64_t R, int64_t j0, int64_t j1, const T* ms, const T* lss, const T* G,
                  const T* tg, const LogitParams& lp) {
  const Chain<T> chain(lp);
  for (int64_t j = j0; j < j1; ++j) {
    T* a = zs + j * R;
    const T* g = zt + j * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const T zj = a[r];
      a[r] = (g[r] - fexp((zj - ms[r]) - lss[r]) * G[r]) * tg[r] * chain(zj);
    }
  }
}

template <typename T>
void col_logprob_grad(T* z, int64_t R, int64_t j0, int64_t j1, const T* lse, const T* a, const T* b,
                      const LogitParams& lp, bool transform) {
  if (transform) col_transform(z, R, j0, j1, lp);
  const Chain<T> chain(lp);
  const bool cap = lp.softcap > 0;
  for (int64_t j = j0; j < j1; ++j) {
    T* zj = z + j * R;
    if (cap) {
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) {
        const T v = zj[r];
        zj[r] = -fexp(v - lse[r]) * (a[r] + b[r] * v) * chain(v);
      }
    } else {
      const T f = chain.base;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) {
        const T v = zj[r];
        zj[r] = -fexp(v - lse[r]) * (a[r] + b[r] * v) * f;
      }
    }
  }
}

// Bit i set iff z[i] > thr[i] for the G <= 16 tokens of one vocabulary entry (NaN compares false).
template <typename T>
inline uint32_t gt_mask_lanes(const T* z, const T* thr, int64_t G) {
  uint32_t m = 0;
  for (int64_t u = 0; u < G; ++u) m |= static_cast<uint32_t>(z[u] > thr[u]) << u;
  return m;
}
#if defined(COPSD_HAVE_AVX512)
template <>
inline uint32_t gt_mask_lanes<float>(const float* z, const float* thr, int64_t G) {
  const __mmask16 live = static_cast<__mmask16>((1u << G) - 1u);
  return _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, z), _mm512_loadu_ps(thr), _CMP_GT_OQ);
}
#elif defined(COPSD_HAVE_AVX2)
template <>
inline uint32_t gt_mask_lanes<float>(const float* z, const float* thr, int64_t G) {
  if (G != 16) {
    uint32_t m = 0;
    for (int64_t u = 0; u < G; ++u) m |= static_cast<uint32_t>(z[u] > thr[u]) << u;
    return m;
  }
  const uint32_t lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z), _mm256_loadu_ps(thr), _CMP_GT_OQ));
  const uint32_t hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + 8), _mm256_loadu_ps(thr + 8), _CMP_GT_OQ));
  return lo | (hi << 8);
}
#endif

// Threshold-filtered top-k: one vector compare of the G tokens' logits against their current k-th best per
// vocabulary entry; only the (rare, after the first few hundred entries) logits that beat it touch a heap.
template <typename T>
void col_topk(const T* z, int64_t R, int64_t V, int64_t g0, int64_t G, int64_t k, T* vals, int64_t* ids) {
  T thr[16];
  for (int64_t u = 0; u < 16; ++u) thr[u] = std::numeric_limits<T>::infinity();  // dead lanes never pass
  for (int64_t u = 0; u < G; ++u) {
    T* hv = vals + u * k;
    int64_t* hi = ids + u * k;
    for (int64_t i = 0; i < k; ++i) {
      hv[i] = z[i * R + g0 + u];
      hi[i] = i;
    }
    for (int64_t i = k / 2 - 1; i >= 0; --i) sift_down(hv, hi, k, i);
    thr[u] = hv[0];
  }
  for (int64_t j = k; j < V; ++j) {
    const T* zj = z + j * R + g0;
    uint32_t msk = gt_mask_lanes(zj, thr, G);
    while (msk) {
      const int u = __builtin_ctz(msk);
      msk &= msk - 1;
      T* hv = vals + u * k;
      int64_t* hi = ids + u * k;
      hv[0] = zj[u];
      hi[0] = j;
      sift_down(hv, hi, k, 0);
      thr[u] = hv[0];
    }
  }
  for (int64_t u = 0; u < G; ++u) {  // heap-sort into descending order
    T* hv = vals + u * k;
    int64_t* hi = ids + u * k;
    for (int64_t end = k - 1; end > 0; --end) {
      T tv = hv[0]; hv[0] = hv[end]; hv[end] = tv;
      int64_t ti = hi[0]; hi[0] = hi[end]; hi[end] = ti;
      sift_down(hv, hi, end, 0);
    }
  }
}

template <typename T>
ColKernels<T> make_col_table() {
  ColKernels<T> t;
  t.exp = &col_exp<T>;
  t.transform = &col_transform<T>;
  t.lse_stats = &col_lse_stats<T>;
  t.rkl_stats = &col_rkl_stats<T>;
  t.rkl_grad = &col_rkl_grad<T>;
  t.div_terms = &col_div_terms<T>;
  t.div_grad = &col_div_grad<T>;
  t.logprob_grad = &col_logprob_grad<T>;
  t.topk = &col_topk<T>;
  return t;
}
