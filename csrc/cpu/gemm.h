// GEMMs of the CPU loss drivers (loss.cpp): the lm_head logits of a token chunk and the two gradient
// products, all with fp32 (fp64 for fp64 inputs) operands and accumulation.
//
// A driver builds one LmHead per lm_head and call.  Every chunk's logits GEMM multiplies the same weight, and a
// BLAS re-packs its B operand (the whole [V, H] weight) into its internal panel layout on every call; when
// torch's MKL exports the packed-GEMM API (cblas_sgemm_pack / cblas_sgemm_compute) an fp32 LmHead packs the
// weight once, on the first chunk, and every chunk's GEMM then reads the packed copy.  Where copsd's own fp32 kernel
// runs (gemm_f32.h, f32_gemm_use: AVX-512 or AVX2, by default not on Intel CPUs) the packed copy is its own layout
// and its GEMMs replace MKL's packed ones.  The packed copy is
// taken only when the call has >= 2 chunks and its size fits the call's pack budget (COPSD_CPU_PACK_MB,
// COPSD_CPU_PACK=0 turns packing off); otherwise, and for fp64, every chunk runs at::mm_out as before.
// Low-precision weights (bf16/fp16) are up-cast in vocabulary blocks into one reused fp32 buffer (split over the
// threads; bf16 as a bit shift): when packed, each block is up-cast once per call and packed by MKL's threaded
// pack; when not, once per chunk.  A low-precision lm_head with gradients keeps one whole up-cast copy instead
// (for the d_hidden products), packed in one block.  The tiled top-k and log-prob passes ask for blocks of
// its tile width (packed one block per thread) and computes one block at a time (logits_block), from several
// threads at once, each running its GEMM single-threaded.  The pack budget counts what a packed copy occupies
// (the weight's fp32 size), not the larger size MKL reserves and never touches (packed_resident in gemm.cpp).
//
// A bf16 lm_head multiplied by bf16 hidden states, on a CPU with AVX512_BF16 (bf16_gemm_supported), instead packs
// its bf16 weight for the bf16 dot-product kernel of gemm_bf16.h (half the fp32 copy's size, about twice the
// multiply-adds per cycle, the same fp32 products and sums): its logits GEMMs run there, its gradient GEMMs in fp32
// as before.  Where that packed copy does not fit the pack budget (or the call has one chunk) the kernel streams
// the weight, each thread packing one panel right before its products.  COPSD_CPU_BF16_GEMM=0 (read per op call)
// keeps the fp32 path, for A/B measurements; COPSD_CPU_BF16_GEMM=all (an opt-in) puts the gradient GEMMs on the
// kernel too (grad_tile_bf16: dL/dz rounded to bf16), with W packed as row pairs instead of the whole fp32 copy.
#pragma once

#include <torch/extension.h>

#include "buffers.h"

#include <omp.h>

#include <cstdint>
#include <exception>
#include <vector>

namespace copsd_cpu {

// fn(tid, i) for i in [0, n) on nt threads (tid in [0, nt)): dealt round-robin (static) or handed out one at a time
// (dynamic).  Each thread sets its own NoGradGuard (grad mode is per thread: the op's guard on the calling thread
// does not reach the pool's threads, and ATen refuses mm_out on inputs that require grad); the first exception is
// rethrown after the region.
template <typename Fn>
void parallel_tasks(int64_t n, int nt, bool dynamic, Fn&& fn) {
  std::exception_ptr error;
  auto task = [&](int64_t i) {
    const int tid = nt > 1 ? omp_get_thread_num() : 0;
    at::NoGradGuard no_grad;
    try {
      fn(tid, i);
    } catch (...) {
#pragma omp critical(copsd_task_error)
      if (!error) error = std::current_exception();
    }
  };
  if (dynamic) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < n; ++i) task(i);
  } else {
#pragma omp parallel for schedule(static, 1) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < n; ++i) task(i);
  }
  if (error) std::rethrow_exception(error);
}

// The CPU's vector level for the row kernels, capped by COPSD_CPU_ISA=base|avx2|avx512 (read once): 0 base, 1 AVX2
// + FMA, 2 AVX-512 (F/DQ/BW/VL).
int isa_level();

