// Teams of T lanes (T a power of two dividing the warp) that own one row of
// a CUDA kernel: a CSR row's entries strided over the lanes, or a feature
// row's channels.  Reductions are a fixed xor butterfly (every lane ends with
// the same bits, for a commutative combine), so results are deterministic
// run to run; the mask names only the team's lanes, so teams of one warp may
// diverge (different row lengths, grid-stride exits).  CUDA-only, torch-free.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace stoichconv {
namespace cuda {

constexpr int kWarpSize = 32;

template <int T>
struct Team {
  static_assert(T >= 1 && T <= kWarpSize && (T & (T - 1)) == 0, "team size: a power of two <= 32");
  int lane;       // 0 .. T - 1
  unsigned mask;  // the team's lanes within the warp

  __device__ __forceinline__ Team() {
    const int warp_lane = int(threadIdx.x) & (kWarpSize - 1);
    lane = warp_lane & (T - 1);
    mask = T == kWarpSize ? 0xffffffffu : (((1u << T) - 1u) << (warp_lane & ~(T - 1)));
  }

  // The team's index among all teams of the grid (blockDim.x a multiple of 32).
  static __device__ __forceinline__ int64_t global_index() {
    return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / T;
  }
  static __device__ __forceinline__ int64_t grid_teams() {
    return int64_t(gridDim.x) * (blockDim.x / T);
  }

  template <typename V>
  __device__ __forceinline__ V sum(V v) const {
#pragma unroll
    for (int offset = T / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset, T);
    return v;
  }

  // Combine with f(a, b) (commutative on the values that occur).
  template <typename V, typename F>
  __device__ __forceinline__ V reduce(V v, F f) const {
#pragma unroll
    for (int offset = T / 2; offset > 0; offset >>= 1) v = f(v, __shfl_xor_sync(mask, v, offset, T));
    return v;
  }

  // Memory ordering between the team's lanes (a lane reads what another wrote).
  __device__ __forceinline__ void sync() const { __syncwarp(mask); }
};

// exp in the accumulation type.
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// The smallest power of two >= n, clamped to [1, 32]: the team size for rows of
// about n entries (or channels).
inline int team_size_for(int64_t n) {
  int t = 1;
  while (t < kWarpSize && t < n) t <<= 1;
  return t;
}

// Blocks of `threads` threads for `teams` teams of T lanes (grid-stride beyond the cap).
inline unsigned blocks_for_teams(int64_t teams, int T, int threads) {
  const int64_t per_block = threads / T;
  int64_t blocks = (teams + per_block - 1) / per_block;
  const int64_t cap = int64_t(1) << 20;
  return unsigned(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Calls f(std::integral_constant<int, T>{}) for the runtime team size T.
template <typename F>
cudaError_t with_team_size(int T, F&& f) {
  switch (T) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});
  }
}

}  // namespace cuda
}  // namespace stoichconv
