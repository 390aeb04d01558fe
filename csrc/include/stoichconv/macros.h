// Portability macros shared by the C++ CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SC_HOST_DEVICE __host__ __device__
#else
#define SC_HOST_DEVICE
#endif

#define SC_INLINE SC_HOST_DEVICE inline

// Vectorisation hint for the channel loops of the CPU build (ignored by nvcc).
#if !defined(__CUDACC__) && defined(_OPENMP)
#define SC_SIMD _Pragma("omp simd")
#else
#define SC_SIMD
#endif
