// CPU drivers of the fused loss ops (log-probs + entropy, top-k, divergence).
//
// Layout: tokens are processed in row chunks.  For a chunk the lm_head GEMM (ATen/MKL,
// multi-threaded) writes full-vocabulary rows into a reusable [rows, V] workspace; the row
// epilogues of loss_rows.h then run in parallel over the rows (each row stays in L2 through
// its 2-4 passes); when gradients are wanted the epilogue leaves dLoss/dy in the same buffer
// and two more GEMMs produce d_hidden rows and accumulate d_weight (fp32).  So a loss with
// its gradient costs exactly the four GEMMs of the naive computation and no [N, V] tensor:
// the workspace is bounded by `workspace_bytes` (at least one row per side).
//
// Top-k goes further (topk_t): it never writes [rows, V]; each thread forms its rows' logits one vocabulary
// tile at a time and scans the tile while it is in L2.
//
// The GEMMs live in gemm.{h,cpp}: low-precision weights are up-cast per vocabulary block (also
// bounded) so every GEMM runs and accumulates in fp32 (fp64 for fp64 inputs), and where torch's MKL
// has the packed-GEMM API an fp32 lm_head is packed once per call for all chunks' logits GEMMs.
#include <torch/extension.h>
#include <pybind11/functional.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "gemm.h"
#include "loss_rows_api.h"
#include "team.h"

namespace copsd_cpu {
namespace {

// ------------------------------------------------------------------------------ ISA choice (isa_level: gemm.h)

template <typename T>
const RowKernels<T>& kernels();

template <>
const RowKernels<float>& kernels<float>() {
  switch (isa_level()) {
    case 2: return avx512::kernels_f32();
    case 1: return avx2::kernels_f32();
    default: return base::kernels_f32();
  }
}

template <>
const RowKernels<double>& kernels<double>() {
  switch (isa_level()) {
    case 2: return avx512::kernels_f64();
    case 1: return avx2::kernels_f64();
    default: return base::kernels_f64();
  }
}

// ------------------------------------------------------------------------------ helpers

using at::Tensor;

// Row epilogues: one row (one or two vocabulary rows) per task, handed out dynamically so a
// thread that the OS preempts (shared CI machines) does not hold the whole chunk back as with a
// static split.  Uses the OpenMP runtime torch itself loads (same libgomp), sized like torch's pool.
#define COPSD_PARALLEL_ROWS \
  _Pragma("omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (nr > 1)")

// COPSD_CPU_PROFILE=1 prints per-phase wall times of each call to stderr (GEMMs vs epilogue), and the process CPU
// time of each phase (all threads; on a shared machine the wall time includes the time other jobs held the cores,
// the CPU time does not -- but it does include a waiting thread's spinning unless OMP_WAIT_POLICY=passive).
struct PhaseTimer {
  bool on = [] {
    const char* e = std::getenv("COPSD_CPU_PROFILE");
    return e != nullptr && *e != '\0' && std::strcmp(e, "0") != 0;
  }();
  const char* name;
  struct Phase {
    double wall = 0, cpu = 0;  // wall ms; process CPU ms (start() / stop() only)
  };
  Phase prep, gemm, epi, grad;  // prep: up-casts / packs made before the first chunk (if split)
  std::chrono::steady_clock::time_point t0;
  double c0 = 0;
  // COPSD_CPU_PROFILE=cpu: now() reads the calling thread's CPU time instead of the wall clock (the tiled top-k
  // times each thread's phases with it inside its parallel region: robust on a shared machine).
  bool cpu = [] {
    const char* e = std::getenv("COPSD_CPU_PROFILE");
    return e != nullptr && std::strcmp(e, "cpu") == 0;
  }();
  explicit PhaseTimer(const char* n) : name(n) {}
  static double cpu_ms() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  }
  // Milliseconds on the per-thread phase clock (0 when profiling is off).
  double now() const {
    if (!on) return 0.0;
    if (cpu) {
      timespec ts{};
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
      return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
    }
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  void start() {
    if (!on) return;
    t0 = std::chrono::steady_clock::now();
    c0 = cpu_ms();
  }
  void stop(Phase& p) {
    if (!on) return;
    p.wall += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    p.cpu += cpu_ms() - c0;
  }
  ~PhaseTimer() {
    if (on)
      std::fprintf(stderr,
                   "[copsd cpu] %s: logits GEMM %.1f ms, epilogue %.1f ms, grad GEMMs %.1f ms, up-cast/pack apart %.1f ms "
                   "(CPU time: %.1f, %.1f, %.1f, %.1f ms)\n",
                   name, gemm.wall, epi.wall, grad.wall, prep.wall, gemm.cpu, epi.cpu, grad.cpu, prep.cpu);
  }
};

LogitParams logit_params(double temperature, double logit_scale, std::optional<double> softcap) {
  LogitParams p;
  p.temperature = temperature;
  p.logit_scale = logit_scale;
  p.softcap = softcap.has_value() ? *softcap : 0.0;
  return p;
}

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
Tensor vec_or_zeros(const std::optional<Tensor>& t, int64_t n, at::ScalarType st) {
  if (t.has_value() && t->defined()) return t->to(st).contiguous();
  return at::zeros({n}, at::TensorOptions().dtype(st));
}

// ------------------------------------------------------------------------------ log-probs

// Rows a single-threaded logits GEMM of a row split (row_parts below, side_parts for the divergence) gets at least.
constexpr int64_t kSplitRowsMin = 128;

// Whether logits GEMMs may be split by rows into single-threaded GEMMs, one per thread (the loss path's row split,
// the divergence's side-by-side GEMMs): not with COPSD_CPU_SIDE_GEMMS=0 (read per call, for A/B measurements;
// env_flag_off's values: also false / off / no, a bad value is an error naming the variable).
bool row_split_allowed() { return !env_flag_off("COPSD_CPU_SIDE_GEMMS"); }

// Row parts of a chunk whose logits GEMMs run one per thread, each single-threaded (0: one GEMM, MKL splits it).
// MKL splits a packed GEMM of a few hundred rows over the threads less efficiently than each thread runs its
// own rows (2-core Zen 4, 256-row chunks: ~1.4x one [N, V] GEMM split, ~1.07x as two 128-row GEMMs), so where the
// head is packed (a packed GEMM only reads its LmHead: several threads may use it at once) and every thread gets
// >= kSplitRowsMin rows, each thread takes one part.
int64_t row_parts(int64_t nr, const LmHead& head) {
  const int threads = at::get_num_threads();
  if (threads < 2 || !head.packing() || !row_split_allowed()) return 0;
  return nr / threads >= kSplitRowsMin ? threads : 0;
}

// Tokens [r0, r0 + nr) of one lm_head pass of the loss path: their logits into `zc` ([nr, V]), then the rows'
// log-prob statistics with the row maximum and log S apart (pm / plog_s: what the loss path's gradient wants);
// with a row split (row_parts), each thread forms its part's logits one vocabulary tile of the LmHead at a time
// (single-threaded packed GEMMs writing into zc) and scans each row's piece of the tile while it is still in cache
// (logprob_scan), so the statistics need no pass of their own over zc.  A softcap row keeps its transformed logits,
// any other row the raw ones.
template <typename T>
void chunk_logits_stats(const Tensor& xc, LmHead& vb, Tensor zc, const int64_t* id, const LogitParams& lp, T* plp,
                        T* pent, T* pm, T* plog_s, PhaseTimer& tm) {
  const int64_t nr = xc.size(0), V = zc.size(1);
  T* zp = zc.data_ptr<T>();
  const auto& K = kernels<T>();
  const int64_t parts = row_parts(nr, vb);
  if (parts == 0) {
    tm.start();
    vb.logits(xc, zc);
    tm.stop(tm.gemm);
    tm.start();
    COPSD_PARALLEL_ROWS
    for (int64_t r = 0; r < nr; ++r) K.logprob_stats(zp + r * V, V, id[r], lp, plp + r, pent + r, pm + r, plog_s + r);
    tm.stop(tm.epi);
    return;
  }
  const int64_t step = (nr + parts - 1) / parts;
  const int64_t tile = vb.block_rows(), tiles = (V + tile - 1) / tile;
  std::vector<double> t_gemm(parts, 0.0), t_epi(parts, 0.0);
  std::vector<LpRow<T>> state(nr);
  tm.start();
  parallel_tasks(parts, static_cast<int>(parts), false, [&](int, int64_t p) {
    const int64_t a = p * step, n = std::min(step, nr - a);
    Tensor xp = xc.narrow(0, a, n), zpart = zc.narrow(0, a, n), scratch;
    // One vocabulary tile at a time: each row's piece is scanned while the tile is still in cache.
    for (int64_t b = 0; b < tiles && n > 0; ++b) {
      const int64_t v0 = b * tile, nb = std::min(tile, V - v0);
      const double t0 = tm.now();
      vb.logits_block(xp, b, zpart.narrow(1, v0, nb), scratch);
      const double t1 = tm.now();
      for (int64_t r = a; r < a + n; ++r) K.logprob_scan(state[r], zp + r * V + v0, v0, nb, id[r], lp);
      t_gemm[p] += t1 - t0;
      t_epi[p] += tm.now() - t1;
    }
    for (int64_t r = a; r < a + n; ++r) K.logprob_end(state[r], plp + r, pent + r, nullptr, pm + r, plog_s + r);
  });
  PhaseTimer::Phase whole;
  tm.stop(whole);
  double g = 0, e = 0;
  for (int64_t p = 0; p < parts; ++p) {
    g += t_gemm[p] / parts;
    e += t_epi[p] / parts;
  }
  tm.gemm.wall += g;
  tm.gemm.cpu += whole.cpu * (g + e > 0 ? g / (g + e) : 1.0);
  tm.epi.wall += whole.wall - g;
  tm.epi.cpu += whole.cpu * (g + e > 0 ? e / (g + e) : 0.0);
}

// The one-pass tiled driver of the top-k and the log-prob forward: one parallel region per call; the tokens are cut
// into row groups (`rows`: up to 512, topk_rows; no more than the workspace would hold as [rows, V] logits, the
// other drivers' chunk) handed out dynamically to the threads; a thread forms its group's logits one vocabulary
// tile [group, tile] at a time with a single-threaded GEMM on the lm_head packed (or up-cast) per tile, and
// scan(tid, r0, nr, z, tile, v0, n) takes the tile while it is still in that core's cache (z: the group's rows at
// stride `tile`); begin(tid, r0, nr) / end(tid, r0, nr) frame a group.  So no [rows, V] block is written to
// memory and read back, and the threads meet once per call (a preempted thread on a shared machine holds the
// others back only at the end).  COPSD_CPU_PROFILE's split is per thread (summed, divided by the thread count).
template <typename T, typename Begin, typename Scan, typename End>
void tiled_rows_pass(const Tensor& hidden, const Tensor& weight, int64_t rows, int64_t budget, const char* name,
                     Begin&& begin, Scan&& scan, End&& end) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto st = acc_type(hidden);
  const int64_t groups = (N + rows - 1) / rows;
  PackBudget pack;
  LmHead vb(weight, st, hidden.scalar_type(), rows, N, budget, pack, false, topk_tile(rows, sizeof(T)));
  PhaseTimer tm(name);
  tm.start();
  vb.ready();
  tm.stop(tm.prep);
  const int64_t tile = vb.block_rows();
  const int64_t tiles = (V + tile - 1) / tile;
  const int nt = static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), groups));
  Tensor z = cached_empty({nt, rows, tile}, st);  // per thread: its logits tile
  std::vector<Tensor> scratch(nt);                // and an up-cast scratch
  std::vector<double> t_gemm(nt, 0.0), t_epi(nt, 0.0);
  Tensor x = hidden.to(st);
  parallel_tasks(groups, nt, true, [&](int tid, int64_t g) {
    const int64_t r0 = g * rows, nr = std::min(rows, N - r0);
    Tensor xg = x.narrow(0, r0, nr);
    T* zp = z[tid].data_ptr<T>();
    begin(tid, r0, nr);
    for (int64_t b = 0; b < tiles; ++b) {
      const int64_t v0 = b * tile, n = std::min(tile, V - v0);
      const double t0 = tm.now();
      vb.logits_block(xg, b, z[tid].narrow(0, 0, nr).narrow(1, 0, n), scratch[tid]);  // rows of stride `tile`
      const double t1 = tm.now();
      scan(tid, r0, nr, zp, tile, v0, n);
      t_gemm[tid] += t1 - t0;
      t_epi[tid] += tm.now() - t1;
    }
    const double t0 = tm.now();
    end(tid, r0, nr);
    t_epi[tid] += tm.now() - t0;
  });
  for (int i = 0; i < nt; ++i) {
    tm.gemm.wall += t_gemm[i] / nt;
    tm.epi.wall += t_epi[i] / nt;
  }
}

