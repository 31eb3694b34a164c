// GEMMs of the CPU loss drivers; see gemm.h for the design.
#include "gemm.h"

#include <dlfcn.h>

#include "gemm_bf16.h"
#include "gemm_f32.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <ctime>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

namespace copsd_cpu {

using at::Tensor;

namespace {

// ------------------------------------------------------------------------------ MKL's packed GEMM, found at run time

// CBLAS constants (values of mkl_cblas.h / cblas.h).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

// LP64 interface (MKL_INT = int), the one torch's MKL builds link.
using GetSizeFn = size_t (*)(int, int, int, int);
using PackFn = void (*)(int, int, int, int, int, int, float, const float*, int, float*);
using ComputeFn = void (*)(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int);

struct PackedApi {
  GetSizeFn get_size = nullptr;
  PackFn pack = nullptr;
  ComputeFn compute = nullptr;
};

// A 3x4 @ (5x4)^T product of small integers through the packed path must be exact: guards against a symbol
// of the same name with another calling convention (e.g. an ILP64 build), which then stays unused.
bool self_test(const PackedApi& api) {
  const int m = 3, n = 5, k = 4;
  float a[m * k], w[n * k], c[m * n];
  for (int i = 0; i < m * k; ++i) a[i] = static_cast<float>(i % 7 - 3);
  for (int i = 0; i < n * k; ++i) w[i] = static_cast<float>(i % 5 - 2);
  const size_t bytes = api.get_size(kBMatrix, m, n, k);
  if (bytes == 0 || bytes > (size_t(1) << 30)) return false;
  std::vector<float> packed((bytes + sizeof(float) - 1) / sizeof(float) + 16);
  api.pack(kRowMajor, kBMatrix, kTrans, m, n, k, 1.0f, w, k, packed.data());
  api.compute(kRowMajor, kNoTrans, kPacked, m, n, k, a, k, packed.data(), n, 0.0f, c, n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float want = 0;
      for (int l = 0; l < k; ++l) want += a[i * k + l] * w[j * k + l];
      if (c[i * n + j] != want) return false;
    }
  return true;
}

PackedApi load_packed_api() {
  PackedApi api;
  // The library that holds torch's own CPU operators (and, in MKL builds, MKL): found from one of its symbols,
  // opened only if already loaded, so a torch without MKL simply has no such symbols.
  void* lib = nullptr;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &info) != 0 && info.dli_fname != nullptr)
    lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return api;
  PackedApi found;
  found.get_size = reinterpret_cast<GetSizeFn>(dlsym(lib, "cblas_sgemm_pack_get_size"));
  found.pack = reinterpret_cast<PackFn>(dlsym(lib, "cblas_sgemm_pack"));
  found.compute = reinterpret_cast<ComputeFn>(dlsym(lib, "cblas_sgemm_compute"));
  if (found.get_size && found.pack && found.compute && self_test(found)) api = found;
  return api;  // the handle stays open: torch's library is never unloaded while the extension lives
}

const PackedApi& packed_api() {
  static const PackedApi api = load_packed_api();
  return api;
}

bool have_packed_api() { return packed_api().compute != nullptr; }

// Counters for tests and profiling (process-wide).
std::atomic<int64_t> n_packs{0}, n_packed_bytes{0}, n_packed_reserved{0}, n_packed_gemms{0}, n_plain_gemms{0},
    n_bf16_gemms{0}, n_bf16_grads{0}, n_f32_gemms{0}, n_f32_grads{0}, n_side_chunks{0}, n_side_tile_chunks{0},
    n_team_calls{0};

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// Bytes a packed [n, H] fp32 block really occupies.  cblas_sgemm_pack_get_size reserves far more than MKL
// writes: a fixed ~7.5 MiB plus the vocabulary times a reduction depth padded to ~640 (85 MiB at V = 32000 for
// H = 256 as for H = 512), but the pack writes only the block's own n * H floats into it (counted with
// mincore on a fresh mapping: 31.26 MiB resident of the 85 MiB at V = 32000, H = 256; 62.51 MiB at H = 512),
// and the untouched rest of the allocation (an anonymous mapping) never becomes resident.  The budget counts
// that, rounded up to whole pages plus one page for the unaligned start.
int64_t packed_resident(int64_t n, int64_t H) {
  constexpr int64_t kPage = 4096;
  return (n * H * static_cast<int64_t>(sizeof(float)) + kPage - 1) / kPage * kPage + kPage;
}

// Vocabulary rows per up-cast block of a low-precision weight.
int64_t upcast_block(int64_t V, int64_t H, int64_t elem, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(V, (budget / 4) / std::max<int64_t>(1, H * elem)));
}

// Rows per task of a parallel up-cast: ~1 MiB of fp32.
int64_t upcast_step(int64_t H) { return std::max<int64_t>(16, (int64_t(1) << 18) / std::max<int64_t>(1, H)); }

// dst = src in the compute dtype (fp32 from bf16/fp16), single-threaded: the callers split the rows over threads.
// bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 ones.
void upcast_rows(const Tensor& src, Tensor dst) {
  if (src.scalar_type() == at::kBFloat16 && dst.scalar_type() == at::kFloat && src.is_contiguous() &&
      dst.is_contiguous()) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
    uint32_t* d = reinterpret_cast<uint32_t*>(dst.data_ptr<float>());
    const int64_t n = src.numel();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
    return;
  }
  dst.copy_(src);
}

// The same over all threads (called outside any parallel region), in row blocks of ~1 MiB.
void upcast_parallel(const Tensor& src, Tensor dst) {
  const int64_t V = src.size(0), step = upcast_step(src.size(1));
  if (V <= step) {
    upcast_rows(src, dst);
    return;
  }
  parallel_tasks((V + step - 1) / step, at::get_num_threads(), false, [&](int, int64_t i) {
    const int64_t v0 = i * step, n = std::min(step, V - v0);
    upcast_rows(src.narrow(0, v0, n), dst.narrow(0, v0, n));
  });
}

}  // namespace

namespace {

// The value of the environment variable `name`, lower-cased ("" when unset); `raw`: the value itself or null.
std::string env_lower(const char* name, const char** raw) {
  *raw = std::getenv(name);
  std::string s(*raw == nullptr ? "" : *raw);
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

bool is_on(const std::string& s) { return s == "1" || s == "true" || s == "on" || s == "yes"; }
bool is_off(const std::string& s) { return s == "0" || s == "false" || s == "off" || s == "no"; }

}  // namespace

bool env_flag_off(const char* name) {
  const char* raw = nullptr;
  const std::string s = env_lower(name, &raw);
  if (s.empty() || is_on(s)) return false;
  if (is_off(s)) return true;
  TORCH_CHECK(false, name, " must be 0 or 1 (also false/true, off/on, no/yes), got '", raw, "'");
}

EnvSwitch env_switch(const char* name) {
  const char* raw = nullptr;
  const std::string s = env_lower(name, &raw);
  if (s.empty() || s == "auto") return EnvSwitch::kAuto;
  if (is_off(s)) return EnvSwitch::kOff;
  TORCH_CHECK(is_on(s), name, " must be auto, 1 or 0 (also true/false, on/off, yes/no), got '", raw, "'");
  return EnvSwitch::kOn;
}

void count_team_call() { ++n_team_calls; }

void count_side_chunk(bool tiles) {
  ++n_side_chunks;
  if (tiles) ++n_side_tile_chunks;
}

int64_t env_mib(const char* name, int64_t dflt) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return dflt;
  char* end = nullptr;
  const long long v = std::strtoll(raw, &end, 10);
  TORCH_CHECK(end != raw && *end == '\0' && v >= 0 && v < (1LL << 40), name,
              " must be a non-negative integer, got '", raw, "'");
  return static_cast<int64_t>(v);
}

// ------------------------------------------------------------------------------ ISA

