// The instruction sets the C++ CPU stoich conv kernels are compiled for: the
// portable code always, plus AVX2 + FMA code (chosen at run time when the CPU
// has it) where the compiler is GCC-compatible and the target x86.  Shared by
// csrc/cpu/stoich_conv.cpp (which compiles the kernels once per instruction
// set) and csrc/build_info.cpp (which reports them), so the report is what is
// actually compiled.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define STOICHCONV_CPU_AVX2 1
#endif