// Row groups of the tiled one-pass driver: topk_rows (with `row_bytes` of per-row buffers on every thread), within
// the workspace as [rows, V] logits.
template <typename T>
int64_t tiled_rows(int64_t N, int64_t V, int64_t row_bytes, int64_t budget) {
  const int threads = std::max(1, at::get_num_threads());
  return std::min(topk_rows(N, threads, row_bytes, budget),
                  std::max<int64_t>(1, budget / std::max<int64_t>(1, V * static_cast<int64_t>(sizeof(T)))));
}

// Forward log-probs on the tiled one-pass driver (tiled_rows_pass): each row's online statistics (logprob_scan)
// take each tile while it is in cache, and no GEMM is split over threads (MKL splits a 128-row chunk's GEMM over 2
// threads at ~1.5x the cost of one [N, V] GEMM on a 2-core Zen 4).  Where the tile is a multiple of 512 entries
// (1024 at 512-row groups) the pieces are whole blocks of the row kernel's online sums and the statistics are the
// whole-row kernel's bit for bit; other tiles agree to rounding.
template <typename T>
std::tuple<Tensor, Tensor, Tensor> logprobs_forward_t(const Tensor& hidden, const Tensor& weight, const Tensor& ids,
                                                      const LogitParams& lp, int64_t budget) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  auto opts = at::TensorOptions().dtype(acc_type(hidden));
  Tensor out_lp = at::empty({N}, opts), out_ent = at::empty({N}, opts), out_lse = at::empty({N}, opts);
  if (N == 0) return {out_lp, out_ent, out_lse};
  const int64_t rows = tiled_rows<T>(N, V, 0, budget);
  const auto& K = kernels<T>();
  const int64_t* id = ids.data_ptr<int64_t>();
  T* plp = out_lp.data_ptr<T>();
  T* pent = out_ent.data_ptr<T>();
  T* plse = out_lse.data_ptr<T>();
  std::vector<LpRow<T>> state(N);  // one per token: rows of different groups never share one
  tiled_rows_pass<T>(
      hidden, weight, rows, budget, "logprobs", [](int, int64_t, int64_t) {},
      [&](int, int64_t r0, int64_t nr, T* z, int64_t stride, int64_t v0, int64_t n) {
        for (int64_t r = 0; r < nr; ++r) K.logprob_scan(state[r0 + r], z + r * stride, v0, n, id[r0 + r], lp);
      },
      [&](int, int64_t r0, int64_t nr) {
        for (int64_t q = r0; q < r0 + nr; ++q) K.logprob_end(state[q], plp + q, pent + q, plse + q, nullptr, nullptr);
      });
  return {out_lp, out_ent, out_lse};
}

// Whether the divergence's side-by-side logits (chunk_logits) and the gradient GEMMs per vocabulary tile (the
// recomputing log-prob backward, grads_by_tile) are handed out to the threads one tile (run of tiles) at a time: not
// with COPSD_CPU_DYNAMIC=0 (read per call, for A/B measurements), which gives each thread one side's whole GEMMs and
// one fixed run of gradient tiles (env_flag_off: also false / off / no; a bad value is an error naming the variable).
bool dynamic_tiles() { return !env_flag_off("COPSD_CPU_DYNAMIC"); }

// Bytes of d_hidden partials the gradient tiles may hold for a chunk or span (grad_runs): at H = 512 and 256-row
// chunks, 32 of 512 KiB (16 are needed at V = 32000); at V = 151936, H = 896, 18 runs of about 2 tiles.
constexpr int64_t kPartBytes = int64_t(16) << 20;

// Runs of consecutive vocabulary tiles the gradient GEMMs hand out, each summing one d_hidden partial, for `tiles`
// tiles: one run per tile where `tiles` partials of [rows, H] fit kPartBytes (the usual case: 16 tiles at
// V = 32000), else as many runs as fit, never fewer than the threads nor more than the tiles.
int64_t grad_runs(int64_t tiles, int threads, int64_t rows, int64_t H, int64_t elem) {
  const int64_t fit = kPartBytes / std::max<int64_t>(1, rows * H * elem);
  return std::max<int64_t>(1, std::min(tiles, std::max<int64_t>(threads, fit)));
}