namespace {

int detect_isa() {
  int level = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
  if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    level = 2;
#endif
  // COPSD_CPU_ISA caps the level: base, avx2, avx512 (any case; unset, empty or `native`: no cap).  Anything else
  // is an error naming the variable (before, a typo such as `avx-2` silently meant no cap).
  if (const char* env = std::getenv("COPSD_CPU_ISA")) {
    std::string s(env);
    for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    TORCH_CHECK(s.empty() || s == "native" || s == "base" || s == "avx2" || s == "avx512",
                "COPSD_CPU_ISA must be base, avx2, avx512 or native, got '", env, "'");
    const int cap = s == "base" ? 0 : s == "avx2" ? 1 : 2;
    level = std::min(level, cap);
  }
  return level;
}

bool detect_bf16_dot() {
#if defined(__x86_64__) && defined(__GNUC__)
  return isa_level() == 2 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// COPSD_CPU_BF16_GEMM (read per op call, on every CPU: a bad value is an error everywhere): 0 (also false / off /
// no) keeps every GEMM in fp32, 1 (the default; also true / on / yes or empty) puts bf16 logits on the bf16 kernel,
// `all` the gradient GEMMs too.
int bf16_gemm_mode() {
  const char* raw = std::getenv("COPSD_CPU_BF16_GEMM");
  if (raw != nullptr) {
    std::string v(raw);
    for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (v == "all") return 2;
    TORCH_CHECK(v.empty() || v == "0" || v == "1" || v == "false" || v == "true" || v == "off" || v == "on" ||
                    v == "no" || v == "yes",
                "COPSD_CPU_BF16_GEMM must be 0, 1 (also false/true, off/on, no/yes) or all, got '", raw, "'");
  }
  return env_flag_off("COPSD_CPU_BF16_GEMM") ? 0 : 1;
}

// The bf16 kernel's level for this op call (bf16_gemm_mode, 0 where the CPU has no kernel).
int bf16_gemm_on() {
  const int mode = bf16_gemm_mode();
  return bf16_gemm_supported() ? mode : 0;
}

}  // namespace

int isa_level() {
  static const int level = detect_isa();
  return level;
}

int f32_gemm_level() { return isa_level(); }

namespace {

// The default's measurement (f32_gemm_calibration): the chunk logits product the tiled drivers run, one
// [kCalRows, kCalH] x [kCalN, kCalH]^T block per thread with every thread at once (so the cores' shared resources
// are as busy as in an op), single-threaded on each: the kernel from its packed W against MKL's packed GEMM (or, in a
// torch without it, at::mm -- what the ops then run), timed by best_rounds.
constexpr int64_t kCalRows = 256, kCalH = 256, kCalN = 2048;
constexpr int kCalRounds = 6;

// COPSD_CPU_F32_GEMM_KEEP (gemm.h, F32Calibration).
double f32_calibration_keep() {
  const char* raw = std::getenv("COPSD_CPU_F32_GEMM_KEEP");
  if (raw == nullptr || *raw == '\0') return kCalKeep;
  char* end = nullptr;
  const double v = std::strtod(raw, &end);
  TORCH_CHECK(end != raw && *end == '\0' && std::isfinite(v) && v >= 0.0,
              "COPSD_CPU_F32_GEMM_KEEP must be a number >= 0 (default ", kCalKeep, "), got '", raw, "'");
  return v;
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// product(t, kernel) on every thread t < nt at once (single-threaded each), the kernel's side and MKL's interleaved
// over kCalRounds rounds after one warm-up round of each (caches, page faults, the thread pool); a round's time is
// the threads' own CPU time averaged over them (time a thread was preempted by another process is not counted, so a
// busy machine disturbs the choice much less than it would wall time).  Returns each side's best round: on a shared
// machine the one least disturbed.
template <typename Product>
std::pair<double, double> best_rounds(int nt, Product&& product) {
  std::vector<double> spent(static_cast<size_t>(nt));
  auto round = [&](bool kernel) {
    parallel_tasks(nt, nt, false, [&](int, int64_t t) {
      const double t0 = thread_cpu_seconds();
      product(t, kernel);
      spent[static_cast<size_t>(t)] = thread_cpu_seconds() - t0;
    });
    double sum = 0.0;
    for (double v : spent) sum += v;
    return sum / nt;
  };
  round(true);
  round(false);
  double kernel_s = 1e30, mkl_s = 1e30;
  for (int r = 0; r < kCalRounds; ++r) {
    kernel_s = std::min(kernel_s, round(true));
    mkl_s = std::min(mkl_s, round(false));
  }
  return {kernel_s, mkl_s};
}

// Whether two products agree to fp32 rounding: the largest difference within 1e-4 of the largest magnitude (the
// measured differences are ~1e-6 of it or less); a kernel that computed something else is not chosen for its speed.
bool agree(const std::vector<float>& a, const std::vector<float>& b) {
  float worst = 0.0f, big = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(a[i] - b[i]));
    big = std::max(big, std::fabs(b[i]));
  }
  return worst <= 1e-4f * big;
}

// The tile gradient products (f32_grads_use; AVX-512 only) the same way: with each thread's logits block of the
// measurement below as its dL/dz tile G [m, n] and the shared W [n, K] / its own x [m, K], d_hidden = G W and
// d_weight = G^T x (G read through its transpose, as the ops read it), on the kernel's in-place product (gemm_nn)
// against torch's GEMM (MKL's); a round times both products.
void calibrate_grads(F32Calibration& cal, int nt, const std::vector<float>& x, const std::vector<float>& w,
                     const std::vector<float>& g) {
  const int64_t m = kCalRows, K = kCalH, n = kCalN;
  std::vector<float> dh_k(static_cast<size_t>(nt * m * K)), dh_m(dh_k.size());
  std::vector<float> dw_k(static_cast<size_t>(nt * n * K)), dw_m(dw_k.size());
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  std::tie(cal.grads_kernel_s, cal.grads_mkl_s) = best_rounds(nt, [&](int64_t t, bool kernel) {
    const float* gt = g.data() + t * m * n;
    const float* xt = x.data() + t * m * K;
    float* dh = (kernel ? dh_k : dh_m).data() + t * m * K;
    float* dw = (kernel ? dw_k : dw_m).data() + t * n * K;
    if (kernel) {
      f32dot::gemm_nn(2, gt, n, 1, m, w.data(), K, K, n, dh, K, false);
      f32dot::gemm_nn(2, gt, 1, n, n, xt, K, K, m, dw, K, false);
    } else {
      Tensor G = at::from_blob(const_cast<float*>(gt), {m, n}, f32);
      Tensor dht = at::from_blob(dh, {m, K}, f32), dwt = at::from_blob(dw, {n, K}, f32);
      at::mm_out(dht, G, at::from_blob(const_cast<float*>(w.data()), {n, K}, f32));
      at::mm_out(dwt, G.t(), at::from_blob(const_cast<float*>(xt), {m, K}, f32));
    }
  });
  cal.grads_agree = agree(dh_k, dh_m) && agree(dw_k, dw_m);
  cal.grads = f32_calibration_pick(cal.grads_kernel_s, cal.grads_mkl_s, cal.grads_agree, cal.keep);
}

F32Calibration calibrate_f32(int level) {
  F32Calibration cal;
  cal.level = level;
  cal.keep = f32_calibration_keep();  // first, on every CPU: a bad value is an error, kernel or not
  if (level == 0) return cal;
  const int nt = std::max(1, std::min(at::get_num_threads(), 16));
  const int64_t m = kCalRows, K = kCalH, n = kCalN;
  std::vector<float> x(static_cast<size_t>(nt * m * K)), w(static_cast<size_t>(n * K));
  uint32_t seed = 12345u;
  auto next = [&seed]() {  // values in [-1, 1): the timings do not depend on them, the check below does
    seed = seed * 1664525u + 1013904223u;
    return static_cast<float>(seed >> 8) / static_cast<float>(1u << 23) - 1.0f;
  };
  for (auto& v : x) v = next();
  for (auto& v : w) v = next();
  std::vector<float> kpack(static_cast<size_t>(f32dot::packed_w_floats(level, n, K)));
  f32dot::pack_w(level, w.data(), K, n, K, 0, f32dot::panels(level, n), kpack.data());
  const auto& api = packed_api();
  std::vector<float> mpack;
  const bool packed = api.compute != nullptr;
  if (packed) {
    const size_t bytes = api.get_size(kBMatrix, static_cast<int>(m), static_cast<int>(n), static_cast<int>(K));
    mpack.resize((bytes + sizeof(float) - 1) / sizeof(float) + 16);
    api.pack(kRowMajor, kBMatrix, kTrans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(K), 1.0f,
             w.data(), static_cast<int>(K), mpack.data());
  }
  Tensor wt = at::from_blob(w.data(), {n, K}, at::TensorOptions().dtype(at::kFloat));
  std::vector<float> c_kernel(static_cast<size_t>(nt * m * n)), c_mkl(c_kernel.size());
  std::tie(cal.kernel_s, cal.mkl_s) = best_rounds(nt, [&](int64_t t, bool kernel) {
    const float* xt = x.data() + t * m * K;
    if (kernel) {
      f32dot::gemm(level, xt, K, m, kpack.data(), n, K, 0, f32dot::panels(level, n), c_kernel.data() + t * m * n, n);
    } else if (packed) {
      api.compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m), static_cast<int>(n), static_cast<int>(K), xt,
                  static_cast<int>(K), mpack.data(), static_cast<int>(n), 0.0f, c_mkl.data() + t * m * n,
                  static_cast<int>(n));
    } else {
      Tensor xa = at::from_blob(const_cast<float*>(xt), {m, K}, at::TensorOptions().dtype(at::kFloat));
      Tensor ca = at::from_blob(c_mkl.data() + t * m * n, {m, n}, at::TensorOptions().dtype(at::kFloat));
      at::mm_out(ca, xa, wt.t());
    }
  });
  cal.agree = agree(c_kernel, c_mkl);
  cal.measured = true;
  cal.kernel = f32_calibration_pick(cal.kernel_s, cal.mkl_s, cal.agree, cal.keep);
  if (level == 2) calibrate_grads(cal, nt, x, w, c_kernel);
  return cal;
}

}  // namespace

bool f32_calibration_pick(double kernel_s, double mkl_s, bool agree, double keep) {
  return agree && kernel_s > 0.0 && kernel_s <= mkl_s * keep;
}

const F32Calibration& f32_gemm_calibration() {
  static const F32Calibration cal = calibrate_f32(f32_gemm_level());
  return cal;
}

// The knob is parsed on every CPU, so that a bad value is an error everywhere.  Unset, empty or `auto`: the faster of
// the kernel and MKL's packed GEMM on this machine (f32_gemm_calibration, measured once per process on first use).
int f32_gemm_use() {
  const EnvSwitch sw = env_switch("COPSD_CPU_F32_GEMM");
  if (sw == EnvSwitch::kAuto) return f32_gemm_calibration().kernel ? f32_gemm_level() : 0;
  return sw == EnvSwitch::kOn ? f32_gemm_level() : 0;
}

bool packed_f32_available() { return f32_gemm_use() > 0 || have_packed_api(); }

