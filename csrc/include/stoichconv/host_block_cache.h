// A cache of large host blocks for the outputs of the CPU operators and the
// layer's large tensors, so that a call that allocates the same sizes as the
// one before reuses memory that is already mapped.
//
// glibc's malloc serves a block above its mmap threshold (at most 32 MiB on
// 64-bit, and lower until the process has freed a larger block) from a fresh
// mapping on every call and unmaps it on free, and the kernel then zeroes every
// page of it again on first touch.  At B = 32 the stoich conv layer allocates
// three such 41 MB tensors per forward + backward; their page clearing was a
// tenth of the call.  A block of at least kHostBlockCacheMinBytes is therefore
// taken from this cache when one of about its size was freed before (released
// by the deleter of the tensor that used it), else allocated 2 MiB-aligned and
// advised into transparent huge pages (host_pages.h).  Freed blocks are kept
// up to a limit (most recently freed first; the oldest are returned to the
// system beyond it): STOICHCONV_HOST_CACHE_MB at the first allocation (default
// kHostBlockCacheDefaultMB; 0 turns the cache off), or set_limit() from Python
// (stoichconv.set_host_cache_limit).  Only memory changes hands: a tensor from
// the cache is an ordinary CPU tensor with uninitialised contents, like one
// from at::empty, except that its storage cannot be resized.
#pragma once

#include <ATen/ATen.h>

#include <pthread.h>
#include <stdint.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "stoichconv/host_pages.h"

namespace stoichconv {

// Blocks from this size on are cached (the huge-page advice threshold).
constexpr int64_t kHostBlockCacheMinBytes = kHugePageAdviceBytes;
// Default limit of the freed blocks kept, in MiB.
constexpr int64_t kHostBlockCacheDefaultMB = 512;
// Blocks are 2 MiB-aligned multiples of 2 MiB (whole huge pages).
constexpr int64_t kHostBlockGranule = int64_t(2) << 20;

class HostBlockCache {
 public:
  // The one cache of the process; never destroyed (a tensor may release its
  // block after static destructors have run).
  static HostBlockCache& instance() {
    static HostBlockCache* cache = new HostBlockCache();
    return *cache;
  }

  // An uninitialised CPU tensor of `sizes` and `options` (`bytes` its size)
  // on a block of this cache; an undefined tensor when the cache is off or
  // `bytes` is below kHostBlockCacheMinBytes (the caller then uses at::empty).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options, int64_t bytes) {
    if (bytes < kHostBlockCacheMinBytes) return at::Tensor();
    const int64_t capacity = (bytes + kHostBlockGranule - 1) / kHostBlockGranule * kHostBlockGranule;
    void* block = take(capacity);
    if (block == nullptr) return at::Tensor();
    return at::from_blob(
        block, sizes, [capacity](void* p) { HostBlockCache::instance().release(p, capacity); },
        options.device(at::kCPU));
  }

  // {limit, cached bytes, cached blocks, hits, misses} (hits: allocations
  // served by a cached block; misses: blocks allocated fresh).
  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    init_limit();
    return {limit_, cached_, static_cast<int64_t>(free_.size()), hits_, misses_};
  }

  // Keep at most `limit` bytes of freed blocks (0: none, the cache is off);
  // returns info().
  std::vector<int64_t> set_limit(int64_t limit) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit < 0 ? 0 : limit;
      limit_set_ = true;
      trim_to(limit_);
    }
    return info();
  }

  // Returns every cached block to the system; returns info().
  std::vector<int64_t> clear() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      trim_to(0);
    }
    return info();
  }

 private:
  HostBlockCache() {
    // a child of fork() starts with an unlocked mutex (the parent's other
    // threads, one of which may have held it, do not exist there)
    pthread_atfork(nullptr, nullptr, [] { new (&HostBlockCache::instance().mutex_) std::mutex(); });
  }

  void init_limit() {
    if (limit_set_) return;
    int64_t mb = kHostBlockCacheDefaultMB;
    if (const char* env = std::getenv("STOICHCONV_HOST_CACHE_MB")) {
      char* end = nullptr;
      const long long value = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && value >= 0) mb = static_cast<int64_t>(value);
    }
    limit_ = mb << 20;
    limit_set_ = true;
  }

  // A block of `capacity` bytes: a cached one of capacity .. 5/4 capacity
  // (the smallest), else a fresh one; nullptr when the cache is off.
  void* take(int64_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      init_limit();
      if (limit_ == 0) return nullptr;
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->first >= capacity && it->first <= capacity + capacity / 4 &&
            (best == free_.end() || it->first < best->first))
          best = it;
      if (best != free_.end()) {
        void* block = best->second;
        cached_ -= best->first;
        free_.erase(best);
        ++hits_;
        return block;
      }
      ++misses_;
    }
    void* block = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError,
                     posix_memalign(&block, static_cast<size_t>(kHostBlockGranule),
                                    static_cast<size_t>(capacity)) == 0,
                     "stoichconv host block cache: out of memory allocating ", capacity, " bytes");
    advise_huge_pages(block, capacity);
    return block;
  }

  // The deleter of a cache tensor: keep its block (most recent first), then
  // trim to the limit.
  void release(void* block, int64_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.emplace_front(capacity, block);
    cached_ += capacity;
    trim_to(limit_);
  }

  // Returns the oldest freed blocks to the system until at most `bytes` are
  // kept (mutex_ held).
  void trim_to(int64_t bytes) {
    while (cached_ > bytes && !free_.empty()) {
      std::free(free_.back().second);
      cached_ -= free_.back().first;
      free_.pop_back();
    }
  }

  std::mutex mutex_;
  std::list<std::pair<int64_t, void*>> free_;  // (capacity, block), most recently freed first
  int64_t limit_ = 0, cached_ = 0, hits_ = 0, misses_ = 0;
  bool limit_set_ = false;
};

}  // namespace stoichconv
