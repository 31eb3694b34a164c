// Interface between the torch-facing drivers (loss.cpp) and the per-row epilogues
// (loss_rows.h, compiled once per ISA).  Plain C++ only: this header is included by files
// compiled under `#pragma GCC target`, which must not see torch headers.
#pragma once

#include <cstdint>

namespace copsd_cpu {

struct LogitParams {
  double temperature = 1.0;
  double logit_scale = 1.0;
  double softcap = 0.0;  // <= 0: no softcap
};

enum { KIND_REVERSE_KL = 0, KIND_FORWARD_KL = 1, KIND_JSD = 2 };
enum { SUPPORT_FULL = 0, SUPPORT_TOPK = 1 };
enum { TAIL_BUCKET = 0, TAIL_RENORM = 1, TAIL_NONE = 2 };

struct DivParams {
  int kind = KIND_REVERSE_KL;
  double beta = 0.5;
  int support = SUPPORT_FULL;
  int tail = TAIL_BUCKET;
  bool has_clip = false;
  double clip = 0.0;
};

// One row of raw GEMM output y[V] in, transformed + reduced (and, for the backward
// routines, overwritten with d(objective)/dy) out.
template <typename T>
struct RowKernels {
  void (*logprob_fwd)(T* y, int64_t V, int64_t id, const LogitParams&, T* lp, T* ent, T* lse);
  // transformed: y already holds the transformed logits (as logprob_fwd leaves them), not the raw GEMM output.
  void (*logprob_bwd)(T* y, int64_t V, int64_t id, T lse, T ent, T g_lp, T g_ent, T g_lse, const LogitParams&,
                      bool transformed);
  void (*topk)(T* y, int64_t V, int64_t k, const LogitParams&, int64_t* ids, T* lp, T* lse);
  // Returns the row's loss; with grad, ys becomes tg * dloss/dys (yt is clobbered).
  // K/k: teacher top-k ids of the row (support == SUPPORT_TOPK); scratch: 3k values.
  T (*div)(T* ys, T* yt, int64_t V, const int64_t* K, int64_t k, T tg, bool grad, const LogitParams&,
           const DivParams&, T* scratch);
};

// Vocabulary-major ("column") layout of a chunk of R tokens: z[V][R], entry (token r, vocab j) at
// z[j * R + r].  The lm_head GEMM writes this layout at full-GEMM speed (W[V, H] @ x[R, H]^T), and
// every loop below runs over the R tokens of one vocabulary entry: contiguous, full vector width,
// no horizontal reductions.  Routines work on the vocabulary block [j0, j1) and write per-token
// partial statistics (arrays of R) that the driver merges across blocks (log-sum-exp merge).
template <typename T>
struct ColKernels {
  // y = exp(x) elementwise with this ISA's vectorised polynomial (exposed for tests).
  void (*exp)(const T* x, T* y, int64_t n);
  // In place y -> z (temperature / scale / softcap) on entries [j0, j1).
  void (*transform)(T* z, int64_t R, int64_t j0, int64_t j1, const LogitParams&);
  // m = max_j z, s = sum_j e^{z - m}, w = sum_j e^{z - m} (z - m) (w may be null).
  void (*lse_stats)(const T* z, int64_t R, int64_t j0, int64_t j1, T* m, T* s, T* w);
  // Reverse KL one-pass statistics over the block: ms, mt, Ss, St and A = sum e^{zs-ms}((zs-ms)-(zt-mt)) with
  // the block's maxima; with store, zs <- e^{zs-ms} and zt <- (zs-ms)-(zt-mt) for rkl_grad.
  void (*rkl_stats)(T* zs, T* zt, int64_t R, int64_t j0, int64_t j1, T* ms, T* mt, T* Ss, T* St, T* A,
                    bool store);
  // zs <- zs F (zt + Sh) with this block's per-token F, Sh (reverse KL gradient, no exponential).
  void (*rkl_grad)(T* zs, const T* zt, int64_t R, int64_t j0, int64_t j1, const T* F, const T* Sh);
  // Per-token partial sums of the summand s(ls, lt) and of g = ds/dls with ls = (zs-ms)-lss,
  // lt = (zt-mt)-lst; with store_g, zt <- g.
  void (*div_terms)(const T* zs, T* zt, int64_t R, int64_t j0, int64_t j1, const T* ms, const T* lss,
                    const T* mt, const T* lst, const DivParams&, bool store_g, T* loss, T* G);
  // zs <- (g - e^{ls} G) tg dz/dy with g in zt (after div_terms with store_g).
  void (*div_grad)(T* zs, const T* zt, int64_t R, int64_t j0, int64_t j1, const T* ms, const T* lss, const T* G,
                   const T* tg, const LogitParams&);
  // z <- -e^{z - lse} (a + b z) dz/dy; with transform, z holds raw GEMM output first.
  void (*logprob_grad)(T* z, int64_t R, int64_t j0, int64_t j1, const T* lse, const T* a, const T* b,
                       const LogitParams&, bool transform);
  // Top-k of the G <= 16 tokens [g0, g0 + G) over the whole vocabulary, descending (ties: lower id first);
  // token g0 + i's values / ids go to vals[i * k ...] / ids[i * k ...].  NaN logits never enter.
  void (*topk)(const T* z, int64_t R, int64_t V, int64_t g0, int64_t G, int64_t k, T* vals, int64_t* ids);
};

#define COPSD_DECLARE_ISA(isa)                  \
  namespace isa {                               \
  const RowKernels<float>& kernels_f32();       \
  const RowKernels<double>& kernels_f64();      \
  const ColKernels<float>& cols_f32();          \
  const ColKernels<double>& cols_f64();         \
  }

COPSD_DECLARE_ISA(base)
COPSD_DECLARE_ISA(avx2)
COPSD_DECLARE_ISA(avx512)
#undef COPSD_DECLARE_ISA

}  // namespace copsd_cpu