int f32_grads_use(int64_t H) {
  const EnvSwitch sw = env_switch("COPSD_CPU_F32_GRADS");  // parsed first: a bad value is an error everywhere
  const int level = f32_gemm_use();
  // AVX-512 only: the AVX2 kernel ran these products below MKL's AVX2 GEMM (see the definition's note in gemm.h).
  if (sw == EnvSwitch::kOff || level != 2 || H <= 0 || H % f32dot::panel_rows(level) != 0) return 0;
  if (sw == EnvSwitch::kAuto && !f32_gemm_calibration().grads) return 0;
  return level;
}

bool f32_mm(int level, const Tensor& A, const Tensor& B, Tensor C, bool add) {
  if (level == 0 || A.scalar_type() != at::kFloat || B.scalar_type() != at::kFloat ||
      C.scalar_type() != at::kFloat || A.dim() != 2 || B.dim() != 2 || C.dim() != 2)
    return false;
  const int64_t m = A.size(0), K = A.size(1), n = B.size(1);
  if (B.size(0) != K || C.size(0) != m || C.size(1) != n || n % f32dot::panel_rows(level) != 0) return false;
  if ((B.stride(1) != 1 && n > 1) || (C.stride(1) != 1 && n > 1) || (C.stride(0) < n && m > 1)) return false;
  f32dot::gemm_nn(level, A.data_ptr<float>(), A.stride(0), A.stride(1), m, B.data_ptr<float>(), B.stride(0), n, K,
                  C.data_ptr<float>(), C.stride(0), add);
  ++n_f32_grads;
  return true;
}

void grad_mm(int level, const Tensor& A, const Tensor& B, Tensor C, bool add) {
  if (f32_mm(level, A, B, C, add)) return;
  if (add) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

bool bf16_gemm_supported() {
  static const bool yes = detect_bf16_dot();
  return yes;
}

// ------------------------------------------------------------------------------ chunking and budgets

// With the lm_head packed once per call, a chunk no longer has to be large to amortise the weight's packing,
// only to keep the GEMMs efficient: the d_weight update (a reduction over the chunk's rows) wants ~256 rows, a
// logits-only pass ~128 (measured on an idle 2-core AVX-512 Xeon, N = 2048, H = 256, V = 32000: top-k 146 ms at
// 128 rows vs 177 ms at 524, log-probs backward best at 256).  Fewer rows also keep the workspace (and its
// re-read by the epilogue) small.  Without the packed path, larger chunks still pay, so no cap applies there.
constexpr int64_t kPackedRowsGrad = 256, kPackedRowsNoGrad = 128;

int64_t chunk_rows(int64_t N, int64_t V, int64_t elem, int sides, int64_t budget, bool grads) {
  int64_t rows = budget / std::max<int64_t>(1, sides * V * elem);
  if (elem == 4 && packed_f32_available() && !env_flag_off("COPSD_CPU_PACK"))
    rows = std::min(rows, grads ? kPackedRowsGrad : kPackedRowsNoGrad);
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(N, 1)));
}

// Bounds of the default workspace (workspace_budget): 64 MiB holds both sides' 256-row chunks up to a vocabulary of
// 32768 in fp32; beyond, the default grows to keep those rows, up to 512 MiB (both sides' 256 rows of fp32 logits
// up to V = 262144).  Each chunk streams the whole lm_head from memory again -- its logits GEMM, the d_hidden GEMM
// and d_weight's read and write, 5 [V, H] passes per chunk for a divergence -- which at a real vocabulary (V =
// 151936, H = 896: 519 MiB per fp32 head) the chunk's rows must amortise: reverse KL forward + backward at N = 1024,
// fp32, on a 2-core Zen 4 took 1.66x the 4-GEMM floor with the 55-row chunks of 64 MiB and 1.16x with 256 rows
// (median of 3 interleaved rounds, 2026-12-02; docs/kernels.md has the other ops).
constexpr int64_t kDefaultWorkspace = int64_t(64) << 20, kMaxAutoWorkspace = int64_t(512) << 20;

int64_t workspace_budget(int64_t budget, int64_t N, int64_t V, int64_t elem, int sides, bool grads) {
  if (budget > 0) return budget;
  const int64_t rows = std::min<int64_t>(std::max<int64_t>(N, 1), grads ? kPackedRowsGrad : kPackedRowsNoGrad);
  const int64_t want = static_cast<int64_t>(std::max(1, sides)) * rows * std::max<int64_t>(V, 1) * elem;
  return std::max(kDefaultWorkspace, std::min(want, kMaxAutoWorkspace));
}

// The tile of the top-k: its [rows, tile] logits are scanned right after the tile GEMM wrote them, from L2 or L3.
// 2 MiB: 512 rows x 1024 fp32 logits.  Narrower tiles were no faster (512 rows x 512 / 1024 / 2048 within the
// noise, thread CPU time on a 1 MiB-L2 Zen 4), and each packed tile costs ~130-150 KiB of resident memory beyond
// its data (mincore after MKL's pack: 63 tiles of 512 at H = 256 occupy 39.6 MiB, 32 of 1024 35.6, 16 of 2048
// 33.6, for 31.25 MiB of weight).
constexpr int64_t kTopkTileBytes = int64_t(2) << 20;

// Rows per top-k group: the packed tile GEMM reads its weight slice once per group, so its cost per logit falls
// with the rows (single-threaded cblas_sgemm_compute against one [2048, 32000] GEMM at H = 256: 128 rows 1.07x,
// 256 rows 1.00x, 512 rows 0.96x).
constexpr int64_t kTopkRows = 512;

int64_t topk_rows(int64_t N, int threads, int64_t row_bytes, int64_t budget) {
  const int64_t t = std::max(1, threads), n = std::max<int64_t>(N, 1);
  int64_t rows = env_mib("COPSD_CPU_TOPK_ROWS", 0);  // a plain count; env_mib only parses it
  if (rows <= 0) {
    // The fewest groups of at most kTopkRows rows that are a multiple of the thread count, equal-sized.
    const int64_t per_thread = (n + t - 1) / t;
    const int64_t groups = t * ((per_thread + kTopkRows - 1) / kTopkRows);
    rows = (n + groups - 1) / groups;
  }
  rows = std::min(rows, budget / std::max<int64_t>(1, t * row_bytes));
  return std::max<int64_t>(1, std::min(rows, n));
}

int64_t topk_tile(int64_t rows, int64_t elem) {
  const int64_t set = env_mib("COPSD_CPU_TOPK_TILE", 0);  // a plain count; env_mib only parses it
  if (set > 0) return set;
  const int64_t t = kTopkTileBytes / std::max<int64_t>(1, rows * elem);
  return std::max<int64_t>(256, t / 256 * 256);
}

// A few-row group's d_hidden product is a matrix-vector product, which a BLAS may accumulate in one running sum per
// output (see FEW_ROWS below): a tile of at most 4096 entries bounds that sum's length as DX_BLOCK does there.
constexpr int64_t kGradTileMax = 4096;

int64_t grad_tile(int64_t rows, int64_t V, int threads, int64_t elem) {
  if (env_mib("COPSD_CPU_TOPK_TILE", 0) > 0) return topk_tile(rows, elem);
  const int64_t per = (V + 2 * std::max(1, threads) - 1) / (2 * std::max(1, threads));  // 2 tiles per thread
  const int64_t even = std::max<int64_t>(256, (per + 255) / 256 * 256);
  return std::min({topk_tile(rows, elem), kGradTileMax, even});
}

// Default budget, counted as packed_resident() (about the weight's fp32 size per packed copy): a divergence
// at V = 32000 packs both lm_heads up to H = 768 in fp32, and in bf16 with gradients (the student's fp32 copy,
// its packed copy and the teacher's packed copy: 3 x 62.5 MiB at H = 512) up to H = 512.
constexpr int64_t kDefaultPackMiB = 192;

PackBudget::PackBudget() {
  if (env_flag_off("COPSD_CPU_PACK")) return;
  left = env_mib("COPSD_CPU_PACK_MB", kDefaultPackMiB) << 20;
}

// ------------------------------------------------------------------------------ LmHead

