// The cache of large per-call buffers; see buffers.h.
#include "buffers.h"

#include "gemm.h"  // env_mib

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace copsd_cpu {

using at::Tensor;

namespace {

constexpr int64_t kMiB = int64_t(1) << 20;
constexpr int64_t kMinCached = kMiB;          // smaller blocks: at::empty (glibc's heap serves them well)
constexpr int64_t kDefaultCacheMiB = 256;     // the default pack budget (192) + the default workspace (64)
constexpr size_t kHuge = size_t(2) << 20;     // blocks are 2 MiB aligned, so a huge page can back all of them

int64_t cache_cap() { return env_mib("COPSD_CPU_CACHE_MB", kDefaultCacheMiB) * kMiB; }

// One mapping per block: anonymous, 2 MiB aligned (the unaligned head and tail of an over-sized mapping are
// unmapped again), so freeing a block gives its memory straight back to the system.
void* map_block(size_t bytes) {
  void* raw = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + bytes + kHuge, used_end = aligned + bytes;
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  return reinterpret_cast<void*>(aligned);
}

struct Block {
  void* ptr;
  int64_t bytes;     // mapped size
  int64_t resident;  // what the bound counts
};

class BufferCache {
 public:
  void* take(int64_t bytes, int64_t resident, int64_t cap) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The smallest free block that holds `bytes` and is at most 1/4 larger (same shapes, or nearly).
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->bytes >= bytes && it->bytes <= bytes + bytes / 4 && (best == free_.end() || it->bytes < best->bytes))
          best = it;
      if (best != free_.end()) {
        Block b = *best;
        free_.erase(best);
        held_ -= b.resident;
        b.resident = resident;
        live_[b.ptr] = b;
        live_bytes_ += resident;
        ++hits_;
        return b.ptr;
      }
      ++misses_;
      // The least recently freed blocks go first, until the cache's blocks (kept and in use) and the new one fit
      // the bound (or nothing is kept): kept blocks never take the process beyond it.
      while (!free_.empty() && held_ + live_bytes_ + resident > cap) evict_oldest_locked();
    }
    void* p = map_block(static_cast<size_t>(bytes));
    if (p == nullptr) {
      TORCH_CHECK(false, "copsd CPU backend: could not map a ", bytes / kMiB, " MiB buffer (errno ", errno, ")");
    }
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = Block{p, bytes, resident};
    live_bytes_ += resident;
    return p;
  }

  void give(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // cannot happen: every block handed out is in live_
    const Block b = it->second;
    live_.erase(it);
    live_bytes_ -= b.resident;
    int64_t cap = 0;
    try {
      cap = cache_cap();
    } catch (...) {  // a bad COPSD_CPU_CACHE_MB is reported by the next cached_empty; here the block is just freed
      cap = 0;
    }
    if (b.resident > cap) {
      munmap(b.ptr, static_cast<size_t>(b.bytes));
      return;
    }
    free_.push_back(b);  // the most recently freed last
    held_ += b.resident;
    while (!free_.empty() && held_ + live_bytes_ > cap) evict_oldest_locked();
  }

  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    release_locked();
  }

  pybind11::dict stats() {
    std::lock_guard<std::mutex> lock(mu_);
    pybind11::dict d;
    d["hits"] = hits_;
    d["misses"] = misses_;
    d["held_bytes"] = held_;
    d["held_blocks"] = static_cast<int64_t>(free_.size());
    d["in_use_bytes"] = live_bytes_;
    return d;
  }

  void reset_counts() {
    std::lock_guard<std::mutex> lock(mu_);
    hits_ = misses_ = 0;
  }

 private:
  void evict_oldest_locked() {
    const Block b = free_.front();
    free_.erase(free_.begin());
    held_ -= b.resident;
    munmap(b.ptr, static_cast<size_t>(b.bytes));
  }

  void release_locked() {
    for (const auto& b : free_) munmap(b.ptr, static_cast<size_t>(b.bytes));
    free_.clear();
    held_ = 0;
  }

  std::mutex mu_;
  std::vector<Block> free_;
  std::unordered_map<void*, Block> live_;
  int64_t held_ = 0;        // free blocks kept (as counted: resident bytes)
  int64_t live_bytes_ = 0;  // blocks in use
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: a tensor freed during interpreter shutdown may still hand its block back.
BufferCache& cache() {
  static BufferCache* c = new BufferCache();
  return *c;
}

}  // namespace

Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, int64_t resident) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t cap = cache_cap();  // also checks the variable on every call
  if (cap == 0) cache().release();  // turned off since the last call: keep nothing from now on
  if (bytes < kMinCached || cap == 0) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  const int64_t counted = resident < 0 ? bytes : std::min(resident, bytes);
  void* p = cache().take(bytes, counted, cap);
  return at::from_blob(p, sizes, [](void* q) { cache().give(q); }, at::TensorOptions().dtype(dtype));
}

void empty_cache() { cache().release(); }

void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(uintptr_t(kHuge) - 1), b = (p + t.nbytes()) & ~(uintptr_t(kHuge) - 1);
  if (b >= a + 2 * kHuge) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

void register_buffers(pybind11::module& m) {
  m.def("empty_cache", &empty_cache, "free every free buffer of the CPU backend's buffer cache now");
  m.def("cache_stats", []() { return cache().stats(); },
        "the CPU backend's buffer cache: hits, misses, held_bytes / held_blocks (free buffers kept), in_use_bytes");
  m.def("cache_stats_reset", []() { cache().reset_counts(); });
}

}  // namespace copsd_cpu