// Recomputing log-prob backward, fused and tiled.  The vocabulary tiles are cut into R = grad_runs() runs of
// consecutive tiles, handed out to the threads dynamically (COPSD_CPU_DYNAMIC=0: one fixed run per thread); a run
// owns its tiles' d_weight rows (no two threads write the same ones) and one d_hidden partial, summed tile after
// tile whichever thread runs it, so the result is the same on every call.  Per tile and row group a thread runs the
// single-threaded logits GEMM of a [rows, tile] block on the per-tile packed lm_head, turns the block into dL/dz in
// place (logprob_bwd on each row's piece) while it is still in that core's cache, and feeds it at once to the two
// gradient GEMMs: d_weight[tile] (+)= G^T x[group] and the run's d_hidden partial (+)= G W[tile]; the partials are
// summed at the end, in run order.  So no [rows, V] block goes to memory and back (the chunked design wrote it and
// read it three times), and no GEMM is split over threads.  Tokens are taken in spans whose per-thread d_hidden
// partials fit half the workspace (one span at the usual sizes).
template <typename T>
std::tuple<Tensor, Tensor> logprobs_backward_t(const Tensor& hidden, const Tensor& weight, const Tensor& ids,
                                               const Tensor& lse, const Tensor& ent, const Tensor& g_lp,
                                               const Tensor& g_ent, const Tensor& g_lse, const LogitParams& lp,
                                               int64_t budget) {
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto st = acc_type(hidden);
  Tensor dx = cached_empty({N, H}, st);
  Tensor dw = cached_empty({V, H}, st);
  if (N == 0 || H == 0) {
    dx.zero_();
    dw.zero_();
    return {dx, dw};
  }
  const int threads = std::max(1, at::get_num_threads());
  const int64_t elem = static_cast<int64_t>(sizeof(T));
  const int64_t span = std::max<int64_t>(1, std::min<int64_t>(N, (budget / 2) / (threads * H * elem)));
  // Equal groups of <= 512 rows (COPSD_CPU_TOPK_ROWS), and no more than the workspace would hold as [rows, V] logits
  // (the chunk of the other drivers).
  const int64_t rows =
      std::min(topk_rows(span, 1, 0, budget), std::max<int64_t>(1, budget / std::max<int64_t>(1, V * elem)));
  const int64_t tile = grad_tile(rows, V, threads, elem);
  PackBudget pack;
  LmHead vb(weight, st, hidden.scalar_type(), rows, N, budget, pack, false, tile, true);
  PhaseTimer tm("logprobs backward");
  tm.start();
  vb.ready();
  tm.stop(tm.prep);
  const int64_t tiles = (V + tile - 1) / tile;
  const bool dynamic = dynamic_tiles();
  const int64_t runs = dynamic ? grad_runs(tiles, threads, span, H, elem) : std::min<int64_t>(threads, tiles);
  const int nt = static_cast<int>(std::min<int64_t>(threads, runs));
  Tensor part = cached_empty({runs, span, H}, st);  // the runs' d_hidden partials
  Tensor z = cached_empty({nt, rows, tile}, st);
  std::vector<Tensor> scratch(nt), wscratch(nt);
  std::vector<double> t_gemm(nt, 0.0), t_epi(nt, 0.0), t_grad(nt, 0.0);
  Tensor x = hidden.to(st);
  const auto& K = kernels<T>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const T* plse = lse.data_ptr<T>();
  const T* pent = ent.data_ptr<T>();
  const T* pa = g_lp.data_ptr<T>();
  const T* pb = g_ent.data_ptr<T>();
  const T* pc = g_lse.data_ptr<T>();
  // On the bf16 kernel (LmHead::bf16_grads): each row group of a span packed as row pairs once for every tile.
  const bool bf16g = vb.bf16_grads();
  const int64_t xw = bf16g ? vb.grad_x_words(rows) : 0;
  const int g32 = f32_grads_use(H);  // the tile GEMMs on the fp32 kernel (else, and for fp64, MKL's)
  std::vector<uint32_t> xpair;
  for (int64_t s0 = 0; s0 < N; s0 += span) {
    const int64_t ns = std::min(span, N - s0);
    Tensor ps = part.narrow(1, 0, ns);
    if (bf16g) {
      ps.zero_();  // the bf16 kernel's products add into the partials
      xpair.resize(static_cast<size_t>((ns + rows - 1) / rows * xw));
      for (int64_t g0 = 0; g0 < ns; g0 += rows)
        vb.pack_grad_x(x.narrow(0, s0 + g0, std::min(rows, ns - g0)), xpair.data() + g0 / rows * xw);
    }
    parallel_tasks(runs, nt, dynamic, [&](int tid, int64_t run) {
      const int64_t b0 = run * tiles / runs, b1 = (run + 1) * tiles / runs;
      Tensor acc = ps[run];
      T* zp = z[tid].data_ptr<T>();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t v0 = b * tile, n = std::min(tile, V - v0);
        const double t0 = tm.now();
        Tensor wb = bf16g ? Tensor() : vb.weight_block(b, wscratch[tid]);
        Tensor dwb = dw.narrow(0, v0, n);
        t_grad[tid] += tm.now() - t0;
        for (int64_t g0 = 0; g0 < ns; g0 += rows) {
          const int64_t nr = std::min(rows, ns - g0), r0 = s0 + g0;
          Tensor xg = x.narrow(0, r0, nr);
          Tensor zb = z[tid].narrow(0, 0, nr).narrow(1, 0, n);  // rows of stride `tile`
          const double t1 = tm.now();
          vb.logits_block(xg, b, zb, scratch[tid]);
          const double t2 = tm.now();
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t q = r0 + r, j = id[q] - v0;
            K.logprob_bwd(zp + r * tile, n, j >= 0 && j < n ? j : -1, plse[q], pent[q], pa[q], pb[q], pc[q], lp,
                          false);
          }
          const double t3 = tm.now();
          if (bf16g) {
            vb.grad_tile_bf16(zb.data_ptr<float>(), tile, nr, v0, n, xpair.data() + g0 / rows * xw,
                              acc.data_ptr<float>() + g0 * acc.stride(0), acc.stride(0), dw.data_ptr<float>(),
                              r0 == 0);
          } else {
            Tensor ag = acc.narrow(0, g0, nr);
            grad_mm(g32, zb, wb, ag, b != b0);
            grad_mm(g32, zb.t(), xg, dwb, r0 != 0);
          }
          t_gemm[tid] += t2 - t1;
          t_epi[tid] += t3 - t2;
          t_grad[tid] += tm.now() - t3;
        }
      }
    });
    Tensor dxs = dx.narrow(0, s0, ns);
    at::sum_out(dxs, ps, 0);
  }
  for (int i = 0; i < nt; ++i) {
    tm.gemm.wall += t_gemm[i] / nt;
    tm.epi.wall += t_epi[i] / nt;
    tm.grad.wall += t_grad[i] / nt;
  }
  return {dx, dw};
}

// The two fp32 gradient products of vocabulary rows [v0, v0 + n) of a chunk's dL/dz zc [nr, V]: the run's d_hidden
// partial pg (add_part: +=, else =) zc[:, tile] W[tile], and d_weight[tile] (first: =, else +=) zc[:, tile]^T xc;
// single-threaded (g32: on the fp32 kernel, f32_grads_use, else MKL's); `wscratch`: this thread's up-cast buffer.
void tile_grads(int g32, const Tensor& zc, const Tensor& xc, LmHead& vb, int64_t v0, int64_t n, Tensor& pg,
                bool add_part, Tensor& dw, bool first, Tensor& wscratch) {
  Tensor zb = zc.narrow(1, v0, n);
  Tensor wb = vb.weight_rows(v0, n, wscratch);
  grad_mm(g32, zb, wb, pg, add_part);
  grad_mm(g32, zb.t(), xc, dw.narrow(0, v0, n), !first);
}

