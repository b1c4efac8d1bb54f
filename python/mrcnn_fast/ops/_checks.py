"""Argument validation shared by the ops (and the package's integer arguments): clear errors naming the argument.

The split with the C++ core: the core checks shapes, dtypes and values of the tensors it receives and raises
ValueError / TypeError naming the argument; Python coerces Python values (ints, pairs, numbers, lists of boxes),
checks that tensors are tensors on a device the core runs on, and checks only what its own code needs before
the kernel runs (e.g. the shapes it allocates outputs from) or what the core cannot see.
"""
from __future__ import annotations

import math
import numbers

import torch

_CPU_FLOATS = (torch.float32, torch.float64)
_CUDA_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    """t is a torch.Tensor on the CPU or a CUDA device (tensors on other devices, e.g. meta, would reach the
    ops' shape-only fake kernels instead of the core)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on unsupported device {t.device}")


def check_float(t: torch.Tensor, name: str) -> None:
    check_tensor(t, name)
    allowed = _CUDA_FLOATS if t.device.type == "cuda" else _CPU_FLOATS
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names} on {t.device.type}), got {t.dtype}")


def autocast_input(t):
    """t as float32 when CPU autocast is on and t is a float16/bfloat16 tensor, else t itself.

    The CPU kernels compute in float32/float64 only; under CPU mixed precision (bfloat16 autocast) the convs
    before them hand over bfloat16 features, which these ops then take in float32 (torchvision's autocast
    kernels for roi_align do the same). Explicit low-precision inputs outside autocast still raise in
    check_float. CUDA tensors pass unchanged: the CUDA kernels take float16/bfloat16 themselves.
    """
    if (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)
            and _cpu_autocast_on()):
        return t.float()
    return t


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:   # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _at_least(minimum: int) -> str:
    return "positive" if minimum == 1 else f">= {minimum}"


def check_int(v, name: str, *, minimum: int | None = None) -> int:
    """v as a Python int: Python and numpy integers, one-element integer tensors; never a bool or a float.

    Raises:
        TypeError: not an integer.
        ValueError: below ``minimum`` (when given).
    """
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and not v.is_complex() \
            and v.dtype != torch.bool:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be {_at_least(minimum)}, got {v}")
    return v


def check_int_pair(v, name: str, *, minimum: int | None = None, scalar: bool = True) -> tuple[int, int]:
    """(h, w) from a pair of ints, or (v, v) from a single int when ``scalar``; each entry as :func:`check_int`.

    Raises:
        TypeError: not a pair of ints (or, with ``scalar``, an int).
        ValueError: an entry below ``minimum`` (when given).
    """
    what = "an int or a pair of ints" if scalar else "a pair of ints (h, w)"
    if scalar and isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v, v)
    try:
        a, b = v
        out = check_int(a, name), check_int(b, name)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {v!r}") from None
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"{name} must be {_at_least(minimum)}, got {out}")
    return out


def positive_float(v, name: str) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v}")
    return v


def real_number(v, name: str) -> float:
    """A real, non-NaN Python number (bools and tensors rejected) as float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v
