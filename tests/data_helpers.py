"""Helpers for the data/evaluation tests: the shared real-image sets and tiny synthetic COCO files."""
import json
import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path | None:
    """../shared/data beside the repository; in a git worktree nested deeper, the nearest ancestor's
    shared/data; $MRCNN_SHARED_DATA overrides both."""
    env = os.environ.get("MRCNN_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    repo = Path(__file__).resolve().parents[1]
    primary = repo / ".." / "shared" / "data"
    if primary.is_dir():
        return primary.resolve()
    for anc in repo.parents:
        if (anc / "shared" / "data").is_dir():
            return anc / "shared" / "data"
    return None


def require_shared(name: str) -> Path:
    root = shared_data_dir()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"shared test data {name!r} not found (expected ../shared/data/{name} beside the repository "
                    f"or $MRCNN_SHARED_DATA)")
    return root / name


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
