"""One training iteration (forward, losses, backward, SGD step) of the small_cpu preset (R18-FPN, masks and
keypoints) against the same architecture built from torchvision's MaskRCNN class, same weights, same batch.

    cd bench && MRCNN_BENCH_NO_SAVE=1 PYTHONPATH=../python python -m pytest -q -s bench_train_step.py
    cd bench && PYTHONPATH=../python python bench_train_step.py [--iters 10] [--device cuda]   # + the split

The split is measured with wall-clock timers wrapped around the parts from the outside (no timing code in the
models): preprocess (resize/normalise/pad), backbone (trunk + FPN), RPN (head, anchors, proposals), RoI heads
(sampling, pooling, heads), loss (target assignment of the RPN, mask/keypoint targets and the loss functions),
backward, optimizer step.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _tv_reference import build_torchvision_model  # noqa: E402
from mrcnn_fast.config import get_config  # noqa: E402
from mrcnn_fast.convert import copy_weights_to_torchvision  # noqa: E402
from mrcnn_fast.modeling import build_model  # noqa: E402

BATCH, SIZE = 4, 256


def make_batch(n=BATCH, size=SIZE, seed=0):
    """Noisy images with 3-5 filled rectangles / ellipses / triangles each (masks, boxes, 4 extreme keypoints)."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        img = rng.uniform(0.3, 0.7, (3, size, size)).astype(np.float32)
        boxes, labels, masks, kps = [], [], [], []
        for _ in range(rng.integers(3, 6)):
            w, h = rng.integers(24, 110, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            cls = int(rng.integers(1, 4))
            if cls == 1:
                m = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            elif cls == 2:
                m = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - y0 - h / 2) / (h / 2)) ** 2 <= 1
            else:
                m = (yy >= y0) & (yy < y0 + h) & (np.abs(xx - x0 - w / 2) <= (yy - y0) * w / (2 * h))
            if m.sum() < 20:
                continue
            img[:, m] = rng.uniform(0, 1, (3, 1))
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(cls)
            masks.append(m)
            kps.append([[xs[ys.argmin()], ys.min(), 2], [xs.max(), ys[xs.argmax()], 2],
                        [xs[ys.argmax()], ys.max(), 2], [xs.min(), ys[xs.argmin()], 2]])
        images.append(torch.from_numpy(img))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)),
                        "keypoints": torch.tensor(kps, dtype=torch.float32)})
    return images, targets


def build_pair(device="cpu", pretrain_iters=0):
    """Our model and torchvision's with the same weights. pretrain_iters > 0 first trains ours on a few
    batches so that the RPN finds the objects: the RoI heads then see realistic numbers of positives
    (at initialisation only the GT boxes and a few proposals are positive)."""
    cfg = get_config("small_cpu", {"input": {"min_size_train": [SIZE]}})
    torch.manual_seed(0)
    ours = build_model(cfg).to(device)
    if pretrain_iters:
        batches = [_to(*make_batch(seed=s), device) for s in range(1, 5)]
        opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        ours.train()
        for it in range(pretrain_iters):
            train_step(ours, opt, *batches[it % len(batches)])
    tv = build_torchvision_model(cfg).to(device)
    copy_weights_to_torchvision(ours, tv)
    return ours.train(), tv.train()


CLOCK = time.perf_counter


class Timers:
    def __init__(self, device):
        self.t = defaultdict(float)
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, name):
        self.sync()
        t0 = CLOCK()
        try:
            yield
        finally:
            self.sync()
            self.t[name] += CLOCK() - t0

    def wrap(self, obj, attr, name):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            with self(name):
                return fn(*a, **k)

        setattr(obj, attr, timed)
        return lambda: setattr(obj, attr, fn)


def _instrument_ours(model, timers):
    import mrcnn_fast.modeling.roi_heads as rh

    undo = [timers.wrap(model, "preprocess", "preprocess"), timers.wrap(model.backbone, "forward", "backbone"),
            timers.wrap(model.rpn, "forward", "rpn"), timers.wrap(model.roi_heads, "forward", "roi_heads"),
            timers.wrap(model.rpn, "losses", "loss:rpn")]
    for name in ("fast_rcnn_loss", "mask_targets", "mask_loss", "keypoint_targets", "keypoint_loss"):
        undo.append(timers.wrap(rh, name, "loss:roi"))
    return undo


