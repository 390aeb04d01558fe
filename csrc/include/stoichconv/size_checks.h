// Size arithmetic and allocations of the C++ launchers, with errors that name
// the argument or the output concerned: products of sizes are checked for
// int64 overflow before anything is allocated (so that no id or offset can
// wrap), and an allocation that cannot be served reports the output's name
// and size instead of the allocator's message.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <initializer_list>
#include <sstream>
#include <string>
#include <new>
#include <stdexcept>
#include <vector>

#include "stoichconv/host_block_cache.h"
#include "stoichconv/host_pages.h"

namespace stoichconv {

// The product of `dims` (non-negative), or an error "<op>: <what> = d0 * d1 *
// ... overflows int64"; `what` names the product, e.g. "B * `num_nodes`".
inline int64_t checked_product(const char* op, const char* what,
                               std::initializer_list<int64_t> dims) {
  int64_t product = 1;
  bool overflow = false;
  for (const int64_t d : dims) {
    TORCH_CHECK(d >= 0, op, ": ", what, " has a negative factor ", d);
    overflow = overflow || c10::mul_overflows(product, d, &product);
  }
  if (overflow) {
    std::ostringstream factors;
    const char* sep = "";
    for (const int64_t d : dims) {
      factors << sep << d;
      sep = " * ";
    }
    TORCH_CHECK(false, op, ": ", what, " = ", factors.str(), " overflows int64");
  }
  return product;
}

namespace detail {

[[noreturn]] inline void allocation_failed(const char* op, const char* name, at::IntArrayRef sizes,
                                           int64_t bytes, bool out_of_memory, const char* device) {
  if (out_of_memory)
    TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": out of memory allocating `", name, "` ",
                     sizes, " (", bytes, " bytes on ", device, ")");
  TORCH_CHECK(false, op, ": cannot allocate `", name, "` ", sizes, " (", bytes, " bytes on ",
              device, ")");
}

}  // namespace detail

// at::empty(sizes, options), but a size overflow or a failed allocation is
// reported as "<op>: cannot allocate `name` [sizes] (bytes on device)" (an
// out-of-memory error stays a c10::OutOfMemoryError, torch.OutOfMemoryError
// in Python). Large CPU outputs come from the host block cache (host_block_cache.h: reused
// blocks, fresh ones advised into huge pages), or, with the cache off, from at::empty advised
// into huge pages (host_pages.h).
inline at::Tensor allocate(const char* op, const char* name, at::IntArrayRef sizes,
                           const at::TensorOptions& options) {
  int64_t numel = 1;
  bool overflow = false;
  for (const int64_t d : sizes) overflow = overflow || c10::mul_overflows(numel, d, &numel);
  int64_t bytes = 0;
  overflow = overflow || c10::mul_overflows(numel, int64_t(options.dtype().itemsize()), &bytes);
  const std::string device = options.device().str();
  TORCH_CHECK(!overflow, op, ": cannot allocate `", name, "` ", sizes, ": its size in bytes ",
              "overflows int64");
  try {
    if (options.device().is_cpu()) {
      at::Tensor cached = HostBlockCache::instance().empty(sizes, options, bytes);
      if (cached.defined()) return cached;
    }
    at::Tensor out = at::empty(sizes, options);
    if (out.device().is_cpu()) advise_huge_pages(out.data_ptr(), bytes);
    return out;
  } catch (const c10::OutOfMemoryError&) {
    detail::allocation_failed(op, name, sizes, bytes, true, device.c_str());
  } catch (const c10::Error&) {
    detail::allocation_failed(op, name, sizes, bytes, false, device.c_str());
  }
}

// A host scratch buffer std::vector<T>(n, value) with the same reporting.
template <typename T>
std::vector<T> allocate_buffer(const char* op, const char* name, int64_t n, T value = T()) {
  int64_t bytes = 0;
  TORCH_CHECK(n >= 0 && !c10::mul_overflows(n, int64_t(sizeof(T)), &bytes), op,
              ": cannot allocate the scratch buffer `", name, "` of ", n, " elements");
  try {
    return std::vector<T>(static_cast<size_t>(n), value);
  } catch (const std::bad_alloc&) {
    detail::allocation_failed(op, name, {n}, bytes, true, "cpu");
  } catch (const std::length_error&) {
    detail::allocation_failed(op, name, {n}, bytes, false, "cpu");
  }
}

}  // namespace stoichconv