// The two gradient GEMMs of a chunk whose dL/dz block zc [nr, V] is (or is being) formed, per vocabulary tile.  The
// tiles are cut into R = grad_runs() runs of consecutive tiles, handed out to the threads dynamically (a thread
// that a busy machine slows down takes fewer; COPSD_CPU_DYNAMIC=0: one fixed run per thread).  Each run owns its
// tiles' d_weight rows and one d_hidden partial.  Per tile: first form(v0, n) (which may turn the rows' pieces of zc
// into dL/dz there, leaving them in cache), then right away d_weight[tile] (= on the first chunk, += after) G^T x and
// the run's partial (+)= G W[tile], all single-threaded (G: the tile's dL/dz); dxc = the sum of the R partials in
// run order.  A run's sums do not depend on the thread that ran it, so repeated calls agree bit for bit.  `part`:
// [>= R, >= nr, H] partials; `wscratch`: one up-cast buffer per thread.  Against MKL's threaded [nr, V] GEMMs: G is
// read from memory once instead of twice, and no GEMM is split over threads.  form's time is counted as epilogue, the
// rest as gradient GEMMs.
template <typename Form>
void grads_by_tile(const Tensor& zc, const Tensor& xc, LmHead& vb, Tensor dxc, Tensor& dw, bool first, Tensor& part,
                   std::vector<Tensor>& wscratch, int64_t tile, PhaseTimer& tm, Form&& form) {
  const int64_t nr = zc.size(0), V = zc.size(1), H = xc.size(1);
  const int64_t tiles = (V + tile - 1) / tile;
  const int threads = std::max(1, std::min(at::get_num_threads(), static_cast<int>(wscratch.size())));
  const bool dynamic = dynamic_tiles();
  const int64_t want = dynamic ? grad_runs(tiles, threads, part.size(1), H, zc.element_size())
                               : std::min<int64_t>(threads, tiles);  // COPSD_CPU_DYNAMIC=0: one fixed run per thread
  const int64_t runs = std::min(want, part.size(0));
  const int nt = static_cast<int>(std::min<int64_t>(threads, runs));
  Tensor pc = part.narrow(0, 0, runs).narrow(1, 0, nr);
  std::vector<double> t_form(std::max(nt, 1), 0.0);
  // The tile GEMMs on the fp32 kernel (f32_grads_use; f32_mm falls back to MKL's for other dtypes and layouts).
  const int g32 = f32_grads_use(H);
  tm.start();
  // On the bf16 kernel (LmHead::bf16_grads): x packed as row pairs once for every tile; its products add into the
  // partial.
  std::vector<uint32_t> xpair;
  if (vb.bf16_grads()) {
    xpair.resize(static_cast<size_t>(vb.grad_x_words(nr)));
    vb.pack_grad_x(xc, xpair.data());
    pc.zero_();
  }
  parallel_tasks(runs, nt, dynamic, [&](int tid, int64_t g) {
    const int64_t b0 = g * tiles / runs, b1 = (g + 1) * tiles / runs;
    Tensor pg = pc[g];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * tile, n = std::min(tile, V - v0);
      const double t0 = tm.now();
      form(v0, n);
      t_form[tid] += tm.now() - t0;
      if (!xpair.empty()) {
        vb.grad_tile_bf16(zc.data_ptr<float>() + v0, zc.stride(0), nr, v0, n, xpair.data(), pg.data_ptr<float>(),
                          pc.stride(1), dw.data_ptr<float>(), first);
        continue;
      }
      tile_grads(g32, zc, xc, vb, v0, n, pg, b != b0, dw, first, wscratch[tid]);
    }
  });
  at::sum_out(dxc, pc, 0);
  PhaseTimer::Phase whole;
  tm.stop(whole);
  double f = 0;
  for (double t : t_form) f += t / static_cast<double>(t_form.size());
  tm.epi.wall += f;
  tm.grad.wall += whole.wall - f;
  tm.grad.cpu += whole.cpu;
}

// Per-token loss with the gradient in the forward pass: for each token chunk, the logits GEMM, the row
// statistics (the rows keep their transformed logits), then `coeff(r0, rows, lp, ent)` -- a Python callable
// returning the chunk's (d loss / d lp, d loss / d entropy), each [rows] or None -- then the row gradients from
// the kept logits and the dX / dW GEMMs: 3 lm_head GEMMs instead of the 4 of forward + recomputing backward.
using CoeffFn = std::function<std::tuple<std::optional<Tensor>, std::optional<Tensor>>(int64_t, int64_t, Tensor,
                                                                                        Tensor)>;

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> logprobs_loss_t(const Tensor& hidden, const Tensor& weight,
                                                           const Tensor& ids, const LogitParams& lp,
                                                           const CoeffFn& coeff, int64_t budget) {
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto st = acc_type(hidden);
  auto opts = at::TensorOptions().dtype(st);
  Tensor out_lp = at::empty({N}, opts), out_ent = at::empty({N}, opts);
  Tensor dx = cached_empty({N, H}, st), dw = cached_empty({V, H}, st);  // the first chunk's GEMMs write dw
  if (N == 0 || H == 0) return {out_lp, out_ent, dx.zero_(), dw.zero_()};
  const int64_t rows = chunk_rows(N, V, sizeof(T), 1, budget, true);
  const int threads = std::max(1, at::get_num_threads());
  const int64_t tile = grad_tile(rows, V, threads, sizeof(T));
  const int64_t tiles = (V + tile - 1) / tile;
  const int nt = static_cast<int>(std::min<int64_t>(threads, tiles));
  PackBudget pack;
  // Tiles of the row split's logits (chunk_logits_stats): ~2 MiB of one thread's part of a chunk.
  LmHead vb(weight, st, hidden.scalar_type(), rows, N, budget, pack, true,
            topk_tile((rows + threads - 1) / threads, sizeof(T)));
  Tensor z = cached_empty({rows, V}, st), mx = at::empty({rows}, opts), logs = at::empty({rows}, opts);
  Tensor part = cached_empty({grad_runs(tiles, nt, rows, H, sizeof(T)), rows, H}, st);  // d_hidden partials
  std::vector<Tensor> wscratch(nt);
  const auto& K = kernels<T>();
  const int64_t* id = ids.data_ptr<int64_t>();
  PhaseTimer tm("logprobs_loss");  // the coefficient callback (Python) is in none of the phases
  tm.start();
  vb.ready();  // the packed / up-cast copies now: the chunk GEMMs may run from several threads
  tm.stop(tm.prep);
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t nr = std::min(rows, N - r0);
    Tensor xc = hidden.narrow(0, r0, nr).to(st);
    T* pent = out_ent.data_ptr<T>() + r0;
    T* pm = mx.data_ptr<T>();
    T* plogs = logs.data_ptr<T>();
    Tensor zc = z.narrow(0, 0, nr);
    chunk_logits_stats<T>(xc, vb, zc, id + r0, lp, out_lp.data_ptr<T>() + r0, pent, pm, plogs, tm);
    auto [g_lp, g_ent] = coeff(r0, nr, out_lp.narrow(0, r0, nr), out_ent.narrow(0, r0, nr));
    Tensor a = g_lp.has_value() && g_lp->defined() ? g_lp->to(st).contiguous() : at::zeros({nr}, opts);
    Tensor b = g_ent.has_value() && g_ent->defined() ? g_ent->to(st).contiguous() : at::zeros({nr}, opts);
    TORCH_CHECK(a.dim() == 1 && a.size(0) == nr && b.dim() == 1 && b.size(0) == nr,
                "logprobs_loss: the coefficient callback must return [rows] tensors");
    const T* pa = a.data_ptr<T>();
    const T* pb = b.data_ptr<T>();
    T* zp = zc.data_ptr<T>();
    // The gradient per vocabulary tile: the rows' pieces of the tile turned into dL/dz in place, then right away,
    // while they are in cache, both gradient GEMMs (grads_by_tile).
    grads_by_tile(zc, xc, vb, dx.narrow(0, r0, nr), dw, r0 == 0, part, wscratch, tile, tm, [&](int64_t v0, int64_t n) {
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t j = id[r0 + r] - v0;
        K.logprob_grad(zp + r * V + v0, n, j >= 0 && j < n ? j : -1, pm[r], plogs[r], pent[r], pa[r], pb[r], T(0), lp,
                       true);
      }
    });
  }
  return {out_lp, out_ent, dx, dw};
}

// ------------------------------------------------------------------------------ top-k

// Top-k on the tiled one-pass driver (tiled_rows_pass): each row's running top-k state (threshold, candidates,
// online LSE: topk_scan) takes each tile while it is in cache.  A row that ends with fewer than k logits above
// -inf needs its whole row for the -inf / NaN ids: its logits are formed again afterwards (rare: a row of almost
// only -inf / NaN logits).
template <typename T>
std::tuple<Tensor, Tensor, Tensor> topk_t(const Tensor& hidden, const Tensor& weight, int64_t k,
                                          const LogitParams& lp, int64_t budget) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto st = acc_type(hidden);
  auto opts = at::TensorOptions().dtype(st);
  Tensor out_ids = at::empty({N, k}, at::TensorOptions().dtype(at::kLong));
  Tensor out_lp = at::empty({N, k}, opts), out_lse = at::empty({N}, opts);
  if (N == 0) return {out_ids, out_lp, out_lse};
  const int64_t cap = topk_row_buffer(k);
  const int64_t rows = tiled_rows<T>(N, V, cap * static_cast<int64_t>(sizeof(T) + sizeof(int64_t)), budget);
  const int nt = static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), (N + rows - 1) / rows));
  // Per thread: its rows' candidate buffers and states.
  Tensor cval = cached_empty({nt, rows, cap}, st);
  Tensor cid = cached_empty({nt, rows, cap}, at::kLong);
  std::vector<std::vector<TopkRow<T>>> state(nt, std::vector<TopkRow<T>>(rows));
  std::vector<char> short_row(N, 0);
  const auto& K = kernels<T>();
  int64_t* pid = out_ids.data_ptr<int64_t>();
  T* plp = out_lp.data_ptr<T>();
  T* plse = out_lse.data_ptr<T>();
  tiled_rows_pass<T>(
      hidden, weight, rows, budget, "topk",
      [&](int tid, int64_t, int64_t nr) {
        for (int64_t r = 0; r < nr; ++r)
          topk_row_init(state[tid][r], k, cval[tid].data_ptr<T>() + r * cap, cid[tid].data_ptr<int64_t>() + r * cap);
      },
      [&](int tid, int64_t, int64_t nr, T* z, int64_t stride, int64_t v0, int64_t n) {
        for (int64_t r = 0; r < nr; ++r) K.topk_scan(state[tid][r], z + r * stride, v0, n, k, lp);
      },
      [&](int tid, int64_t r0, int64_t nr) {
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t q = r0 + r;
          short_row[q] = K.topk_end(state[tid][r], k, pid + q * k, plp + q * k, plse + q) < k;
        }
      });
  Tensor row, x;
  std::optional<LmHead> whole;  // one row at a time: never packed
  PackBudget pack;
  for (int64_t q = 0; q < N; ++q) {  // whole rows again for their -inf / NaN ids (one row at a time: rare)
    if (!short_row[q]) continue;
    if (!row.defined()) {
      row = at::empty({1, V}, opts);
      x = hidden.to(st);
      whole.emplace(weight, st, hidden.scalar_type(), 1, 1, budget, pack, false);
    }
    whole->logits(x.narrow(0, q, 1), row);
    K.topk(row.data_ptr<T>(), V, k, lp, pid + q * k, plp + q * k, plse + q);  // the whole-row kernel
  }
  return {out_ids, out_lp, out_lse};
}