// Whether bf16 logits GEMMs can run on the bf16 dot-product kernel: isa_level() 2 and the CPU has AVX512_BF16.
bool bf16_gemm_supported();

// The ISA level of the fp32 kernel of gemm_f32.h here: isa_level() (2 AVX-512, 1 AVX2 + FMA, 0 none).
int f32_gemm_level();

// The level at which packed fp32 lm_heads take the fp32 kernel of gemm_f32.h (instead of MKL's packed GEMM) in this op
// call, 0 for not: COPSD_CPU_F32_GEMM (read per call) unset, empty or `auto`: f32_gemm_level() where
// f32_gemm_calibration() chose the kernel, else 0; 1 / true / on / yes: f32_gemm_level(); 0 / false / off / no: 0;
// anything else is an error naming the variable.
int f32_gemm_use();

// The default's choice between the kernel and MKL's GEMM, measured once per process (on the first op call that
// asks): the same chunk logits block on every thread at once, each single-threaded, the two interleaved over a few
// rounds, each one's best kept.  The kernel is chosen unless MKL's time is below kernel_s / keep, and only if the
// two products agree; keep is COPSD_CPU_F32_GEMM_KEEP (read at the measurement; a number >= 0, else an error naming
// it), kCalKeep by default: a tie keeps the kernel, whose results do not depend on the MKL build.  Why measured: the kernel beats MKL on the AMD CPUs it was built on (Zen 4: ~100-111 GFLOP/s
// per thread against MKL's 69-94), but MKL is written for Intel's cores and no Intel CPU, nor an AVX2-only one since
// the kernel came, was at hand to decide from; the choice is that machine's own.
constexpr double kCalKeep = 1.05;
struct F32Calibration {
  int level = 0;          // f32_gemm_level() (0: no kernel, nothing measured)
  bool measured = false;
  double kernel_s = 0.0;  // best round: every thread's block on the kernel
  double mkl_s = 0.0;     // ... on MKL's packed GEMM (at::mm in a torch without it)
  bool agree = false;     // the two products agreed
  double keep = 0.0;      // the margin the rule gave the kernel
  bool kernel = false;    // the default takes the kernel
  // Level 2 only: the tile gradient products (f32_grads_use), d_hidden = G W and d_weight = G^T x per thread.
  double grads_kernel_s = 0.0;
  double grads_mkl_s = 0.0;
  bool grads_agree = false;
  bool grads = false;     // COPSD_CPU_F32_GRADS's default takes the kernel for them
};
const F32Calibration& f32_gemm_calibration();
// The rule: the kernel where the products agreed and kernel_s <= mkl_s * keep.
bool f32_calibration_pick(double kernel_s, double mkl_s, bool agree, double keep);

// The level at which the fp32 gradient GEMMs of one vocabulary tile (d_hidden (+)= G W[tile], d_weight[tile] (+)=
// G^T x) run on gemm_f32.h's in-place product (gemm_nn) in this op call, 0 for MKL's: f32_gemm_use() where that is 2
// (AVX-512) and the hidden size H is a multiple of the kernel's panel (64; every common model's is), and
// COPSD_CPU_F32_GRADS (read per call) is 1 / true / on / yes, or unset / empty / auto with f32_gemm_calibration()'s
// `grads`; 0 / false / off / no: 0; anything else is an error naming the variable.
int f32_grads_use(int64_t H);

// C (add: +=, else =) A @ B on the fp32 kernel of `level` (f32_grads_use), single-threaded: A [m, K] read in place
// with any strides, B [K, n] and C [m, n] with unit stride along n, n a multiple of the panel.  Returns false, with
// nothing done, where the level is 0 or the layouts or dtypes (fp32 only) do not fit; the caller then runs MKL's.
bool f32_mm(int level, const at::Tensor& A, const at::Tensor& B, at::Tensor C, bool add);

// One gradient product of a vocabulary tile, C (add: +=, else =) A @ B, single-threaded inside the caller's region:
// on the fp32 kernel where f32_mm takes it, else ATen's (MKL's) mm_out / addmm_.
void grad_mm(int level, const at::Tensor& A, const at::Tensor& B, at::Tensor C, bool add);

// Whether an fp32 lm_head can be packed once per call: the kernel of gemm_f32.h runs here, or torch's MKL exports
// its packed-GEMM API.
bool packed_f32_available();

