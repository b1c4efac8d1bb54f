"""Access to the compiled core (mrcnn_fast._C) and zero-copy tensor hand-off.

Tensors cross the boundary as DLPack capsules: no copy, no libtorch linkage. CUDA kernels are launched
on the caller's current stream, which is passed explicitly with every call.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as e:  # pragma: no cover - only when the extension was not built
    raise ImportError(
        "mrcnn_fast._C is not built. Install the package (`pip install .`) or run "
        "scripts/build_inplace.sh for a development build."
    ) from e


def has_cuda() -> bool:
    """True when the extension was compiled with CUDA kernels and a CUDA device is visible."""
    return bool(_C.cuda_compiled()) and _C.cuda_device_count() > 0


def cuda_compiled() -> bool:
    """True when the extension was compiled with CUDA kernels (whether or not a GPU is present)."""
    return bool(_C.cuda_compiled())


def get_num_threads() -> int:
    """Threads used by the CPU kernels (default: all cores, or $MRCNN_NUM_THREADS)."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the CPU kernel thread count; n <= 0 restores the default."""
    _C.set_num_threads(int(n))


def dl(t: torch.Tensor):
    """A DLPack capsule viewing ``t`` (no copy). The core never keeps it past the call."""
    t = t.detach()
    if t.device.type == "cuda":
        # -1: no producer-side synchronisation; the kernel runs on the current stream (see stream()).
        return t.__dlpack__(stream=-1)
    return t.__dlpack__()


def stream(t: torch.Tensor) -> int:
    """The raw cudaStream_t of torch's current stream on t's device (0 on CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0