LmHead::LmHead(const Tensor& W, at::ScalarType st, at::ScalarType x_st, int64_t rows, int64_t N, int64_t budget,
               PackBudget& pack, bool grads, int64_t tile, bool tile_grads)
    : W_(W), st_(st), upcast_(W.scalar_type() != st), grads_(grads), tiled_(tile > 0), rows_(rows) {
  const int64_t V = W.size(0), H = W.size(1);
  const int64_t elem = st == at::kDouble ? 8 : 4;
  vb_ = tile > 0 ? std::min(std::max<int64_t>(V, 1), tile) : upcast_ ? upcast_block(V, H, elem, budget) : V;
  const int64_t chunks = rows > 0 ? (N + rows - 1) / rows : 0;
  // The bf16 kernel: streamed from W (each panel packed right before its products) unless the packed copy is kept
  // below; streaming reads W's rows in place, so a W with another layout (a transposed view) takes it only packed.
  const int mode = x_st == at::kBFloat16 && W.scalar_type() == at::kBFloat16 && st == at::kFloat ? bf16_gemm_on() : 0;
  const bool bf16 = mode > 0;
  bf16_ = bf16 && W.stride(1) == 1;
  // The gradient GEMMs too (mode `all`): they read W's rows in place (streamed) or pack them (pack_wt).
  bf16g_ = (grads || tile_grads) && mode == 2 && W.stride(1) == 1;
  // fp32 logits on the kernel of gemm_f32.h at this level (0: MKL): from the packed copy below, or streamed (each panel
  // packed right before its products) where there is none.
  f32_ = st == at::kFloat ? f32_gemm_use() : 0;
  // Packed copies only when they pay: the weight is read by >= 2 chunk GEMMs.
  if (chunks < 2 || V == 0 || H == 0 || pack.left <= 0) return;
  // Its packed copy (bf16, in blocks of vb_ rows, each padded to whole panels) takes about half the fp32 copy's
  // bytes; with gradients, the whole up-cast copy too if it fits (the d_hidden products stay fp32), or with the
  // gradients on the bf16 kernel too, W packed as row pairs for them (about the packed copy's size again).
  if (bf16) {
    auto bf16_bytes = [&](int64_t block) {
      return (V + block - 1) / block * bf16dot::packed_w_words(block, H) * static_cast<int64_t>(sizeof(uint32_t));
    };
    const int64_t vb_copy = tile > 0 ? vb_ : V;
    if (bf16g_) {
      if (bf16_bytes(vb_) <= pack.left) {
        pack.left -= bf16_bytes(vb_);
        pack_ = true;
        const int64_t wt_bytes = bf16dot::pairs(V) * bf16dot::pair_stride(H) * static_cast<int64_t>(sizeof(uint32_t));
        if (wt_bytes <= pack.left) {
          pack.left -= wt_bytes;
          wt_ = true;
        }
      }
      return;  // what does not fit is streamed
    }
    if (grads && V * H * elem + bf16_bytes(vb_copy) <= pack.left) {
      pack.left -= V * H * elem + bf16_bytes(vb_copy);
      copy_ = true;
      vb_ = vb_copy;
      bf16_ = pack_ = true;
      return;
    }
    if (bf16_bytes(vb_) <= pack.left) {
      pack.left -= bf16_bytes(vb_);
      bf16_ = pack_ = true;
      return;
    }
    if (bf16_) return;  // streamed: an MKL-packed fp32 copy (twice the size) would not fit either
  }
  // fp32 packed copies: for the kernel of gemm_f32.h where it runs (f32_), else for MKL's packed GEMM if found.
  const bool api = st == at::kFloat && (f32_ || (have_packed_api() && fits_int(V) && fits_int(H) && fits_int(rows) &&
                                                 fits_int(V * H)));
  auto packed_bytes = [&](int64_t block) {
    int64_t bytes = 0;
    for (int64_t v0 = 0; v0 < V; v0 += block)
      bytes += f32_ ? f32dot::packed_w_floats(f32_, std::min(block, V - v0), H) * static_cast<int64_t>(sizeof(float))
                    : packed_resident(std::min(block, V - v0), H);
    return bytes;
  };
  // A low-precision lm_head whose d_hidden products are wanted too: only with COPSD_CPU_UPCAST_COPY=1, one whole
  // up-cast copy (packed in one block) serves every chunk's GEMMs instead of up-casting the rows again per tile and
  // chunk for d_hidden.  Off by default: the copy is V*H*4 more bytes at the peak for 0-2.4 % of the time
  // (docs/kernels.md, "CPU GEMMs: the lm_head packed once per call").
  const EnvSwitch keep = env_switch("COPSD_CPU_UPCAST_COPY");
  if (upcast_ && grads && keep == EnvSwitch::kOn) {
    const int64_t bytes = V * H * elem + (api ? packed_bytes(V) : 0);
    if (bytes <= pack.left) {
      pack.left -= bytes;
      copy_ = true;
      vb_ = tile > 0 ? vb_ : V;
      pack_ = api;
      return;
    }
  }
  if (!api) return;
  const int64_t bytes = packed_bytes(vb_);
  if (bytes > pack.left) return;
  pack.left -= bytes;
  pack_ = true;
}

void LmHead::prepare() {
  if (copy_ && !full_.defined()) {
    full_ = cached_empty({W_.size(0), W_.size(1)}, st_);  // not marked for huge pages: see docs/kernels.md
    upcast_parallel(W_, full_);
  }
  if (bf16_ && pack_ && !wpack_.defined()) {
    pack_bf16();
  } else if (pack_ && !bf16_ && f32_ && !fpack_.defined()) {
    pack_f32();
  } else if (pack_ && !bf16_ && !f32_ && packed_.empty()) {
    pack_weight();
  }
  if (wt_ && !wtpack_.defined()) pack_wt();
}

// Panels per task of the parallel bf16 pack (64 x 16 rows of W).
constexpr int64_t kPackPanels = 16;

void LmHead::pack_bf16() {
  const int64_t V = W_.size(0), H = W_.size(1);
  const int64_t blocks = (V + vb_ - 1) / vb_, per_block = bf16dot::panels(vb_);
  woff_ = bf16dot::packed_w_words(vb_, H);
  const int64_t bytes = blocks * woff_ * static_cast<int64_t>(sizeof(uint32_t));
  wpack_ = cached_empty({blocks * woff_}, at::kInt);
  const Tensor Wc = W_.stride(1) == 1 ? W_ : W_.contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(Wc.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint32_t*>(wpack_.data_ptr<int32_t>());
  const int64_t ldw = Wc.stride(0), tasks_per_block = (per_block + kPackPanels - 1) / kPackPanels;
  const int threads = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  parallel_tasks(blocks * tasks_per_block, threads, false, [&](int, int64_t t) {
    const int64_t b = t / tasks_per_block, v0 = b * vb_, n = std::min(vb_, V - v0);
    const int64_t p0 = (t % tasks_per_block) * kPackPanels;
    const int64_t p1 = std::min(p0 + kPackPanels, bf16dot::panels(n));
    if (p0 < p1) bf16dot::pack_w(src + v0 * ldw, ldw, n, H, p0, p1, dst + b * woff_);
  });
  ++n_packs;
  n_packed_bytes += bytes;
  n_packed_reserved += bytes;
}

void LmHead::pack_f32() {
  const int64_t V = W_.size(0), H = W_.size(1);
  const int64_t blocks = (V + vb_ - 1) / vb_, per_block = f32dot::panels(f32_, vb_), P = f32dot::panel_rows(f32_);
  foff_ = f32dot::packed_w_floats(f32_, vb_, H);
  fpack_ = cached_empty({blocks * foff_}, at::kFloat);
  // From the whole up-cast copy of a low-precision weight, else from W (rows with unit stride along H; another
  // layout, e.g. a transposed view, is copied first, as the MKL pack does).
  const Tensor src_w = full_.defined() ? full_ : W_;
  const Tensor Wc = !upcast_ || full_.defined() ? (src_w.stride(1) == 1 ? src_w : src_w.contiguous()) : Tensor();
  float* dst = fpack_.data_ptr<float>();
  const int64_t tasks_per_block = (per_block + kPackPanels - 1) / kPackPanels;
  const int threads = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  std::vector<Tensor> scratch(threads);  // each thread's up-cast rows of a low-precision weight without a whole copy
  parallel_tasks(blocks * tasks_per_block, threads, false, [&](int tid, int64_t t) {
    const int64_t b = t / tasks_per_block, v0 = b * vb_, n = std::min(vb_, V - v0);
    const int64_t p0 = (t % tasks_per_block) * kPackPanels;
    const int64_t p1 = std::min(p0 + kPackPanels, f32dot::panels(f32_, n));
    if (p0 >= p1) return;
    const int64_t r0 = p0 * P, nr = std::min(n, p1 * P) - r0;
    Tensor rows = Wc.defined() ? Wc.narrow(0, v0 + r0, nr) : weight_rows(v0 + r0, nr, scratch[tid]);
    f32dot::pack_w(f32_, rows.data_ptr<float>(), rows.stride(0), nr, H, 0, p1 - p0, dst + b * foff_ + p0 * P * H);
  });
  ++n_packs;
  const int64_t bytes = blocks * foff_ * static_cast<int64_t>(sizeof(float));
  n_packed_bytes += bytes;
  n_packed_reserved += bytes;
  if (!grads_) buf_ = Tensor();
}

namespace {

// x [m, H] as the kernel of gemm_f32.h reads it, in place (row stride ldx), where its rows are H apart or more with
// unit stride along H; else (e.g. an expanded x whose rows share storage) a contiguous copy.
Tensor f32_rows(const Tensor& x, int64_t H, int64_t& ldx) {
  const int64_t m = x.size(0);
  const bool in_place = (x.stride(1) == 1 || H <= 1) && (x.stride(0) >= H || m <= 1);
  const Tensor r = in_place ? x : x.contiguous();
  ldx = m <= 1 ? H : r.stride(0);
  return r;
}

}  // namespace

// Counts one chunk's logits GEMM on the kernel of gemm_f32.h: as packed or unpacked (streamed), and as an f32 one.
void LmHead::count_f32_gemm() const {
  ++(pack_ ? n_packed_gemms : n_plain_gemms);
  ++n_f32_gemms;
}

// out[m, blocks b0..b1) = x @ (those blocks of W)^T on the kernel of gemm_f32.h; outside a parallel region the
// panels are handed out to all threads.
void LmHead::f32_logits(const Tensor& x_in, int64_t b0, int64_t b1, float* out, int64_t ldo) {
  const int64_t V = W_.size(0), H = W_.size(1), m = x_in.size(0);
  int64_t ldx = H;
  const Tensor x = f32_rows(x_in, H, ldx);
  const float* px = x.data_ptr<float>();
  const float* w = fpack_.data_ptr<float>();
  const int64_t per_block = f32dot::panels(f32_, vb_);
  const int threads = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  if (threads == 1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * vb_, n = std::min(vb_, V - v0);
      f32dot::gemm(f32_, px, ldx, m, w + b * foff_, n, H, 0, f32dot::panels(f32_, n), out + (v0 - b0 * vb_), ldo);
    }
    return;
  }
  // Tasks of kPackPanels panels (1024 vocabulary rows), dynamically.
  const int64_t tasks_per_block = (per_block + kPackPanels - 1) / kPackPanels;
  parallel_tasks((b1 - b0) * tasks_per_block, threads, true, [&](int, int64_t t) {
    const int64_t b = b0 + t / tasks_per_block, v0 = b * vb_, n = std::min(vb_, V - v0);
    const int64_t p0 = (t % tasks_per_block) * kPackPanels;
    const int64_t p1 = std::min(p0 + kPackPanels, f32dot::panels(f32_, n));
    if (p0 < p1) f32dot::gemm(f32_, px, ldx, m, w + b * foff_, n, H, p0, p1, out + (v0 - b0 * vb_), ldo);
  });
}

