// Interface between the torch-facing drivers (loss.cpp) and the per-row epilogues
// (loss_rows.h, compiled once per ISA).  Plain C++ only: this header is included by files
// compiled under `#pragma GCC target`, which must not see torch headers.
#pragma once

#include <cstdint>
#include <limits>

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

// Running state of one row's top-k while the row is scanned in vocabulary pieces (topk_scan / topk_end of
// RowKernels); val / id: the caller's candidate buffer of topk_row_buffer(k) entries, kept across the pieces.
template <typename T>
struct TopkRow {
  T* val = nullptr;
  int64_t* id = nullptr;
  int64_t n = 0;   // candidates in the buffer (ids ascending)
  T thr = 0;       // lower bound on the row's k-th best so far
  T M = 0, S = 0;  // online log-sum-exp: max and sum of e^{z - M}
  bool nan = false, pinf = false, dense = false;
};
// Candidates kept before a cut back to k, and the buffer size a row needs (with room for full-vector stores).
inline int64_t topk_cut_at(int64_t k) { return 2 * k > k + 128 ? 2 * k : k + 128; }
inline int64_t topk_row_buffer(int64_t k) { return topk_cut_at(k) + 32; }
template <typename T>
inline void topk_row_init(TopkRow<T>& st, int64_t k, T* val, int64_t* id) {
  st.val = val;
  st.id = id;
  st.n = 0;
  st.thr = st.M = -std::numeric_limits<T>::infinity();
  st.S = 0;
  st.nan = st.pinf = false;
  st.dense = k > 1;
}

// Running log-prob statistics of one row scanned in vocabulary pieces (logprob_scan / logprob_end of RowKernels):
// with z the transformed logits, m = the maximum so far, S = sum e^{z - m}, W = sum e^{z - m} (z - m), and z_id the
// transformed logit of the row's id once its piece has been scanned.
template <typename T>
struct LpRow {
  T m = -std::numeric_limits<T>::infinity(), S = 0, W = 0;
  T z_id = std::numeric_limits<T>::quiet_NaN();
};

// One row of raw GEMM output y[V] in, transformed + reduced (and, for the backward
// routines, overwritten with d(objective)/dy) out.
template <typename T>
struct RowKernels {
  // transformed: y already holds the transformed logits (as logprob_stats / logprob_scan leave them), not the raw
  // GEMM output.
  // id < 0: the row is a piece of a longer row that does not hold the id (only the softmax part of the gradient).
  void (*logprob_bwd)(T* y, int64_t V, int64_t id, T lse, T ent, T g_lp, T g_ent, T g_lse, const LogitParams&,
                      bool transformed);
  // The loss path's pair: a row's log-prob, entropy, maximum m and log S (LSE = m + log S), and the gradient from a
  // softmax given as e^{z - shift - log_s} (logprob_bwd is shift = LSE, log_s = 0).
  void (*logprob_stats)(T* y, int64_t V, int64_t id, const LogitParams&, T* lp, T* ent, T* m, T* log_s);
  void (*logprob_grad)(T* y, int64_t V, int64_t id, T shift, T log_s, T ent, T g_lp, T g_ent, T g_lse,
                       const LogitParams&, bool transformed);
  // logprob_stats in pieces: logprob_scan per piece y[0..n) of ids [j0, j0 + n) in order (a softcap piece is
  // transformed in place), then logprob_end writes the log-prob, entropy and the LSE and / or m, log_s (the
  // whole-row values where the pieces are whole SUM_BLOCKs of 512 entries: then the online sums see the same
  // blocks); lse, m, log_s may be null.
  void (*logprob_scan)(LpRow<T>& st, T* y, int64_t j0, int64_t n, int64_t id, const LogitParams&);
  void (*logprob_end)(const LpRow<T>& st, T* lp, T* ent, T* lse, T* m, T* log_s);
  void (*topk)(T* y, int64_t V, int64_t k, const LogitParams&, int64_t* ids, T* lp, T* lse);
  // The same row in pieces: topk_scan per piece y[0..n) of ids [j0, j0 + n) in order (transformed in place),
  // then topk_end writes the LSE and the best <= k and returns how many.  Fewer than k (a row with fewer than
  // k logits above -inf): the row needs `topk` on the whole row for its -inf / NaN ids.
  void (*topk_scan)(TopkRow<T>& st, T* y, int64_t j0, int64_t n, int64_t k, const LogitParams&);
  int64_t (*topk_end)(TopkRow<T>& st, int64_t k, int64_t* ids, T* lp, T* lse);
  // Returns the row's loss; with grad, ys becomes tg * dloss/dys (yt is clobbered).
  // K/k: teacher top-k ids of the row (support == SUPPORT_TOPK); scratch: 3k values.
  // stats (nullptr: none): [student log-prob of id sid, student entropy, teacher log-prob of sid], full
  // vocabulary, from the same transformed logits.
  T (*div)(T* ys, T* yt, int64_t V, const int64_t* K, int64_t k, T tg, bool grad, const LogitParams&,
           const DivParams&, T* scratch, int64_t sid, T* stats);
  // div for the teacher-top-k support (dp.support == SUPPORT_TOPK) that selects the row's ids itself: the teacher's
  // k best transformed logits, as `topk` orders them, written to sel[0..k) and then used as div's K.
  T (*div_select)(T* ys, T* yt, int64_t V, int64_t* sel, int64_t k, T tg, bool grad, const LogitParams&,
                  const DivParams&, T* scratch, int64_t sid, T* stats);
  // y = exp(x) elementwise with the epilogues' vectorised exp (exposed for tests).
  void (*exp)(const T* x, T* y, int64_t n);
  // y = log(x) elementwise with the epilogues' vectorised log (exposed for tests).
  void (*log)(const T* x, T* y, int64_t n);
  // y = tanh(x) elementwise with the softcap transform's vectorised tanh (exposed for tests).
  void (*tanh)(const T* x, T* y, int64_t n);
};

#define COPSD_DECLARE_ISA(isa)                  \
  namespace isa {                               \
  const RowKernels<float>& kernels_f32();       \
  const RowKernels<double>& kernels_f64();      \
  }

COPSD_DECLARE_ISA(base)
COPSD_DECLARE_ISA(avx2)
COPSD_DECLARE_ISA(avx512)
#undef COPSD_DECLARE_ISA

}  // namespace copsd_cpu