// ------------------------------------------------------------------------------ divergence

// (loss, d_s_hidden, d_s_weight, stats, the teacher top-k ids the call selected (select_k > 0)).
using DivOut = std::tuple<Tensor, std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>,
                          std::optional<Tensor>>;

// Whether a divergence's two logits GEMMs can run side by side (side_parts): an even thread count and the row split
// allowed (the lm_heads' packing and the chunk's rows are side_parts' to check).
bool side_by_side_threads() {
  const int threads = at::get_num_threads();
  return threads >= 2 && threads % 2 == 0 && row_split_allowed();
}

// Row parts per side when the student's and the teacher's logits GEMMs of a chunk run side by side (0: they run
// one after the other, each split over all threads by MKL).  Side by side needs both lm_heads' GEMMs to only read
// them (LmHead::shared_logits: packed, or read in place, or up-cast per block into each thread's own scratch, e.g.
// a head too large for the pack budget), so that two threads may use two of them at once, and an even thread count
// T whose T / 2 row parts per side each keep >= kSplitRowsMin rows (or T = 2: one part, any rows), so that every
// thread has one single-threaded GEMM: 2 threads always, 4 with >= 256-row chunks; otherwise (1 or an odd number of
// threads, many threads and few rows) MKL splits each GEMM as before.  COPSD_CPU_SIDE_GEMMS=0 turns it off (read per
// call, for A/B measurements).
int64_t side_parts(int64_t nr, const LmHead& hs, const LmHead& ht) {
  if (!side_by_side_threads() || !hs.shared_logits() || !ht.shared_logits()) return 0;
  const int64_t parts = at::get_num_threads() / 2;
  return parts == 1 || nr / parts >= kSplitRowsMin ? parts : 0;
}

// Task `task` of a chunk's side-by-side logits on tile-packed heads: the GEMM of vocabulary tile task / (2 parts) for
// row part (task / 2) % parts of side task % 2 (0: the student's xs, hs, zs; 1: the teacher's).  `sc`: the calling
// thread's 2 x parts scratch tensors (fresh per chunk; see chunk_logits).
void side_tile_task(int64_t task, int64_t parts, int64_t tile, const Tensor& xs, LmHead& hs, const Tensor& zs,
                    const Tensor& xt, LmHead& ht, const Tensor& zt, Tensor* sc) {
  const int64_t nr = xs.size(0), V = zs.size(1), step = (nr + parts - 1) / parts;
  const int64_t b = task / (2 * parts), rest = task % (2 * parts), p = rest / 2, side = rest % 2;
  const int64_t r0 = p * step, n = std::min(step, nr - r0), v0 = b * tile, nv = std::min(tile, V - v0);
  if (n <= 0) return;
  Tensor& s = sc[p * 2 + side];
  if (side == 0) {
    hs.logits_block(xs.narrow(0, r0, n), b, zs.narrow(0, r0, n).narrow(1, v0, nv), s, r0 == 0);
  } else {
    ht.logits_block(xt.narrow(0, r0, n), b, zt.narrow(0, r0, n).narrow(1, v0, nv), s, r0 == 0);
  }
}

// Both sides' logits of one chunk.  MKL splits a 256-row packed GEMM over 2 threads less efficiently than one thread
// runs it (2-core Zen 4, N = 2048, H = 256, V = 32000, CPU time of 8 chunks: 403 ms split vs 378 ms single-threaded
// per side; MKL's one-shot [2048, V] GEMM: 353 ms): so where side_parts() allows, every GEMM runs single-threaded
// inside one parallel region.  Where both heads are cut into the same vocabulary tiles (the divergence's tile-packed
// heads) the tasks are (row part, side, tile) GEMMs handed out dynamically, so a thread that a busy machine (or a
// hypervisor) slows down takes fewer of them, and the threads wait for each other by at most about one tile at the
// chunk's end instead of one side's whole GEMM; otherwise each thread takes whole row parts of one side.  Each task
// writes its own block of zs / zt with a GEMM whose shape does not depend on the thread, so the result does not
// depend on the hand-out.
void chunk_logits(const Tensor& xs, LmHead& hs, Tensor zs, const Tensor& xt, LmHead& ht, Tensor zt) {
  const int64_t nr = xs.size(0), V = zs.size(1);
  const int64_t parts = side_parts(nr, hs, ht);
  if (parts == 0) {
    hs.logits(xs, zs);
    ht.logits(xt, zt);
    return;
  }
  const int64_t step = (nr + parts - 1) / parts;
  const int64_t tile = hs.block_rows();
  const bool tiles_out = tile > 0 && tile < V && ht.block_rows() == tile && dynamic_tiles();
  count_side_chunk(tiles_out);
  if (tiles_out) {
    const int64_t tiles = (V + tile - 1) / tile;
    const int nt = static_cast<int>(2 * parts);
    // Per thread and side: the up-cast block of a low-precision head, or the bf16 kernel's packed x of that side's
    // rows (reused by the thread's next tile of the same side and part; fresh per chunk, see logits_block).
    std::vector<Tensor> scratch(static_cast<size_t>(2 * nt * parts));
    parallel_tasks(2 * parts * tiles, nt, true, [&](int tid, int64_t task) {
      side_tile_task(task, parts, tile, xs, hs, zs, xt, ht, zt, &scratch[static_cast<size_t>(tid * parts * 2)]);
    });
    return;
  }
  std::vector<Tensor> scratch(static_cast<size_t>(2 * parts));  // up-cast blocks of a head without a whole copy
  parallel_tasks(2 * parts, static_cast<int>(2 * parts), false, [&](int, int64_t task) {
    const int64_t r0 = (task / 2) * step, n = std::min(step, nr - r0);
    if (n <= 0) return;
    Tensor* sc = &scratch[static_cast<size_t>(task)];
    if (task % 2 == 0) {
      hs.logits(xs.narrow(0, r0, n), zs.narrow(0, r0, n), r0 == 0, sc);
    } else {
      ht.logits(xt.narrow(0, r0, n), zt.narrow(0, r0, n), r0 == 0, sc);
    }
  });
}

