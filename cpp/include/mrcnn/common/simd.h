#pragma once
// Function multi-versioning for the CPU hot loops (x86-64 with GCC; elsewhere the macros give plain functions):
//   MRCNN_SIMD_CLONES     compiles a function for AVX2 as well as the baseline x86-64 (SSE2) and picks one at
//                         load time (no FMA: the kernels that use it round every product on its own);
//   MRCNN_X86_FMA_TARGET  compiles a function for AVX2 + FMA only; the caller checks the CPU before calling it;
//   MRCNN_ALWAYS_INLINE   pulls templated loop bodies into each such function so they are compiled for its target.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MRCNN_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MRCNN_SIMD_CLONES
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MRCNN_X86_FMA_TARGET __attribute__((target("avx2,fma")))
#else
#define MRCNN_X86_FMA_TARGET
#endif
#if defined(__GNUC__)
#define MRCNN_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define MRCNN_ALWAYS_INLINE inline
#endif
