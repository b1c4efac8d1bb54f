#pragma once
// Host/device qualifiers: per-element math is written once and compiled by both g++ and nvcc.
#ifdef __CUDACC__
#define MRCNN_HD __host__ __device__ __forceinline__
#define MRCNN_DEVICE __device__ __forceinline__
#else
#define MRCNN_HD inline
#define MRCNN_DEVICE inline
#endif
