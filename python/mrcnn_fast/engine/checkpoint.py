"""Checkpoints: model weights as safetensors, the training state as a weights_only-loadable torch file.

Files under a run's output directory:
    model_0005000.safetensors   periodic weights (model state dict incl. buffers)
    model_final.safetensors     weights at the end of training
    last_checkpoint.pt          everything `--resume` needs (see `training_state`), self-contained
    config.json                 the run's full config (read back by `mrcnn-fast eval`)

Every file is written atomically: to a temporary file in the same directory, flushed and fsynced, then
renamed over the target with os.replace. A reader (or a resumed run after a kill) sees either the old
file or the new one, never a truncated one.
"""
from __future__ import annotations

import json
import os
import random
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

STATE_FILE = "last_checkpoint.pt"
FINAL_WEIGHTS = "model_final.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def periodic_weights_name(iteration: int) -> str:
    return f"model_{iteration:07d}.safetensors"


# ---------------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls write(f) on a temporary file beside path, fsyncs it and renames it to path.

    If write raises (or the process dies) path keeps its previous content; the temporary file is removed
    on exceptions (a SIGKILL can leave one behind: `remove_stale_temps` deletes those).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: never clobber someone else's temp file; 0o666 lets the umask decide, as for a plain open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Deletes temporary files left by atomic_write in a process that was killed mid-write."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(".*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 3)[-3])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                p.unlink()
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------- weights
def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as independent contiguous CPU tensors (safetensors refuses shared storage)."""
    from .distributed import unwrap

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}


def save_weights(model_or_state: torch.nn.Module | dict, path: str | os.PathLike, *,
                 metadata: dict | None = None) -> Path:
    """Writes the model's state dict (parameters and buffers) to a .safetensors file, atomically."""
    from safetensors.torch import save

    state = model_state(model_or_state) if isinstance(model_or_state, torch.nn.Module) else model_or_state
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, save(state, metadata={"format": "pt", **meta}))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({_short(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path}: corrupt file or not a weights-only torch checkpoint ({_short(e)})"
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(
            f"{path} does not hold a state dict (expected a mapping of names to tensors, or a dict with 'model')"
        )
    return obj


def _short(e: BaseException, n: int = 200) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


def _names(keys, n: int = 8) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:n])
    return head + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *,
                 strict: bool = True) -> tuple[list[str], list[str]]:
    """Loads weights into model from .safetensors, a plain state-dict .pt/.pth, or a dict holding one under "model".

    Torch files are read with weights_only=True (no arbitrary code runs). A "module." prefix (a state dict
    saved from a DistributedDataParallel wrapper) is stripped.
    Returns (missing_keys, unexpected_keys) — both empty when strict.
    Raises CheckpointError on a missing/corrupt file, on shape mismatches (naming the keys), and, when
    strict, on missing or unexpected keys.
    """
    from .distributed import unwrap

    path = Path(path)
    state = _read_state_dict(path)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    target = unwrap(model)
    own = target.state_dict()
    bad = [
        f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:8])
                              + (f"; ... ({len(bad) - 8} more)" if len(bad) > 8 else ""))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_names(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_names(unexpected)}")
        raise CheckpointError(f"{path} does not match the model; " + "; ".join(parts))
    target.load_state_dict(state, strict=False)
    return missing, unexpected


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states as tensors, lists, ints and floats."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- training state
def plain(obj: Any) -> Any:
    """obj with tuples turned into lists, recursively (what weights_only loading and JSON both accept)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Writes the training state atomically with torch.save (must hold only weights_only-loadable types)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {path}: corrupt file ({_short(e)})") from None
    required = ("model", "optimizer", "scheduler", "iteration")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise CheckpointError(f"{path} is not a training state (expected keys {', '.join(required)})")
    return state


def save_config(directory: str | os.PathLike, cfg_dict: dict) -> Path:
    return atomic_write_text(Path(directory) / CONFIG_FILE, json.dumps(plain(cfg_dict), indent=2) + "\n")