// Vocabulary rows per up-cast block of logits() with a caller's scratch: 3.5 MiB of fp32 at H = 896.
constexpr int64_t kScratchUpcastRows = 1024;

// Vocabulary rows per task of a streamed fp32 GEMM split over the threads (logits() outside a parallel region).
constexpr int64_t kStreamRows = 1024;

bool LmHead::f32_streamed(const Tensor& x_in, int64_t v0, int64_t n, float* out, int64_t ldo, Tensor& scratch) {
  const int64_t H = W_.size(1), m = x_in.size(0);
  const int64_t P = f32dot::panel_rows(f32_);
  int64_t ldx = H;
  const Tensor x = f32_rows(x_in, H, ldx);
  const float* px = x.data_ptr<float>();
  // Up-cast (or W's own) rows in blocks of kScratchUpcastRows, each block's panels packed one at a time into this
  // thread's panel buffer and multiplied while it is in cache.
  thread_local std::vector<float> panel;
  if (static_cast<int64_t>(panel.size()) < P * H) panel.resize(static_cast<size_t>(P * H));
  for (int64_t r0 = 0; r0 < n; r0 += kScratchUpcastRows) {
    const int64_t nr = std::min(kScratchUpcastRows, n - r0);
    const Tensor rows = weight_rows(v0 + r0, nr, scratch);
    if (rows.stride(1) != 1 && H > 1) return false;  // checked on the first block: the layout is the same for all
    const float* w = rows.data_ptr<float>();
    const int64_t ldw = rows.stride(0);
    for (int64_t p = 0; p * P < nr; ++p) {
      const int64_t nn = std::min(P, nr - p * P);
      f32dot::pack_w(f32_, w + p * P * ldw, ldw, nn, H, 0, 1, panel.data());
      f32dot::gemm(f32_, px, ldx, m, panel.data(), nn, H, 0, 1, out + r0 + p * P, ldo);
    }
  }
  return true;
}

// ---- The gradient GEMMs on the bf16 kernel (COPSD_CPU_BF16_GEMM=all)

// Vocabulary entries per sub-tile of grad_tile_bf16: its G block (two bf16 copies of [m, 256]) and, streamed, its W
// rows as pairs ([128, padded(H)] words) are packed per sub-tile, each used right away while in L2.  Even, so that
// the pairs of the packed-once W (wtpack_) line up with every sub-tile of an even tile start.
constexpr int64_t kGradSub = 256;

void LmHead::pack_wt() {
  const int64_t V = W_.size(0), H = W_.size(1), ld = bf16dot::pair_stride(H), K2 = bf16dot::pairs(V);
  wtpack_ = cached_empty({K2 * ld}, at::kInt);
  const auto* src = reinterpret_cast<const uint16_t*>(W_.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint32_t*>(wtpack_.data_ptr<int32_t>());
  const int64_t ldw = W_.stride(0), step = kGradSub / 2;  // pairs per task
  const int threads = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  parallel_tasks((K2 + step - 1) / step, threads, false, [&](int, int64_t t) {
    const int64_t k0 = t * step, rows = std::min(2 * step, V - 2 * k0);
    bf16dot::pack_row_pairs_bf16(src + 2 * k0 * ldw, ldw, rows, H, dst + k0 * ld, ld);
  });
  const int64_t bytes = K2 * ld * static_cast<int64_t>(sizeof(uint32_t));
  ++n_packs;
  n_packed_bytes += bytes;
  n_packed_reserved += bytes;
}

int64_t LmHead::grad_x_words(int64_t m) const { return bf16dot::pairs(m) * bf16dot::pair_stride(W_.size(1)); }

void LmHead::pack_grad_x(const Tensor& x, uint32_t* out) const {
  const int64_t H = W_.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == H && (x.stride(1) == 1 || H <= 1),
              "pack_grad_x: fp32 [m, H] rows expected");
  bf16dot::pack_row_pairs(x.data_ptr<float>(), x.stride(0), x.size(0), H, out, bf16dot::pair_stride(H));
  ++n_bf16_grads;
}

void LmHead::grad_tile_bf16(const float* z, int64_t ldz, int64_t m, int64_t v0, int64_t n, const uint32_t* xpair,
                            float* part, int64_t ldp, float* dw, bool first) {
  const int64_t V = W_.size(0), H = W_.size(1), ld = bf16dot::pair_stride(H), lr = kGradSub + 16;
  // The thread's buffers: G as pairs along the vocabulary (d_hidden) and along the rows (d_weight), and the W rows
  // of a sub-tile as pairs where they are not packed once per call.
  thread_local std::vector<uint32_t> g_v, g_r, w_r;
  const int64_t sub_pairs = kGradSub / 2;
  if (static_cast<int64_t>(g_v.size()) < m * sub_pairs) g_v.resize(static_cast<size_t>(m * sub_pairs));
  const int64_t by_row = bf16dot::pairs(m) * lr;
  if (static_cast<int64_t>(g_r.size()) < by_row) g_r.resize(static_cast<size_t>(by_row));
  const auto* wsrc = reinterpret_cast<const uint16_t*>(W_.data_ptr<at::BFloat16>());
  const auto* wt = wt_ ? reinterpret_cast<const uint32_t*>(wtpack_.data_ptr<int32_t>()) : nullptr;
  for (int64_t s0 = v0; s0 < v0 + n; s0 += kGradSub) {
    const int64_t ns = std::min(kGradSub, v0 + n - s0), K2 = bf16dot::pairs(ns);
    const float* zs = z + (s0 - v0);
    // d_hidden: part += G[:, sub] W[sub], reduced over the sub-tile's vocabulary pairs.  The packed-once pairs serve
    // a sub-tile whose pairs are theirs (even start; an odd length only at the vocabulary's end, where the packed
    // pad is 0); any other is packed here (its odd last pair padded with 0).
    bf16dot::pack_grad(zs, ldz, m, ns, g_v.data(), sub_pairs, g_r.data(), lr);
    const uint32_t* b;
    if (wt != nullptr && s0 % 2 == 0 && (ns % 2 == 0 || s0 + ns == V)) {
      b = wt + (s0 / 2) * ld;
    } else {
      if (static_cast<int64_t>(w_r.size()) < sub_pairs * ld) w_r.resize(static_cast<size_t>(sub_pairs * ld));
      bf16dot::pack_row_pairs_bf16(wsrc + s0 * W_.stride(0), W_.stride(0), ns, H, w_r.data(), ld);
      b = w_r.data();
    }
    bf16dot::gemm_words(g_v.data(), sub_pairs, 1, m, b, ld, H, K2, part, ldp, true);
    // d_weight rows of the sub-tile (+)= G[:, sub]^T x, reduced over the chunk's row pairs.
    bf16dot::gemm_words(g_r.data(), 1, lr, ns, xpair, ld, H, bf16dot::pairs(m), dw + s0 * H, H, !first);
  }
}

// Words of the header of a packed x kept in a caller's scratch: the x it was packed from (data pointer, rows, row
// stride, H) as int64 values.
constexpr int64_t kXHeader = 8;

void LmHead::bf16_logits(const Tensor& x_in, int64_t b0, int64_t b1, float* out, int64_t ldo, Tensor& xpack) {
  const int64_t V = W_.size(0), H = W_.size(1), m = x_in.size(0);
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const float* xp = x.data_ptr<float>();
  const int64_t key[4] = {static_cast<int64_t>(reinterpret_cast<uintptr_t>(xp)), m, x.stride(0), H};
  const int64_t need = kXHeader + bf16dot::packed_x_words(m, H);
  bool same = xpack.defined() && xpack.scalar_type() == at::kInt && xpack.numel() >= need &&
              std::memcmp(xpack.data_ptr<int32_t>(), key, sizeof(key)) == 0;
  if (!same) {
    if (!xpack.defined() || xpack.scalar_type() != at::kInt || xpack.numel() < need)
      xpack = at::empty({need}, at::TensorOptions().dtype(at::kInt));
    bf16dot::pack_x(xp, x.stride(0), m, H, reinterpret_cast<uint32_t*>(xpack.data_ptr<int32_t>() + kXHeader));
    std::memcpy(xpack.data_ptr<int32_t>(), key, sizeof(key));
  }
  const auto* a = reinterpret_cast<const uint32_t*>(xpack.data_ptr<int32_t>() + kXHeader);
  const auto* w = pack_ ? reinterpret_cast<const uint32_t*>(wpack_.data_ptr<int32_t>()) : nullptr;
  const auto* src = reinterpret_cast<const uint16_t*>(W_.data_ptr<at::BFloat16>());
  // Panel i of the flattened blocks b0..b1: block b0 + i / per_block, its panel i % per_block.
  const int64_t per_block = bf16dot::panels(vb_);
  int64_t total = 0;
  for (int64_t b = b0; b < b1; ++b) total += bf16dot::panels(std::min(vb_, V - b * vb_));
  auto run = [&](int64_t i0, int64_t i1) {
    // Streamed: the calling thread's panel buffer (kept by the thread between calls: <= 1 MiB up to H = 8192).
    thread_local std::vector<uint32_t> panel;
    if (w == nullptr && static_cast<int64_t>(panel.size()) < bf16dot::packed_w_words(bf16dot::kPanel, H))
      panel.resize(static_cast<size_t>(bf16dot::packed_w_words(bf16dot::kPanel, H)));
    for (int64_t i = i0; i < i1;) {
      const int64_t b = b0 + i / per_block, p = i % per_block, v0 = b * vb_, n = std::min(vb_, V - v0);
      const int64_t p1 = std::min(bf16dot::panels(n), p + (i1 - i));
      if (w != nullptr) {
        bf16dot::gemm(a, m, w + b * woff_, n, H, p, p1, out + (b - b0) * vb_, ldo);
      } else {
        bf16dot::gemm_streamed(a, m, src + v0 * W_.stride(0), W_.stride(0), n, H, p, p1, out + (b - b0) * vb_, ldo,
                               panel.data());
      }
      i += p1 - p;
    }
  };
  const int threads = omp_in_parallel() ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), total));
  if (threads <= 1) {
    run(0, total);
    return;
  }
  parallel_tasks(threads, threads, false, [&](int, int64_t t) { run(t * total / threads, (t + 1) * total / threads); });
}