def _instrument_tv(model, timers):
    import torchvision.models.detection.roi_heads as rh

    undo = [timers.wrap(model.transform, "forward", "preprocess"), timers.wrap(model.backbone, "forward", "backbone"),
            timers.wrap(model.rpn, "forward", "rpn"), timers.wrap(model.roi_heads, "forward", "roi_heads"),
            timers.wrap(model.rpn, "assign_targets_to_anchors", "loss:rpn"),
            timers.wrap(model.rpn, "compute_loss", "loss:rpn")]
    for name in ("fastrcnn_loss", "maskrcnn_loss", "keypointrcnn_loss"):
        undo.append(timers.wrap(rh, name, "loss:roi"))
    return undo


def train_step(model, opt, images, targets, timers=None):
    timers = timers or (lambda name: contextlib.nullcontext())
    losses = model(images, targets)
    loss = sum(losses.values())
    with timers("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with timers("optimizer"):
        opt.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _opt(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)


def _to(images, targets, device):
    return ([i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets])


def split_table(iters=10, device="cpu", pretrain_iters=0, kept_memory=False):
    """Median over iters of each part, ours vs torchvision (iterations interleaved to share the noise)."""
    ours, tv = build_pair(device, pretrain_iters)
    images, targets = _to(*make_batch(), device)
    per = {"mrcnn_fast": defaultdict(list), "torchvision": defaultdict(list)}
    opts = {"mrcnn_fast": _opt(ours), "torchvision": _opt(tv)}
    models = {"mrcnn_fast": ours, "torchvision": tv}
    instr = {"mrcnn_fast": _instrument_ours, "torchvision": _instrument_tv}
    for name in models:  # warm-up (oneDNN primitive caches, allocator)
        for _ in range(2):
            train_step(models[name], opts[name], images, targets)
    for it in range(iters):
        for name, model in models.items():
            timers = Timers(device)
            undo = instr[name](model, timers)
            torch.manual_seed(it)
            with timers("total"):
                train_step(model, opts[name], images, targets, timers)
            for u in reversed(undo):
                u()
            t = timers.t
            t["rpn"] -= t["loss:rpn"]
            t["roi_heads"] -= t["loss:roi"]
            t["loss"] = t.pop("loss:rpn") + t.pop("loss:roi")
            for k, v in t.items():
                per[name][k].append(v)
    rows = ["preprocess", "backbone", "rpn", "roi_heads", "loss", "backward", "optimizer", "total"]
    print(f"\ntrain step, small_cpu (R18-FPN, masks + keypoints), batch {BATCH}x{SIZE}x{SIZE}, {device}, "
          f"{'freed host memory kept (both models), ' if kept_memory else ''}"
          f"{'after ' + str(pretrain_iters) + ' pre-training iterations' if pretrain_iters else 'at initialisation'}, "
          f"{torch.get_num_threads()} threads, {'CPU' if CLOCK is time.process_time else 'wall'} time, "
          f"median of {iters}")
    print("| part | mrcnn_fast (ms) | torchvision (ms) | ratio |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        a = statistics.median(per["mrcnn_fast"][r]) * 1e3
        b = statistics.median(per["torchvision"][r]) * 1e3
        print(f"| {r} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


@pytest.fixture(scope="module")
def pair():
    ours, tv = build_pair()
    images, targets = make_batch()
    # validation: with the same weights and batch the RPN / box / keypoint losses agree with torchvision's
    # (sampling is random, so only roughly: same order of magnitude)
    torch.manual_seed(0)
    la = ours(images, targets)
    torch.manual_seed(0)
    lb = tv(images, targets)
    for k in lb:
        a, b = float(la[k]), float(lb[k])
        assert abs(a - b) <= 0.5 * max(abs(b), 1e-3) + 1e-3, (k, a, b)
    return ours, tv, images, targets


def _bench(bench, model, images, targets):
    opt = _opt(model)
    train_step(model, opt, images, targets)
    bench.pedantic(train_step, args=(model, opt, images, targets), rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="train_step: small_cpu R18-FPN 4x256x256")
def test_train_step_mrcnn_fast(benchmark, pair):
    _bench(benchmark, pair[0], *pair[2:])


@pytest.mark.benchmark(group="train_step: small_cpu R18-FPN 4x256x256")
def test_train_step_torchvision(benchmark, pair):
    _bench(benchmark, pair[1], *pair[2:])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--pretrain", type=int, default=0, help="train ours this many iterations first (see build_pair)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (a steadier proxy on a shared machine, meaningful with --threads 1)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed host memory (what the Trainer does on CPU, engine/host_memory.py); "
                         "process-wide, so it applies to both models")
    args = ap.parse_args()
    if args.keep_freed_memory:
        from mrcnn_fast.engine.host_memory import keep_freed_memory
        if not keep_freed_memory():
            raise SystemExit("--keep-freed-memory: not applicable here (needs Linux with glibc)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    split_table(args.iters, args.device, args.pretrain, kept_memory=args.keep_freed_memory)