template <typename T>
DivOut divergence_t(const Tensor& xs, const Tensor& ws, const Tensor& xt, const Tensor& wt, const LogitParams& lp,
                    const DivParams& dp, const std::optional<Tensor>& topk_ids,
                    const std::optional<Tensor>& token_grad, const std::optional<Tensor>& stats_ids,
                    int64_t select_k, int64_t budget) {
  const int64_t N = xs.size(0), V = ws.size(0), H = xs.size(1);
  const auto st = acc_type(xs);
  auto opts = at::TensorOptions().dtype(st);
  const bool grad = token_grad.has_value() && token_grad->defined();
  Tensor loss = at::empty({N}, opts);
  Tensor dx, dw, tg;
  if (grad) {
    dx = cached_empty({N, H}, st);
    dw = cached_empty({V, H}, st);
    advise_huge_pages(dw);
    tg = token_grad->to(st).contiguous();
  }
  // Token statistics of stats_ids, [N, 3] rows (student log-prob, student entropy, teacher log-prob).
  const bool want_stats = stats_ids.has_value();
  Tensor stats = at::empty({N, want_stats ? 3 : 0}, opts);
  // select_k > 0: the teacher-top-k support's ids are selected row by row from the teacher logits the chunk holds
  // (RowKernels::div_select), not given -- one teacher lm_head GEMM instead of the top-k op's pass plus this one.
  const bool select = select_k > 0;
  Tensor sel_ids = select ? at::empty({N, select_k}, at::TensorOptions().dtype(at::kLong)) : Tensor();
  auto result = [&]() -> DivOut {
    return {loss, grad ? std::optional<Tensor>(dx) : std::nullopt, grad ? std::optional<Tensor>(dw) : std::nullopt,
            want_stats ? std::optional<Tensor>(stats.t().contiguous()) : std::nullopt,
            select ? std::optional<Tensor>(sel_ids) : std::nullopt};
  };
  if (N == 0) {
    if (grad) dw.zero_();
    return result();
  }
  const bool topk = dp.support == SUPPORT_TOPK;
  const int64_t k = select ? select_k : topk ? topk_ids->size(1) : 0;
  const int64_t* pK = select ? nullptr : topk ? topk_ids->data_ptr<int64_t>() : nullptr;
  int64_t* psel = select ? sel_ids.data_ptr<int64_t>() : nullptr;
  const int64_t rows = chunk_rows(N, V, sizeof(T), 2, budget, grad);
  PackBudget pack;  // the student's lm_head is packed first, the teacher's if the budget still allows
  // Where the two sides' logits GEMMs will run side by side (side_by_side_threads), both lm_heads are
  // packed per vocabulary tile (~2 MiB of a chunk's logits), the tiles by all threads at once, each single-threaded:
  // MKL's threaded pack of a whole head costs ~12 ms at V = 32000, H = 256 against ~4 for its tiles, and the tile
  // GEMMs write the chunk in cache-sized blocks (2-core Zen 4, reverse KL, N = 2048: 1.18 -> 1.13x the GEMM floor,
  // median of 7 interleaved rounds).  Otherwise (MKL splitting each GEMM) the heads stay whole.
  const int64_t head_tile = side_by_side_threads() ? topk_tile(rows, sizeof(T)) : 0;
  LmHead vb_s(ws, st, xs.scalar_type(), rows, N, budget, pack, grad, head_tile);
  LmHead vb_t(wt, st, xt.scalar_type(), rows, N, budget, pack, false, head_tile);
  Tensor zs = cached_empty({rows, V}, st), zt = cached_empty({rows, V}, st);
  advise_huge_pages(zs);
  advise_huge_pages(zt);
  Tensor scratch = at::empty({rows, std::max<int64_t>(1, 3 * k)}, opts);
  // The gradient GEMMs per vocabulary tile (grads_by_tile), or with COPSD_CPU_GRAD_TILES=0 (read per call, for A/B
  // measurements; env_flag_off's values) MKL's threaded GEMMs over the chunk.
  const bool grad_tiles = !env_flag_off("COPSD_CPU_GRAD_TILES");
  const int threads = std::max(1, at::get_num_threads());
  const int64_t gtile = grad_tile(rows, V, threads, sizeof(T));
  // The d_hidden partials of grads_by_tile's runs of tiles.
  Tensor part = grad && grad_tiles
                    ? cached_empty({grad_runs((V + gtile - 1) / gtile, threads, rows, H, sizeof(T)), rows, H}, st)
                    : Tensor();
  std::vector<Tensor> wscratch(threads);
  const auto& K = kernels<T>();
  T* ploss = loss.data_ptr<T>();
  const T* ptg = grad ? tg.data_ptr<T>() : nullptr;
  T* psc = scratch.data_ptr<T>();
  const int64_t sc_stride = scratch.size(1);
  const int64_t* psid = want_stats ? stats_ids->data_ptr<int64_t>() : nullptr;
  T* pstats = want_stats ? stats.data_ptr<T>() : nullptr;
  PhaseTimer tm(grad ? "divergence+grad" : "divergence");
  tm.start();
  vb_s.ready();  // the whole up-cast / packed copies now: chunk_logits may use both heads from two threads
  vb_t.ready();
  tm.stop(tm.prep);
  // The loss of token n = r0 + r from its rows ps / pt of the chunk (r: the row in the chunk), dL/dz left in ps.
  auto row_div = [&](int64_t n, int64_t r, T* ps, T* pt) {
    if (select)
      return K.div_select(ps, pt, V, psel + n * k, k, grad ? ptg[n] : T(0), grad, lp, dp, psc + r * sc_stride,
                          want_stats ? psid[n] : 0, want_stats ? pstats + 3 * n : nullptr);
    return K.div(ps, pt, V, topk ? pK + n * k : nullptr, k, grad ? ptg[n] : T(0), grad, lp, dp, psc + r * sc_stride,
                 want_stats ? psid[n] : 0, want_stats ? pstats + 3 * n : nullptr);
  };
  // Where every phase of a chunk runs as single-threaded tasks (both heads tile-packed and their logits side by side,
  // the gradient GEMMs per vocabulary tile, fp32 gradients), the whole call runs on one team (team.h): one OpenMP
  // region, and per chunk three phases -- the logits tiles (with the previous chunk's d_hidden partial sums), the row
  // epilogues, the gradient runs -- separated by the team's barriers, at which a thread out of work sleeps instead of
  // spinning.  The same tasks as chunk_logits / grads_by_tile, so the same results; COPSD_CPU_TEAM=0 (read per call,
  // for A/B measurements) runs them as separate OpenMP regions.
  const int64_t tile = vb_s.block_rows();
  const int64_t last_nr = N - (N - 1) / rows * rows;
  const int64_t parts = side_parts(std::min(rows, N), vb_s, vb_t);
  const bool team = !env_flag_off("COPSD_CPU_TEAM") && parts > 0 && side_parts(last_nr, vb_s, vb_t) == parts &&
                    tile > 0 && tile < V && vb_t.block_rows() == tile && dynamic_tiles() &&
                    (!grad || (grad_tiles && !vb_s.bf16_grads()));
  if (team) {
    const int64_t tiles = (V + tile - 1) / tile, gtiles = (V + gtile - 1) / gtile;
    const int64_t runs =
        grad ? std::min(grad_runs(gtiles, threads, part.size(1), H, static_cast<int64_t>(sizeof(T))), part.size(0))
             : 0;
    const bool convert = xs.scalar_type() != st || xt.scalar_type() != st;
    const int g32 = grad ? f32_grads_use(H) : 0;
    constexpr int64_t kSumRows = 8;  // rows of d_hidden per summing task
    std::vector<Tensor> scratch(static_cast<size_t>(2 * threads * parts));
    Tensor xsc, xtc;  // the chunk's hidden states in `st` (when converted: thread 0's, shared)
    // dx rows [r0 + q * kSumRows, ...) of a chunk of nr rows = the sum of the runs' partials, in run order.
    auto sum_rows = [&](int64_t r0, int64_t nr, int64_t q) {
      const int64_t a = q * kSumRows, e = std::min(nr, a + kSumRows);
      const int64_t ps = part.stride(0), pr = part.stride(1);
      const T* pp = part.data_ptr<T>();
      T* out = dx.data_ptr<T>() + (r0 + a) * H;
      for (int64_t r = a; r < e; ++r, out += H) {
        const T* src = pp + r * pr;
        for (int64_t h = 0; h < H; ++h) out[h] = src[h];
        for (int64_t g = 1; g < runs; ++g) {
          const T* sg = src + g * ps;
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) out[h] += sg[h];
        }
      }
    };
    count_team_call();
    run_team(threads, [&](Team& tmt, int tid) {
      int64_t prev_r0 = -1, prev_nr = 0;
      for (int64_t r0 = 0; r0 < N; r0 += rows) {
        const int64_t nr = std::min(rows, N - r0);
        const double t0 = tid == 0 ? tm.now() : 0.0, c0 = tid == 0 && tm.on ? PhaseTimer::cpu_ms() : 0.0;
        Tensor xs_c, xt_c;
        if (convert) {
          tmt.single(tid, [&] {
            xsc = xs.narrow(0, r0, nr).to(st);
            xtc = xt.narrow(0, r0, nr).to(st);
          });
          xs_c = xsc;
          xt_c = xtc;
        } else {
          xs_c = xs.narrow(0, r0, nr);
          xt_c = xt.narrow(0, r0, nr);
        }
        Tensor zsc = zs.narrow(0, 0, nr), ztc = zt.narrow(0, 0, nr);
        Tensor* sc = &scratch[static_cast<size_t>(tid * parts * 2)];
        for (int64_t i = 0; i < 2 * parts; ++i) sc[i] = Tensor();  // fresh per chunk (see chunk_logits)
        if (tid == 0) count_side_chunk(true);
        const int64_t n_sum = prev_r0 >= 0 ? (prev_nr + kSumRows - 1) / kSumRows : 0;
        tmt.tasks(tid, n_sum + 2 * parts * tiles, [&](int, int64_t task) {
          if (task < n_sum) {
            sum_rows(prev_r0, prev_nr, task);
          } else {
            side_tile_task(task - n_sum, parts, tile, xs_c, vb_s, zsc, xt_c, vb_t, ztc, sc);
          }
        });
        const double t1 = tid == 0 ? tm.now() : 0.0, c1 = tid == 0 && tm.on ? PhaseTimer::cpu_ms() : 0.0;
        T* ps = zsc.data_ptr<T>();
        T* pt = ztc.data_ptr<T>();
        tmt.tasks(tid, nr, [&](int, int64_t r) { ploss[r0 + r] = row_div(r0 + r, r, ps + r * V, pt + r * V); });
        const double t2 = tid == 0 ? tm.now() : 0.0, c2 = tid == 0 && tm.on ? PhaseTimer::cpu_ms() : 0.0;
        if (grad) {
          tmt.tasks(tid, runs, [&](int t, int64_t g) {
            const int64_t b0 = g * gtiles / runs, b1 = (g + 1) * gtiles / runs;
            Tensor pg = part[g].narrow(0, 0, nr);
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t v0 = b * gtile, n = std::min(gtile, V - v0);
              tile_grads(g32, zsc, xs_c, vb_s, v0, n, pg, b != b0, dw, r0 == 0, wscratch[static_cast<size_t>(t)]);
            }
          });
          prev_r0 = r0;
          prev_nr = nr;
        }
        if (tid == 0 && tm.on) {  // phase times as thread 0 saw them (it leaves each phase with the team)
          const double t3 = tm.now(), c3 = PhaseTimer::cpu_ms();
          tm.gemm.wall += t1 - t0;
          tm.epi.wall += t2 - t1;
          tm.grad.wall += t3 - t2;
          tm.gemm.cpu += c1 - c0;
          tm.epi.cpu += c2 - c1;
          tm.grad.cpu += c3 - c2;
        }
      }
      if (grad) {
        tmt.tasks(tid, (prev_nr + kSumRows - 1) / kSumRows, [&](int, int64_t q) { sum_rows(prev_r0, prev_nr, q); });
      }
    });
    return result();
  }
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t nr = std::min(rows, N - r0);
    Tensor zsc = zs.narrow(0, 0, nr), ztc = zt.narrow(0, 0, nr);
    Tensor xsc = xs.narrow(0, r0, nr).to(st), xtc = xt.narrow(0, r0, nr).to(st);
    tm.start();
    chunk_logits(xsc, vb_s, zsc, xtc, vb_t, ztc);
    tm.stop(tm.gemm);
    tm.start();
    T* ps = zsc.data_ptr<T>();
    T* pt = ztc.data_ptr<T>();
    COPSD_PARALLEL_ROWS
    for (int64_t r = 0; r < nr; ++r) ploss[r0 + r] = row_div(r0 + r, r, ps + r * V, pt + r * V);
    tm.stop(tm.epi);
    if (grad && grad_tiles) {  // zsc holds dL/dz now: both gradient GEMMs per vocabulary tile
      grads_by_tile(zsc, xsc, vb_s, dx.narrow(0, r0, nr), dw, r0 == 0, part, wscratch, gtile, tm,
                    [](int64_t, int64_t) {});
    } else if (grad) {
      tm.start();
      gemm_grads(zsc, xsc, ws, dx.narrow(0, r0, nr), dw, r0 == 0, vb_s);
      tm.stop(tm.grad);
    }
  }
  return result();
}