// Whether the on/off environment variable `name` says off: 0 / false / off / no (any case); unset, empty, 1 / true /
// on / yes are on, anything else is an error naming the variable (COPSD_CPU_PACK, COPSD_CPU_BF16_GEMM's 0,
// COPSD_CPU_DYNAMIC).
bool env_flag_off(const char* name);

// An auto / on / off environment variable `name`: unset, empty or `auto` (any case) kAuto; env_flag_off's on and
// off values; anything else is an error naming the variable (COPSD_CPU_F32_GEMM, COPSD_CPU_F32_GRADS).
enum class EnvSwitch { kAuto, kOn, kOff };
EnvSwitch env_switch(const char* name);

// A non-negative integer from the environment variable `name` (`dflt` when unset or empty); anything else is an
// error naming the variable.  The MiB knobs (COPSD_CPU_PACK_MB, COPSD_CPU_CACHE_MB) and the plain counts
// (COPSD_CPU_TOPK_ROWS / _TILE) are read with it.
int64_t env_mib(const char* name, int64_t dflt);

// Rows per chunk so that `sides` [rows, V] buffers fit in `budget` bytes (>= 1 row); where the lm_head will be
// packed (fp32, MKL's packed GEMM found), at most 256 rows for a pass with gradient GEMMs and 128 without.
int64_t chunk_rows(int64_t N, int64_t V, int64_t elem, int sides, int64_t budget, bool grads);

// The logits workspace of one op call in bytes.  `budget` > 0 is COPSD_CPU_WORKSPACE_MB's (the caller's) and is
// kept.  0 is the default: 64 MiB, grown for a vocabulary so large that 64 MiB would hold fewer than the rows
// chunk_rows wants for this pass (256 with gradient GEMMs, 128 without; N if fewer) as `sides` [rows, V] buffers
// of `elem`-byte logits, up to 512 MiB.  A chunk re-reads the whole lm_head (both GEMM phases, and d_weight is
// read and written), so at a real vocabulary a small chunk pays that traffic per few rows: see the definition.
int64_t workspace_budget(int64_t budget, int64_t N, int64_t V, int64_t elem, int sides, bool grads);

// Rows per group of the tiled top-k (loss.cpp): COPSD_CPU_TOPK_ROWS if set (> 0), else the fewest equal groups
// of at most 512 rows whose count is a multiple of the thread count (so every thread gets as many); then few
// enough that one group's candidate buffers (`row_bytes` per row) on every thread fit in `budget` bytes; >= 1.
int64_t topk_rows(int64_t N, int threads, int64_t row_bytes, int64_t budget);

// Vocabulary entries per tile of the tiled top-k (loss.cpp): COPSD_CPU_TOPK_TILE if set (> 0), else what keeps a
// [rows, tile] block of `elem`-byte logits at ~2 MiB, a multiple of 256, at least 256.
int64_t topk_tile(int64_t rows, int64_t elem);

// Vocabulary entries per tile of the tiled log-prob backward (loss.cpp): COPSD_CPU_TOPK_TILE if set (> 0), else the
// top-k's tile for `rows`, at most 4096 (a tile is also the reduction length of its d_hidden product, see gemm.cpp)
// and, where the vocabulary allows, small enough that each of `threads` threads gets >= 2 tiles; >= 256.
int64_t grad_tile(int64_t rows, int64_t V, int threads, int64_t elem);

// Bytes of packed lm_head copies (and whole fp32 copies of low-precision ones) one op call may still hold:
// COPSD_CPU_PACK_MB (MiB, default 192), or 0 when COPSD_CPU_PACK=0.  A packed copy counts what it occupies,
// about the weight's fp32 size, not the larger (never touched) size MKL reserves for it.  Read per call; a bad
// value is an error naming the variable.
struct PackBudget {
  int64_t left = 0;
  PackBudget();
};