// Counts one chunk's logits GEMM on the bf16 kernel: as packed or unpacked (streamed), and as a bf16 one.
void LmHead::count_bf16_gemm() const {
  ++(pack_ ? n_packed_gemms : n_plain_gemms);
  ++n_bf16_gemms;
}

Tensor LmHead::block(int64_t v0, int64_t n) {
  if (full_.defined()) return full_.narrow(0, v0, n);
  if (!buf_.defined()) buf_ = cached_empty({vb_, W_.size(1)}, st_);
  Tensor b = buf_.narrow(0, 0, n);
  upcast_parallel(W_.narrow(0, v0, n), b);
  return b;
}

// Packs one [n, H] source block (rows v0.. of W, or its up-cast) into dst.
void LmHead::pack_block(Tensor src, Tensor& dst) const {
  const auto& api = packed_api();
  const int64_t H = W_.size(1), n = src.size(0);
  // B = src^T [H, n]: a row-major [n, H] source with unit stride along H is B transposed; a source with unit
  // stride along the vocabulary (a transposed view) is B itself.  Any other layout is copied first.
  int trans, ld;
  if (src.stride(1) == 1 && src.stride(0) >= std::max<int64_t>(1, H) && fits_int(src.stride(0))) {
    trans = kTrans;
    ld = static_cast<int>(src.stride(0));
  } else if (src.stride(0) == 1 && src.stride(1) >= std::max<int64_t>(1, n) && fits_int(src.stride(1))) {
    trans = kNoTrans;
    ld = static_cast<int>(src.stride(1));
  } else {
    src = src.contiguous();
    trans = kTrans;
    ld = static_cast<int>(H);
  }
  api.pack(kRowMajor, kBMatrix, trans, static_cast<int>(rows_), static_cast<int>(n), static_cast<int>(H), 1.0f,
           src.data_ptr<float>(), ld, reinterpret_cast<float*>(dst.data_ptr<uint8_t>()));
}

void LmHead::pack_weight() {
  const auto& api = packed_api();
  const int64_t V = W_.size(0), H = W_.size(1);
  const int64_t blocks = (V + vb_ - 1) / vb_;
  // From the buffer cache (2 MiB aligned; below 1 MiB torch's allocator, 64-byte aligned).  MKL forbids moving a
  // packed buffer: it never moves, and a reused one is packed afresh.
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n = std::min(vb_, V - b * vb_);
    const size_t bytes = api.get_size(kBMatrix, static_cast<int>(rows_), static_cast<int>(n), static_cast<int>(H));
    packed_.push_back(cached_empty({static_cast<int64_t>(bytes)}, at::kByte, packed_resident(n, H)));
    n_packed_bytes += packed_resident(n, H);
    n_packed_reserved += static_cast<int64_t>(bytes);
  }
  if (!tiled_ || blocks == 1) {
    // MKL's own threaded pack, block by block (an up-cast block in the reused buffer).  A copy packed inside a
    // parallel region (single-threaded) would make every later GEMM on it single-threaded too.
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t v0 = b * vb_, n = std::min(vb_, V - v0);
      pack_block(upcast_ ? block(v0, n) : W_.narrow(0, v0, n), packed_[b]);  // block(): the whole copy if any
    }
  } else {
    // The tiles of the top-k (each computed single-threaded): one tile per thread, each up-cast into the thread's
    // own buffer and packed single-threaded.  MKL's own threaded pack of a block of a few thousand rows costs more
    // in thread start-up than it packs (measured on a 2-core Xeon at V = 32000, H = 256: 16 blocks of 2048 in
    // ~6 ms single-threaded, 30-130 ms threaded).
    std::vector<Tensor> scratch(std::max(1, at::get_num_threads()));  // each thread's up-cast tile
    parallel_tasks(blocks, at::get_num_threads(), true, [&](int tid, int64_t b) {
      const int64_t v0 = b * vb_, n = std::min(vb_, V - v0);
      Tensor src = full_.defined() || !upcast_ ? (full_.defined() ? full_ : W_).narrow(0, v0, n) : Tensor();
      if (!src.defined()) {
        if (!scratch[tid].defined()) scratch[tid] = cached_empty({vb_ * H}, st_);
        src = scratch[tid].narrow(0, 0, n * H).view({n, H});
        upcast_rows(W_.narrow(0, v0, n), src);
      }
      pack_block(src, packed_[b]);
    });
  }
  ++n_packs;
  // The up-cast buffer is needed again only by the d_hidden products of a low-precision weight.
  if (!grads_) buf_ = Tensor();
}


void LmHead::logits(const Tensor& x_in, Tensor out, bool count, Tensor* scratch) {
  const int64_t V = W_.size(0), H = W_.size(1), m = x_in.size(0);
  const bool out_rows = out.stride(1) == 1 && out.stride(0) >= V && fits_int(out.stride(0));
  prepare();
  if (bf16_ && out_rows && m > 0) {
    Tensor xpack;  // packed afresh: another call's x may reuse this one's storage
    bf16_logits(x_in, 0, (V + vb_ - 1) / vb_, out.data_ptr<float>(), out.stride(0), xpack);
    if (count) count_bf16_gemm();
    return;
  }
  if (pack_ && f32_ && out_rows && m > 0) {
    f32_logits(x_in, 0, (V + vb_ - 1) / vb_, out.data_ptr<float>(), out.stride(0));
    if (count) count_f32_gemm();
    return;
  }
  if (pack_ && !bf16_ && out_rows && fits_int(m) && m > 0) {
    Tensor x = (x_in.stride(1) == 1 && x_in.stride(0) >= H && fits_int(x_in.stride(0))) ? x_in : x_in.contiguous();
    const int lda = static_cast<int>(std::max<int64_t>(x.stride(0), H));
    const auto& api = packed_api();
    float* c = out.data_ptr<float>();
    int64_t b = 0;
    for (int64_t v0 = 0; v0 < V; v0 += vb_, ++b) {
      const int64_t n = std::min(vb_, V - v0);
      api.compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m), static_cast<int>(n), static_cast<int>(H),
                  x.data_ptr<float>(), lda, reinterpret_cast<const float*>(packed_[b].data_ptr<uint8_t>()),
                  static_cast<int>(n), 0.0f, c + v0, static_cast<int>(out.stride(0)));
    }
    if (count) ++n_packed_gemms;
    return;
  }
  if (f32_ && !pack_ && out_rows && m > 0 && (W_.stride(1) == 1 || upcast_ || H <= 1)) {
    // Streamed through the fp32 kernel: single-threaded inside a parallel region (the caller's `scratch`), else
    // vocabulary blocks handed out to all threads, each with its own up-cast scratch.
    const int threads = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
    float* c = out.data_ptr<float>();
    const int64_t ldo = out.stride(0);
    bool done = true;
    if (threads == 1) {
      Tensor own;
      done = f32_streamed(x_in, 0, V, c, ldo, scratch != nullptr ? *scratch : own);
    } else {
      std::vector<Tensor> sc(threads);
      std::atomic<bool> ok{true};
      parallel_tasks((V + kStreamRows - 1) / kStreamRows, threads, true, [&](int tid, int64_t t) {
        const int64_t v0 = t * kStreamRows;
        if (!f32_streamed(x_in, v0, std::min(kStreamRows, V - v0), c + v0, ldo, sc[tid])) ok = false;
      });
      done = ok;
    }
    if (done) {
      if (count) count_f32_gemm();
      return;
    }
  }
  if (count) ++n_plain_gemms;
  if (!upcast_ || full_.defined()) {
    at::mm_out(out, x_in, (full_.defined() ? full_ : W_).t());
    return;
  }
  // Up-cast per block: into the caller's scratch (weight_rows), else into the head's one shared buffer (block).
  const int64_t step = scratch != nullptr ? kScratchUpcastRows : vb_;
  for (int64_t v0 = 0; v0 < V; v0 += step) {
    const int64_t n = std::min(step, V - v0);
    Tensor blk = out.narrow(1, v0, n);
    at::mm_out(blk, x_in, (scratch != nullptr ? weight_rows(v0, n, *scratch) : block(v0, n)).t());
  }
}