// ------------------------------------------------------------------------------ bindings

void check_2d_same(const Tensor& h, const Tensor& w, const char* hn, const char* wn) {
  TORCH_CHECK(h.device().is_cpu() && w.device().is_cpu(), hn, "/", wn, " must be CPU tensors");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), hn, " [N, H] and ", wn,
              " [V, H] expected");
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous(), hn, "/", wn, " must be contiguous");
}

// The call's workspace (workspace_budget): COPSD_CPU_WORKSPACE_MB's bytes when set, else the default for this op's
// `sides` [rows, V] logits buffers of the accumulation dtype and whether it runs gradient GEMMs.
int64_t call_budget(int64_t budget, const Tensor& hidden, const Tensor& weight, int sides, bool grads) {
  return workspace_budget(budget, hidden.size(0), weight.size(0),
                          static_cast<int64_t>(c10::elementSize(acc_type(hidden))), sides, grads);
}

std::tuple<Tensor, Tensor, Tensor> logprobs_forward(const Tensor& hidden, const Tensor& weight, const Tensor& ids,
                                                    double temperature, double logit_scale,
                                                    std::optional<double> softcap, int64_t budget) {
  at::NoGradGuard no_grad;  // outputs are plain tensors; the op layer owns autograd
  check_2d_same(hidden, weight, "hidden", "weight");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == hidden.size(0),
              "ids must be int64 [N]");
  const auto lp = logit_params(temperature, logit_scale, softcap);
  Tensor idc = ids.contiguous();
  budget = call_budget(budget, hidden, weight, 1, false);
  if (acc_type(hidden) == at::kDouble) return logprobs_forward_t<double>(hidden, weight, idc, lp, budget);
  return logprobs_forward_t<float>(hidden, weight, idc, lp, budget);
}

std::tuple<Tensor, Tensor> logprobs_backward(const Tensor& hidden, const Tensor& weight, const Tensor& ids,
                                             const Tensor& lse, const Tensor& entropy,
                                             const std::optional<Tensor>& g_lp, const std::optional<Tensor>& g_ent,
                                             const std::optional<Tensor>& g_lse, double temperature,
                                             double logit_scale, std::optional<double> softcap, int64_t budget) {
  at::NoGradGuard no_grad;  // outputs are plain tensors; the op layer owns autograd
  check_2d_same(hidden, weight, "hidden", "weight");
  const auto lp = logit_params(temperature, logit_scale, softcap);
  const int64_t N = hidden.size(0);
  const auto st = acc_type(hidden);
  Tensor idc = ids.contiguous();
  Tensor l = lse.to(st).contiguous(), e = entropy.to(st).contiguous();
  budget = call_budget(budget, hidden, weight, 1, true);
  if (st == at::kDouble) {
    return logprobs_backward_t<double>(hidden, weight, idc, l, e, vec_or_zeros<double>(g_lp, N, st),
                                       vec_or_zeros<double>(g_ent, N, st), vec_or_zeros<double>(g_lse, N, st), lp,
                                       budget);
  }
  return logprobs_backward_t<float>(hidden, weight, idc, l, e, vec_or_zeros<float>(g_lp, N, st),
                                    vec_or_zeros<float>(g_ent, N, st), vec_or_zeros<float>(g_lse, N, st), lp, budget);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> logprobs_loss(const Tensor& hidden, const Tensor& weight,
                                                         const Tensor& ids, const CoeffFn& coeff, double temperature,
                                                         double logit_scale, std::optional<double> softcap,
                                                         int64_t budget) {
  at::NoGradGuard no_grad;  // outputs are plain tensors; the op layer owns autograd (coeff may enable grad)
  check_2d_same(hidden, weight, "hidden", "weight");
  const auto lp = logit_params(temperature, logit_scale, softcap);
  Tensor idc = ids.contiguous();
  budget = call_budget(budget, hidden, weight, 1, true);
  if (acc_type(hidden) == at::kDouble) return logprobs_loss_t<double>(hidden, weight, idc, lp, coeff, budget);
  return logprobs_loss_t<float>(hidden, weight, idc, lp, coeff, budget);
}

std::tuple<Tensor, Tensor, Tensor> topk(const Tensor& hidden, const Tensor& weight, int64_t k, double temperature,
                                        double logit_scale, std::optional<double> softcap, int64_t budget) {
  at::NoGradGuard no_grad;  // outputs are plain tensors; the op layer owns autograd
  check_2d_same(hidden, weight, "hidden", "weight");
  TORCH_CHECK(k >= 1 && k <= weight.size(0), "k must be in [1, V]");
  const auto lp = logit_params(temperature, logit_scale, softcap);
  budget = call_budget(budget, hidden, weight, 1, false);
  if (acc_type(hidden) == at::kDouble) return topk_t<double>(hidden, weight, k, lp, budget);
  return topk_t<float>(hidden, weight, k, lp, budget);
}

DivOut divergence(const Tensor& xs, const Tensor& ws, const Tensor& xt, const Tensor& wt, double temperature,
                  double logit_scale, std::optional<double> softcap, int64_t kind, double beta, int64_t support,
                  int64_t tail, std::optional<double> term_clip, const std::optional<Tensor>& topk_ids,
                  const std::optional<Tensor>& token_grad, const std::optional<Tensor>& stats_ids, int64_t select_k,
                  int64_t budget) {
  at::NoGradGuard no_grad;  // outputs are plain tensors; the op layer owns autograd
  check_2d_same(xs, ws, "s_hidden", "s_weight");
  check_2d_same(xt, wt, "t_hidden", "t_weight");
  TORCH_CHECK(xt.size(0) == xs.size(0) && wt.size(0) == ws.size(0), "student/teacher shapes disagree");
  TORCH_CHECK(kind >= 0 && kind <= 2 && support >= 0 && support <= 1 && tail >= 0 && tail <= 2,
              "bad divergence spec");
  LogitParams lp = logit_params(temperature, logit_scale, softcap);
  DivParams dp;
  dp.kind = static_cast<int>(kind);
  dp.beta = beta;
  dp.support = static_cast<int>(support);
  dp.tail = static_cast<int>(tail);
  dp.has_clip = term_clip.has_value();
  dp.clip = term_clip.value_or(0.0);
  std::optional<Tensor> K;
  TORCH_CHECK(select_k >= 0 && select_k <= ws.size(0), "select_k must be in [0, V = ", ws.size(0), "], got ",
              select_k);
  TORCH_CHECK(select_k == 0 || (dp.support == SUPPORT_TOPK && !(topk_ids.has_value() && topk_ids->defined())),
              "select_k selects the teacher_topk support's ids: it needs support teacher_topk and no topk_ids");
  if (dp.support == SUPPORT_TOPK && select_k == 0) {
    TORCH_CHECK(topk_ids.has_value() && topk_ids->defined(), "teacher_topk support needs topk_ids or select_k");
    TORCH_CHECK(topk_ids->scalar_type() == at::kLong && topk_ids->dim() == 2 && topk_ids->size(0) == xs.size(0) &&
                    topk_ids->size(1) >= 1 && topk_ids->size(1) <= ws.size(0),
                "topk_ids must be int64 [N, k] with 1 <= k <= V");
    K = topk_ids->contiguous();
  }
  if (token_grad.has_value() && token_grad->defined())
    TORCH_CHECK(token_grad->dim() == 1 && token_grad->size(0) == xs.size(0), "token_grad must be [N]");
  std::optional<Tensor> sid;
  if (stats_ids.has_value() && stats_ids->defined()) {
    TORCH_CHECK(stats_ids->scalar_type() == at::kLong && stats_ids->dim() == 1 && stats_ids->size(0) == xs.size(0),
                "stats_ids must be int64 [N]");
    sid = stats_ids->contiguous();
    if (sid->numel()) {
      const int64_t lo = sid->min().item<int64_t>(), hi = sid->max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < ws.size(0), "stats_ids must hold token ids in [0, ", ws.size(0), "), got values in [",
                  lo, ", ", hi, "]");
    }
  }
  budget = call_budget(budget, xs, ws, 2, token_grad.has_value() && token_grad->defined());
  if (acc_type(xs) == at::kDouble)
    return divergence_t<double>(xs, ws, xt, wt, lp, dp, K, token_grad, sid, select_k, budget);
  return divergence_t<float>(xs, ws, xt, wt, lp, dp, K, token_grad, sid, select_k, budget);
}