// One lm_head as the chunk GEMMs see it (see the file comment).  `rows` is the chunk size, `N` the tokens of
// the call, `budget` the workspace bytes (bounds the up-cast block of a low-precision weight).
class LmHead {
 public:
  // tile > 0: the vocabulary is split into blocks of `tile` rows (packed / up-cast per block) for callers that
  // compute the logits one vocabulary tile at a time (logits_block).
  // x_st: the dtype of the hidden states the logits are formed from (they reach logits() in `st`); bf16 with a bf16
  // W may take the bf16 kernel.
  // tile_grads: the caller forms the gradient products per vocabulary tile itself (weight_block, no whole up-cast
  // copy); with `all` they take the bf16 kernel as with `grads`.
  LmHead(const at::Tensor& W, at::ScalarType st, at::ScalarType x_st, int64_t rows, int64_t N, int64_t budget,
         PackBudget& pack, bool grads, int64_t tile = 0, bool tile_grads = false);

  // out[m, V] = x[m, H] @ W^T (x in the compute dtype).  After ready(), calls on a head with shared_logits() may
  // come from several threads at once (each GEMM then runs single-threaded inside the parallel region); `count`:
  // whether gemm_stats counts this call (a chunk split into row parts is counted once).
  // `scratch` (this thread's, grown on demand): a low-precision head without a whole up-cast copy is then up-cast
  // into it one 1024-row block at a time instead of into the head's shared block buffer, so such calls may come
  // from several threads at once too (shared_logits).
  void logits(const at::Tensor& x, at::Tensor out, bool count = true, at::Tensor* scratch = nullptr);
  // The vocabulary blocks: block b covers rows [b * block_rows(), min(V, (b + 1) * block_rows())) of W.
  int64_t block_rows() const { return vb_; }
  // out[m, n_b] = x[m, H] @ W[block b]^T (out's rows may be strided).  Safe to call from several threads at once
  // after ready(), each with its own `scratch` (the up-cast block of an unpacked low-precision weight; grown on
  // demand), and then runs single-threaded inside an OpenMP parallel region.  On the bf16 kernel `scratch` keeps
  // the packed x of the call: the next call with the same x (same storage, rows and stride) reuses it, so x's
  // values must not change between calls that share a scratch.  `count`: whether gemm_stats counts block 0 of this
  // call (a chunk's logits, all its blocks, are counted once; a chunk split into row parts once too).
  void logits_block(const at::Tensor& x, int64_t b, at::Tensor out, at::Tensor& scratch, bool count = true);
  // Block b of W itself, [n_b, H] in the compute dtype: a view of W (or of the whole up-cast copy), or up-cast into
  // `scratch` (grown on demand).  Thread-safe like logits_block.
  at::Tensor weight_block(int64_t b, at::Tensor& scratch) {
    return weight_rows(b * vb_, std::min(vb_, W_.size(0) - b * vb_), scratch);
  }
  // Rows [v0, v0 + n) of W the same way (any range; one up-cast block at most when there is no whole copy).
  at::Tensor weight_rows(int64_t v0, int64_t n, at::Tensor& scratch);
  // Makes the whole up-cast / packed copies now (otherwise the first GEMM does).
  void ready() { prepare(); }
  // dx[m, H] = dz[m, V] @ W;  dw[V, H] (+)= dz^T @ x.
  void grads(const at::Tensor& dz, const at::Tensor& x, at::Tensor dx, at::Tensor& dw, bool first);

  bool packing() const { return pack_; }
  // Whether logits() may run on several threads at once after ready(), each call single-threaded: a packed head,
  // or one whose GEMM reads the weight in place (fp32, or its whole up-cast copy), or a low-precision one up-cast
  // per block into each caller's own `scratch` -- not one streamed through the bf16 kernel.
  bool shared_logits() const { return pack_ || !bf16_; }

  // The gradient GEMMs on the bf16 kernel (COPSD_CPU_BF16_GEMM=all, for a head whose logits take it and whose
  // gradients are wanted): grad_tile_bf16 replaces the fp32 products of a vocabulary tile.  dL/dz is rounded to bf16
  // there, so d_hidden and d_weight carry about the rounding error of a bf16 result (an opt-in; see gemm_bf16.h).
  bool bf16_grads() const { return bf16g_; }
  // 32-bit words of a chunk of m rows of x packed for the d_weight products (pack_grad_x).
  int64_t grad_x_words(int64_t m) const;
  // x [m, H] (fp32 rows of bf16 values, unit stride along H) packed as row pairs; counts one chunk's gradients as
  // done on the bf16 kernel (gemm_stats "bf16_grads").
  void pack_grad_x(const at::Tensor& x, uint32_t* out) const;
  // For the vocabulary rows [v0, v0 + n) of a chunk's dL/dz z (fp32, m rows of stride ldz, columns v0 .. v0 + n):
  // part[m, H] (row stride ldp) += z[:, tile] W[tile], and d_weight rows v0 .. v0 + n of dw ([V, H] contiguous) =
  // (first) or += z[:, tile]^T x, x as pack_grad_x left it.  Single-threaded; safe from several threads at once after
  // ready() (each thread packs into its own buffers).
  void grad_tile_bf16(const float* z, int64_t ldz, int64_t m, int64_t v0, int64_t n, const uint32_t* xpair,
                      float* part, int64_t ldp, float* dw, bool first);