void LmHead::logits_block(const Tensor& x_in, int64_t b, Tensor out, Tensor& scratch, bool count) {
  const int64_t V = W_.size(0), H = W_.size(1), m = x_in.size(0);
  const int64_t v0 = b * vb_, n = std::min(vb_, V - v0);
  TORCH_CHECK(v0 >= 0 && n > 0 && out.size(0) == m && out.size(1) == n, "logits_block: bad block or output");
  const bool out_rows = out.stride(1) == 1 && out.stride(0) >= n && fits_int(out.stride(0));
  if (bf16_ && out_rows && m > 0) {
    bf16_logits(x_in, b, b + 1, out.data_ptr<float>(), out.stride(0), scratch);
    if (count && b == 0) count_bf16_gemm();  // a chunk's logits (all its blocks) counted once
    return;
  }
  if (pack_ && f32_ && out_rows && m > 0) {
    f32_logits(x_in, b, b + 1, out.data_ptr<float>(), out.stride(0));
    if (count && b == 0) count_f32_gemm();  // a chunk's logits (all its blocks) counted once
    return;
  }
  if (pack_ && !bf16_ && out_rows && fits_int(m) && m > 0) {
    Tensor x = (x_in.stride(1) == 1 && x_in.stride(0) >= H && fits_int(x_in.stride(0))) ? x_in : x_in.contiguous();
    const int lda = static_cast<int>(std::max<int64_t>(x.stride(0), H));
    packed_api().compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m), static_cast<int>(n),
                         static_cast<int>(H), x.data_ptr<float>(), lda,
                         reinterpret_cast<const float*>(packed_[b].data_ptr<uint8_t>()), static_cast<int>(n), 0.0f,
                         out.data_ptr<float>(), static_cast<int>(out.stride(0)));
    if (count && b == 0) ++n_packed_gemms;  // the counters count a chunk's logits (all its blocks) once
    return;
  }
  if (f32_ && !pack_ && out_rows && m > 0 && (W_.stride(1) == 1 || upcast_ || H <= 1) &&
      f32_streamed(x_in, v0, n, out.data_ptr<float>(), out.stride(0), scratch)) {
    if (count && b == 0) count_f32_gemm();
    return;
  }
  if (count && b == 0) ++n_plain_gemms;
  at::mm_out(out, x_in, weight_block(b, scratch).t());
}

Tensor LmHead::weight_rows(int64_t v0, int64_t n, Tensor& scratch) {
  const int64_t V = W_.size(0), H = W_.size(1);
  TORCH_CHECK(v0 >= 0 && n > 0 && v0 + n <= V, "weight_rows: bad range");
  if (full_.defined()) return full_.narrow(0, v0, n);
  if (!upcast_) return W_.narrow(0, v0, n);
  // (scratch may hold a bf16 logits_block's packed x instead: another dtype)
  if (!scratch.defined() || scratch.scalar_type() != st_ || scratch.numel() < n * H)
    scratch = cached_empty({n * H}, st_);
  Tensor u = scratch.narrow(0, 0, n * H).view({n, H});
  upcast_rows(W_.narrow(0, v0, n), u);
  return u;
}

// A chunk of fewer rows than this gets its d_hidden product summed in vocabulary blocks (below).
constexpr int64_t FEW_ROWS = 16;
// Vocabulary entries per block of those partial products.
constexpr int64_t DX_BLOCK = 1024;

// d_hidden sums over the whole vocabulary.  A chunk of many rows is a real GEMM, which every BLAS blocks over
// that dimension (a two-level sum); a chunk of a few rows (small workspace, huge vocabulary, the last chunk) is
// a matrix-vector product, which a BLAS may accumulate in one running sum per output: at V = 151936 that is
// ~10x less accurate than the dense GEMM.  Few-row chunks therefore form one product per DX_BLOCK vocabulary
// entries and add the partial products (so the rounding no longer grows with V); adding the blocks with addmm_
// instead would not help, it continues the same running sum.
void LmHead::grads(const Tensor& dz, const Tensor& x, Tensor dx, Tensor& dw, bool first) {
  prepare();
  const int64_t V = W_.size(0), vb = vb_;
  const bool upcast = upcast_ && !full_.defined();  // up-cast per block and chunk (no whole copy)
  const Tensor& Wc = full_.defined() ? full_ : W_;
  const bool few = dz.size(0) < FEW_ROWS && V > DX_BLOCK;
  if (!upcast && !few) {
    at::mm_out(dx, dz, Wc);
  } else if (!few) {
    dx.zero_();
    for (int64_t v0 = 0; v0 < V; v0 += vb) {
      const int64_t n = std::min(vb, V - v0);
      dx.addmm_(dz.narrow(1, v0, n), block(v0, n));
    }
  } else {
    const int64_t b = upcast ? std::min(vb, DX_BLOCK) : DX_BLOCK;
    Tensor part = at::empty_like(dx);
    for (int64_t v0 = 0; v0 < V; v0 += b) {
      const int64_t n = std::min(b, V - v0);
      Tensor wb = upcast ? block(v0, n) : Wc.narrow(0, v0, n);
      at::mm_out(v0 == 0 ? dx : part, dz.narrow(1, v0, n), wb);
      if (v0 > 0) dx.add_(part);
    }
  }
  if (first) {
    at::mm_out(dw, dz.t(), x);
  } else {
    dw.addmm_(dz.t(), x);
  }
}

// ------------------------------------------------------------------------------ bindings (tests, profiling)

