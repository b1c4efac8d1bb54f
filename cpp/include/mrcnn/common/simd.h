#pragma once
// Function multi-versioning for the CPU hot loops: MRCNN_SIMD_CLONES compiles a function for AVX2 as well as
// the baseline x86-64 (SSE2) and picks one at load time; MRCNN_ALWAYS_INLINE pulls templated loop bodies
// into each clone so they are compiled for its target. Elsewhere both expand to plain functions.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MRCNN_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#define MRCNN_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define MRCNN_SIMD_CLONES
#define MRCNN_ALWAYS_INLINE inline
#endif
