// The instruction sets the C++ CPU stoich conv and GATv2 kernels are compiled
// for: the portable code always, plus AVX2 + FMA code (chosen at run time when
// the CPU has it, cpu_isa_avx2()) where the compiler is GCC-compatible and the
// target x86.  Shared by csrc/cpu/stoich_conv.cpp and csrc/cpu/gatv2.cpp (which
// compile their kernels once per instruction set) and csrc/build_info.cpp
// (which reports them), so the report is what is actually compiled.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define STOICHCONV_CPU_AVX2 1
#endif

#ifdef STOICHCONV_CPU_AVX2
#include <cstdlib>
#include <cstring>

namespace stoichconv {

// Whether to run the AVX2 + FMA build of a kernel: the CPU supports both and
// the environment variable STOICHCONV_CPU_ISA is not "default" (read on every
// call, so that a test can switch it).
inline bool cpu_isa_avx2() {
  const char* forced = std::getenv("STOICHCONV_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

}  // namespace stoichconv
#endif