void register_gemm(pybind11::module& m) {
  m.def("packed_gemm_available", &have_packed_api,
        "whether torch's MKL packed-GEMM API was found (the chunk logits GEMMs then reuse one packed lm_head)");
  m.def("workspace_budget", &workspace_budget, pybind11::arg("budget"), pybind11::arg("N"), pybind11::arg("V"),
        pybind11::arg("elem"), pybind11::arg("sides"), pybind11::arg("grads"),
        "bytes of logits workspace an op call uses: budget when > 0, else the default sized for the call");
  m.def("chunk_rows", &chunk_rows, pybind11::arg("N"), pybind11::arg("V"), pybind11::arg("elem"),
        pybind11::arg("sides"), pybind11::arg("budget"), pybind11::arg("grads"),
        "rows per chunk of the chunked drivers for a workspace of budget bytes");
  m.def("gemm_stats", []() {
    pybind11::dict d;
    d["packs"] = n_packs.load();
    d["packed_bytes"] = n_packed_bytes.load();
    d["packed_reserved"] = n_packed_reserved.load();
    d["packed_gemms"] = n_packed_gemms.load();
    d["plain_gemms"] = n_plain_gemms.load();
    d["bf16_gemms"] = n_bf16_gemms.load();
    d["bf16_grads"] = n_bf16_grads.load();
    d["f32_gemms"] = n_f32_gemms.load();
    d["f32_grads"] = n_f32_grads.load();
    d["side_chunks"] = n_side_chunks.load();
    d["side_tile_chunks"] = n_side_tile_chunks.load();
    d["team_calls"] = n_team_calls.load();
    return d;
  }, "process-wide counts: lm_head packings (packed_bytes: what they occupy and the pack budget counts; "
        "packed_reserved: what MKL's get_size reserved), chunk logits GEMMs on a packed / unpacked lm_head, "
        "divergence chunks whose two logits GEMMs ran side by side (side_chunks), of those handed out per "
        "vocabulary tile (side_tile_chunks), tile gradient GEMMs on the fp32 kernel (f32_grads), divergence calls run "
        "on one team of threads (team_calls)");
  m.def("gemm_stats_reset", []() {
    n_packs = 0;
    n_packed_bytes = 0;
    n_packed_reserved = 0;
    n_packed_gemms = 0;
    n_plain_gemms = 0;
    n_bf16_gemms = 0;
    n_bf16_grads = 0;
    n_f32_gemms = 0;
    n_f32_grads = 0;
    n_side_chunks = 0;
    n_side_tile_chunks = 0;
    n_team_calls = 0;
  });
  m.def("bf16_gemm_available", &bf16_gemm_supported,
        "whether bf16 logits GEMMs can run on the AVX512_BF16 dot-product kernel (CPU support, COPSD_CPU_ISA)");
  // The bf16 kernel alone, for tests: out[m, n] = x[m, K] @ w[n, K]^T (bf16 in, fp32 out), W packed in blocks of
  // `block` rows (or streamed: each panel packed right before its products), the panels split over `threads`
  // threads.
  m.def("bf16_gemm", [](const Tensor& x, const Tensor& w, int64_t block, int64_t threads, bool streamed) {
    TORCH_CHECK(bf16_gemm_supported(), "bf16_gemm: this CPU (or COPSD_CPU_ISA) has no AVX512_BF16");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
                    w.dim() == 2 && x.size(1) == w.size(1),
                "bf16_gemm: x [m, K] and w [n, K], both bf16, expected");
    TORCH_CHECK(block > 0 && threads > 0, "bf16_gemm: block and threads must be positive");
    const int64_t m = x.size(0), n = w.size(0), K = x.size(1);
    const Tensor wc = w.contiguous(), xf = x.to(at::kFloat).contiguous();
    const Tensor out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat));
    const int64_t blocks = (n + block - 1) / block, words = bf16dot::packed_w_words(block, K);
    std::vector<uint32_t> wp(static_cast<size_t>(blocks * words));
    std::vector<uint32_t> xp(static_cast<size_t>(bf16dot::packed_x_words(m, K)));
    const auto* src = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t nb = std::min(block, n - b * block);
      bf16dot::pack_w(src + b * block * K, K, nb, K, 0, bf16dot::panels(nb), wp.data() + b * words);
    }
    bf16dot::pack_x(xf.data_ptr<float>(), K, m, K, xp.data());
    parallel_tasks(blocks * threads, static_cast<int>(threads), false, [&](int, int64_t t) {
      const int64_t b = t / threads, part = t % threads, nb = std::min(block, n - b * block);
      const int64_t P = bf16dot::panels(nb), p0 = part * P / threads, p1 = (part + 1) * P / threads;
      float* c = out.data_ptr<float>() + b * block;
      if (streamed) {
        std::vector<uint32_t> panel(static_cast<size_t>(bf16dot::packed_w_words(bf16dot::kPanel, K)));
        bf16dot::gemm_streamed(xp.data(), m, src + b * block * K, K, nb, K, p0, p1, c, n, panel.data());
      } else {
        bf16dot::gemm(xp.data(), m, wp.data() + b * words, nb, K, p0, p1, c, n);
      }
    });
    return out;
  }, pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("block"), pybind11::arg("threads") = 1,
        pybind11::arg("streamed") = false);
  m.def("f32_gemm_available", []() { return f32_gemm_use() > 0; },
        "whether fp32 logits take copsd's own fp32 GEMM kernel in this call, packed or streamed (AVX2 or AVX-512, "
        "COPSD_CPU_ISA, COPSD_CPU_F32_GEMM; by default where it measured faster than MKL's GEMM here)");
  m.def("f32_gemm_calibration", []() {
    const auto& c = f32_gemm_calibration();
    pybind11::dict d;
    d["level"] = c.level;
    d["measured"] = c.measured;
    d["kernel_s"] = c.kernel_s;
    d["mkl_s"] = c.mkl_s;
    d["agree"] = c.agree;
    d["kernel"] = c.kernel;
    d["keep"] = c.keep;
    d["grads_kernel_s"] = c.grads_kernel_s;
    d["grads_mkl_s"] = c.grads_mkl_s;
    d["grads_agree"] = c.grads_agree;
    d["grads"] = c.grads;
    return d;
  }, "the default's measurement of the fp32 kernel against MKL's GEMM (made now if not yet): level, measured, "
     "kernel_s, mkl_s (best rounds), agree, kernel (the default takes it), keep (the margin the kernel is given); "
     "at level 2 also the tile gradient products: grads_kernel_s, grads_mkl_s, grads_agree, grads");
  m.def("f32_calibration_pick", &f32_calibration_pick, "the default's rule on a measurement (for tests)",
        pybind11::arg("kernel_s"), pybind11::arg("mkl_s"), pybind11::arg("agree"), pybind11::arg("keep") = kCalKeep);
  // The fp32 kernel's in-place product alone, for tests: c (+)= a @ b on the kernel of ISA `level`, a read in place
  // with its strides (any), b [K, n] with unit stride along n, n a multiple of the level's panel (64 / 16).
  m.def("f32_mm", [](const Tensor& a, const Tensor& b, const std::optional<Tensor>& c, int64_t level) {
    TORCH_CHECK(level >= 1 && level <= f32_gemm_level(), "f32_mm: level ", level,
                " needs that ISA level here (COPSD_CPU_ISA; f32_gemm_level() is ", f32_gemm_level(), ")");
    TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.dim() == 2 && b.dim() == 2 &&
                    a.size(1) == b.size(0) && (b.stride(1) == 1 || b.size(1) <= 1),
                "f32_mm: a [m, K] and b [K, n] (unit stride along n), both fp32, expected");
    TORCH_CHECK(b.size(1) % f32dot::panel_rows(static_cast<int>(level)) == 0, "f32_mm: n must be a multiple of ",
                f32dot::panel_rows(static_cast<int>(level)), ", got ", b.size(1));
    Tensor out = c.has_value() ? *c : at::empty({a.size(0), b.size(1)}, at::TensorOptions().dtype(at::kFloat));
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == a.size(0) &&
                    out.size(1) == b.size(1) && out.stride(1) == 1,
                "f32_mm: c must be fp32 [m, n] with unit stride along n");
    TORCH_CHECK(f32_mm(static_cast<int>(level), a, b, out, c.has_value()), "f32_mm: layouts not taken");
    return out;
  }, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("c") = pybind11::none(), pybind11::arg("level"));
  m.def("f32_grads_level", [](int64_t H) { return f32_grads_use(H); },
        "the ISA level at which the tile gradient GEMMs of a hidden size H run on the fp32 kernel in this call (0: "
        "MKL's): COPSD_CPU_F32_GEMM's, COPSD_CPU_F32_GRADS, H a multiple of the kernel's panel");
  m.def("f32_gemm_level", &f32_gemm_level, "the ISA level of copsd's fp32 GEMM kernel here: 2 AVX-512, 1 AVX2, 0 none");
  // The fp32 kernel alone, for tests: out[m, n] = x[m, K] @ w[n, K]^T on the kernel of ISA `level` (2 AVX-512, 1 AVX2;
  // at most f32_gemm_level()), x read in place (any row stride), W packed in blocks of `block` rows, the panels of
  // each block split over `threads` threads.
  m.def("f32_gemm", [](const Tensor& x, const Tensor& w, int64_t block, int64_t threads, int64_t level) {
    TORCH_CHECK(level >= 1 && level <= f32_gemm_level(), "f32_gemm: level ", level,
                " needs that ISA level here (COPSD_CPU_ISA; f32_gemm_level() is ", f32_gemm_level(), ")");
    TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 2 && w.dim() == 2 &&
                    x.size(1) == w.size(1) && (x.stride(1) == 1 || x.size(1) <= 1),
                "f32_gemm: x [m, K] (unit stride along K) and w [n, K], both fp32, expected");
    TORCH_CHECK(block > 0 && threads > 0, "f32_gemm: block and threads must be positive");
    const int lv = static_cast<int>(level);
    const int64_t m = x.size(0), n = w.size(0), K = x.size(1);
    TORCH_CHECK(x.stride(0) >= K || m <= 1, "f32_gemm: x's rows must not overlap (row stride >= K)");
    const Tensor wc = w.contiguous();
    const Tensor out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat));
    const int64_t blocks = (n + block - 1) / block, floats = f32dot::packed_w_floats(lv, block, K);
    std::vector<float> wp(static_cast<size_t>(blocks * floats));
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t nb = std::min(block, n - b * block);
      f32dot::pack_w(lv, wc.data_ptr<float>() + b * block * K, K, nb, K, 0, f32dot::panels(lv, nb),
                     wp.data() + b * floats);
    }
    const int64_t ldx = m <= 1 ? K : x.stride(0);
    parallel_tasks(blocks * threads, static_cast<int>(threads), false, [&](int, int64_t t) {
      const int64_t b = t / threads, part = t % threads, nb = std::min(block, n - b * block);
      const int64_t P = f32dot::panels(lv, nb), p0 = part * P / threads, p1 = (part + 1) * P / threads;
      f32dot::gemm(lv, x.data_ptr<float>(), ldx, m, wp.data() + b * floats, nb, K, p0, p1,
                   out.data_ptr<float>() + b * block, n);
    });
    return out;
  }, pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("block"), pybind11::arg("threads") = 1,
        pybind11::arg("level") = 2);
  // The gradient products on the bf16 kernel alone, for tests (needs COPSD_CPU_BF16_GEMM=all; COPSD_CPU_PACK_MB
  // decides whether W's row pairs are packed once or per sub-tile): for z [m, n] fp32 (dL/dz, rounded to bf16
  // inside), w [n, H] and x [m, H] bf16, returns (z W, z^T x + dw0, or z^T x without dw0), the vocabulary taken in
  // tiles of `tile` entries as the loss drivers do, on one thread.
  m.def("bf16_grad_tiles", [](const Tensor& z, const Tensor& w, const Tensor& x, int64_t tile,
                              const std::optional<Tensor>& dw0) {
    TORCH_CHECK(z.scalar_type() == at::kFloat && w.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
                    z.dim() == 2 && w.dim() == 2 && x.dim() == 2 && z.size(1) == w.size(0) && z.size(0) == x.size(0) &&
                    x.size(1) == w.size(1) && tile > 0,
                "bf16_grad_tiles: z [m, n] fp32, w [n, H] and x [m, H] bf16, tile > 0 expected");
    const int64_t m = z.size(0), n = w.size(0), H = w.size(1);
    PackBudget pack;
    const Tensor wc = w.contiguous(), zc = z.contiguous(), xf = x.to(at::kFloat).contiguous();
    LmHead head(wc, at::kFloat, at::kBFloat16, m, 2 * m, int64_t(1) << 30, pack, true);  // 2 chunks: packs allowed
    TORCH_CHECK(head.bf16_grads(), "bf16_grad_tiles: needs AVX512_BF16 and COPSD_CPU_BF16_GEMM=all");
    head.ready();
    std::vector<uint32_t> xpair(static_cast<size_t>(head.grad_x_words(m)));
    head.pack_grad_x(xf, xpair.data());
    Tensor dx = at::zeros({m, H}, at::kFloat);
    Tensor dw = dw0.has_value() ? dw0->to(at::kFloat).contiguous().clone() : at::empty({n, H}, at::kFloat);
    for (int64_t v0 = 0; v0 < n; v0 += tile)
      head.grad_tile_bf16(zc.data_ptr<float>() + v0, n, m, v0, std::min(tile, n - v0), xpair.data(),
                          dx.data_ptr<float>(), H, dw.data_ptr<float>(), !dw0.has_value());
    return std::make_tuple(dx, dw);
  }, pybind11::arg("z"), pybind11::arg("w"), pybind11::arg("x"), pybind11::arg("tile"),
        pybind11::arg("dw0") = pybind11::none());
}

}  // namespace copsd_cpu
