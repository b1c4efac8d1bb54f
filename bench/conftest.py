"""Benchmark plumbing: every op is timed against torchvision in the same run, in one pytest-benchmark
group per case ("<op>: <size>"), with the two functions named "mrcnn_fast" and "torchvision". At the end
a table of medians and ratios (torchvision / mrcnn_fast) is printed and appended to bench/results/.

Run:  .venv/bin/python -m pytest bench/ -q   (add -k roi_align to select)
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for b in bs.benchmarks:
        if b.stats is None or not b.stats.data:
            continue
        name = b.name.split("[")[0]
        impl = "torchvision" if "torchvision" in name else "mrcnn_fast"
        groups.setdefault(b.group or name, {})[impl] = b.stats.median
    cpu = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    device = os.environ.get("MRCNN_BENCH_DEVICE") or (
        torch.cuda.get_device_name() if torch.cuda.is_available() else cpu)
    lines = [f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {_commit()}, {device}, "
             f"torch {torch.__version__}", "", "| case | mrcnn_fast median (ms) | torchvision median (ms) | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for g in sorted(groups):
        m, t = groups[g].get("mrcnn_fast"), groups[g].get("torchvision")
        ratio = f"{t / m:.2f}x" if m and t else "-"
        fm = f"{m * 1e3:.3f}" if m else "-"
        ft = f"{t * 1e3:.3f}" if t else "-"
        lines.append(f"| {g} | {fm} | {ft} | {ratio} |")
    text = "\n".join(lines) + "\n\n"
    print("\n" + text)
    if os.environ.get("MRCNN_BENCH_NO_SAVE") != "1":
        RESULTS.mkdir(exist_ok=True)
        gpu = "cuda" in os.environ.get("MRCNN_BENCH_DEVICE", "").lower() or torch.cuda.is_available()
        tag = "gpu" if gpu else "cpu"
        with open(RESULTS / f"{tag}_results.md", "a") as f:
            f.write(text)


@pytest.fixture
def bench(benchmark):
    """benchmark with settings suited to ms-scale kernels on a noisy machine."""
    benchmark._min_rounds = 7
    return benchmark