 private:
  at::Tensor block(int64_t v0, int64_t n);  // rows [v0, v0 + n) of W in the compute dtype (reused buffer)
  void prepare();  // on first use: the whole up-cast copy and the packed copy, where planned
  void pack_weight();
  void pack_block(at::Tensor src, at::Tensor& dst) const;
  void pack_bf16();
  // out[m, blocks b0..b1) = x @ (those blocks of W)^T on the bf16 kernel; `xpack`: the packed x (see logits_block).
  void bf16_logits(const at::Tensor& x, int64_t b0, int64_t b1, float* out, int64_t ldo, at::Tensor& xpack);
  void count_bf16_gemm() const;

  at::Tensor W_;
  at::ScalarType st_;
  bool upcast_;
  bool grads_;      // the d_hidden / d_weight products are wanted too
  bool tiled_;      // blocks are the tiles of logits_block (each GEMM single-threaded)
  int64_t vb_;      // vocabulary rows per up-cast (and packed) block
  int64_t rows_;    // chunk rows the packed copy is made for
  bool pack_ = false;
  bool copy_ = false;  // keep one whole up-cast copy of a low-precision weight (full_; COPSD_CPU_UPCAST_COPY=1)
  at::Tensor full_;
  at::Tensor buf_;  // up-cast block buffer
  std::vector<at::Tensor> packed_;  // one packed copy per vocabulary block
  int f32_ = 0;                     // fp32 logits on the kernel of gemm_f32.h at this level: from fpack_, or streamed
  at::Tensor fpack_;                // the fp32 packed W: block b at float offset b * foff_ (gemm_f32.h layout)
  int64_t foff_ = 0;
  void pack_f32();
  void f32_logits(const at::Tensor& x, int64_t b0, int64_t b1, float* out, int64_t ldo);
  void count_f32_gemm() const;
  // out[m, n] = x @ W[v0 .. v0 + n)^T on the kernel of gemm_f32.h without a packed copy: each panel packed into this
  // thread's buffer right before its products (W's rows in place, or up-cast into `scratch`); single-threaded.  False
  // (nothing written) where W's rows do not have unit stride along H.
  bool f32_streamed(const at::Tensor& x, int64_t v0, int64_t n, float* out, int64_t ldo, at::Tensor& scratch);
  bool bf16_ = false;               // the logits on the bf16 kernel, from wpack_
  at::Tensor wpack_;                // the bf16 packed W: block b at word offset b * woff_ (gemm_bf16.h layout)
  int64_t woff_ = 0;
  bool bf16g_ = false;              // the gradient GEMMs on the bf16 kernel too (grad_tile_bf16)
  bool wt_ = false;                 // ... with W packed as row pairs once per call (wtpack_), else per sub-tile
  at::Tensor wtpack_;               // [pairs(V), padded(H)] words: (W[2k, h], W[2k + 1, h])
  void pack_wt();
};

// The driver-facing call of the gradient GEMMs (W is the LmHead's weight).
inline void gemm_grads(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& /*W*/, at::Tensor dx,
                       at::Tensor& dw, bool first, LmHead& head) {
  head.grads(dz, x, dx, dw, first);
}

// Counts a divergence chunk whose two logits GEMMs ran side by side (gemm_stats "side_chunks"; with `tiles`, handed
// out one vocabulary tile at a time: "side_tile_chunks" too).
void count_side_chunk(bool tiles);
// Counts a divergence call whose chunks ran on one team of threads (gemm_stats "team_calls"; loss.cpp, team.h).
void count_team_call();

void register_gemm(pybind11::module& m);

}  // namespace copsd_cpu