// y = f(x) for an fp32/fp64 tensor, f one of the row kernels' vectorised elementwise functions, chosen by
// pick(kernels<T>()) (exposed to Python for the tests of exp and log).
template <typename Pick>
Tensor elementwise(const Tensor& x, Pick pick) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  Tensor xc = x.contiguous(), y = at::empty_like(xc);
  if (x.scalar_type() == at::kDouble) {
    pick(kernels<double>())(xc.data_ptr<double>(), y.data_ptr<double>(), xc.numel());
  } else {
    pick(kernels<float>())(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  }
  return y;
}

}  // namespace

void register_loss(pybind11::module& m) {
  namespace py = pybind11;
  m.def("logprobs_forward", &logprobs_forward, py::arg("hidden"), py::arg("weight"), py::arg("ids"),
        py::arg("temperature"), py::arg("logit_scale"), py::arg("softcap"), py::arg("workspace_bytes"),
        "(logprobs[N], entropy[N], lse[N]) of ids under softmax(z)");
  m.def("logprobs_backward", &logprobs_backward, py::arg("hidden"), py::arg("weight"), py::arg("ids"),
        py::arg("lse"), py::arg("entropy"), py::arg("g_logprobs"), py::arg("g_entropy"), py::arg("g_lse"),
        py::arg("temperature"), py::arg("logit_scale"), py::arg("softcap"), py::arg("workspace_bytes"),
        "(d_hidden, d_weight) of sum(g_lp*lp + g_ent*H + g_lse*lse)");
  m.def("logprobs_loss", &logprobs_loss, py::arg("hidden"), py::arg("weight"), py::arg("ids"), py::arg("coeff"),
        py::arg("temperature"), py::arg("logit_scale"), py::arg("softcap"), py::arg("workspace_bytes"),
        "(logprobs[N], entropy[N], d_hidden, d_weight) of sum over chunks of a per-token loss whose "
        "(d/d lp, d/d entropy) coeff(r0, rows, lp, ent) returns");
  m.def("topk", &topk, py::arg("hidden"), py::arg("weight"), py::arg("k"), py::arg("temperature"),
        py::arg("logit_scale"), py::arg("softcap"), py::arg("workspace_bytes"),
        "(ids[N,k], logprobs[N,k], lse[N]), descending");
  m.def("divergence", &divergence, py::arg("s_hidden"), py::arg("s_weight"), py::arg("t_hidden"),
        py::arg("t_weight"), py::arg("temperature"), py::arg("logit_scale"), py::arg("softcap"), py::arg("kind"),
        py::arg("beta"), py::arg("support"), py::arg("tail"), py::arg("term_clip"), py::arg("topk_ids"),
        py::arg("token_grad"), py::arg("stats_ids"), py::arg("select_k"), py::arg("workspace_bytes"),
        "(loss[N], d_s_hidden | None, d_s_weight | None, stats[3, N] | None, ids[N, select_k] | None): stats (with "
        "stats_ids) = student log-prob of stats_ids, student entropy, teacher log-prob of stats_ids; ids (with "
        "select_k > 0, support teacher_topk, no topk_ids) = the teacher top-k ids the call selected");
  m.def("exp", [](const Tensor& x) { return elementwise(x, [](const auto& k) { return k.exp; }); }, py::arg("x"),
        "elementwise exp with the row epilogues' vectorised polynomial (for tests)");
  m.def("log", [](const Tensor& x) { return elementwise(x, [](const auto& k) { return k.log; }); }, py::arg("x"),
        "elementwise log with the row epilogues' vectorised polynomial (for tests)");
  m.def("tanh", [](const Tensor& x) { return elementwise(x, [](const auto& k) { return k.tanh; }); }, py::arg("x"),
        "elementwise tanh of the softcap logit transform (vectorised; for tests)");
  m.def("team_check", [](int64_t threads, int64_t phases, int64_t n, int64_t throw_phase) {
    // Each task i of phase p adds (sum(phase p - 1's cells) + i + 1) mod 1000003 to its cell (phase 0: i + 1; cells
    // start at 0): a task that ran before the previous phase was complete, twice, or not at all leaves a cell the
    // caller's recomputation does not match.
    std::vector<int64_t> cells(static_cast<size_t>(phases * n), 0);
    std::atomic<int> size{0};
    run_team(static_cast<int>(threads), [&](Team& team, int tid) {
      if (tid == 0) size = team.size();
      for (int64_t p = 0; p < phases; ++p) {
        team.tasks(tid, n, [&](int, int64_t i) {
          TORCH_CHECK(p != throw_phase || i != n / 2, "team_check: task ", i, " of phase ", p, " threw");
          int64_t prev = 0;
          if (p > 0)
            for (int64_t j = 0; j < n; ++j) prev = (prev + cells[static_cast<size_t>((p - 1) * n + j)]) % 1000003;
          cells[static_cast<size_t>(p * n + i)] += (prev + i + 1) % 1000003;
        });
      }
    });
    return std::make_tuple(size.load(), cells);
  }, py::arg("threads"), py::arg("phases"), py::arg("n"), py::arg("throw_phase") = -1,
     "(team size, cells [phases * n]) of a run of the thread team's phases (team.h; for tests)");
  m.def("grad_runs", &grad_runs, py::arg("tiles"), py::arg("threads"), py::arg("rows"), py::arg("H"), py::arg("elem"),
        "runs of vocabulary tiles the gradient GEMMs hand out (one d_hidden partial each; for tests)");
  m.def("isa", []() {
    const int l = isa_level();
    return std::string(l == 2 ? "avx512" : l == 1 ? "avx2" : "base");
  }, "instruction set the row epilogues run with");
}

}  // namespace copsd_cpu
