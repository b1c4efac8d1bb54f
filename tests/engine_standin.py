"""A tiny stand-in detector, data set and loader for the engine tests (not part of the package).

Also a script: `python engine_standin.py run --out DIR ...` (one process) or under
`torchrun --nproc_per_node=2 engine_standin.py ddp --out DIR` (gloo), used by the resume and DDP tests.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn

from mrcnn_fast.config import get_config, merge


class TinyDetector(nn.Module):
    """Train: (images, targets) -> {"loss_cls", "loss_box"}; eval: images -> [{"boxes", "labels", "scores", "masks"}].

    Draws from torch's, numpy's and python's global generators in training, so an exact resume needs
    all three restored.
    """

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4 + num_classes + 1)
        self.drop = nn.Dropout(0.2)
        self.num_classes = num_classes

    def _features(self, images):
        x = torch.stack([im[:, :16, :16] for im in images])
        return self.fc(self.drop(torch.relu(self.norm(self.conv(x))).mean((2, 3))))

    def forward(self, images, targets=None):
        out = self._features(images)
        if self.training:
            boxes = torch.stack([t["boxes"][0] / 32.0 for t in targets])
            labels = torch.stack([t["labels"][0] for t in targets])
            jitter = 1.0 + 0.05 * random.random() + 0.05 * float(np.random.rand())
            return {
                "loss_cls": nn.functional.cross_entropy(out[:, 4:], labels) * jitter,
                "loss_box": nn.functional.smooth_l1_loss(out[:, :4].sigmoid(), boxes),
            }
        res = []
        for im, o in zip(images, out):
            h, w = im.shape[-2:]
            b = (o[:4].sigmoid() * 32).sort().values
            box = torch.stack([b[0], b[1], b[2], b[3]])[None]
            masks = torch.zeros(1, 1, h, w)
            masks[..., 2:10, 2:10] = 0.9
            res.append({"boxes": box, "labels": o[4:].argmax()[None].clamp(min=1),
                        "scores": o[4:].softmax(0).max()[None], "masks": masks})
        return res


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, seed: int = 0, size: int = 24):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        xy = torch.rand(n, 2, generator=g) * 12
        self.boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 10], 1)
        self.labels = torch.randint(1, 4, (n,), generator=g)
        self.num_classes, self.num_keypoints = 3, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], {"boxes": self.boxes[i:i + 1], "labels": self.labels[i:i + 1], "image_id": 100 + i,
                                "orig_size": tuple(self.images.shape[-2:])}


def loader(dataset, batch_size: int, *, seed: int, start_iter: int, rank: int = 0, world_size: int = 1):
    """Infinite; iteration it's batch depends only on (seed, it, rank)."""
    it = start_iter
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + it)
        perm = torch.randperm(len(dataset), generator=g).tolist()
        idx = perm[rank * batch_size:(rank + 1) * batch_size]
        items = [dataset[i] for i in idx]
        yield [x[0] for x in items], [x[1] for x in items]
        it += 1


class FakeEvaluator:
    """Records which images were processed; evaluate() reports them (checks sharding + gathering)."""

    def __init__(self, iou_types):
        self.iou_types = iou_types
        self.results = []

    def process(self, image_ids, outputs):
        for i, o in zip(image_ids, outputs):
            self.results.append({"image_id": i, "score": float(o["scores"][0])})

    def evaluate(self, results=None):
        results = self.results if results is None else results
        ids = sorted(r["image_id"] for r in results)
        return {"bbox": {"AP": len(set(ids)) / 12.0}, "segm": {"AP": 0.5}, "images": {"ids": ids}}


def small_cfg(**solver):
    cfg = get_config("small_cpu")
    return merge(cfg, {"solver": {"ims_per_batch": 4, "base_lr": 0.05, "max_iter": 8, "warmup_iters": 3, **solver},
                       "train": {"checkpoint_period": 4, "log_period": 2, "num_workers": 0, "device": "cpu"}})


def _run(args, distributed: bool):
    from safetensors.torch import save_file

    from mrcnn_fast.engine import Trainer, evaluate, seed_everything
    from mrcnn_fast.engine import distributed as du

    torch.set_num_threads(1)
    ctx = du.init_distributed("cpu")
    cfg = small_cfg(max_iter=args.max_iter)
    cfg = merge(cfg, {"train": {"checkpoint_period": args.ckpt_period, "eval_period": args.eval_period}})
    seed_everything(cfg.train.seed)
    model = TinyDetector()
    data = TinyDataset(n=args.n_images)
    per_rank = cfg.solver.ims_per_batch // ctx.world_size
    losses = open(os.path.join(args.out, f"losses_rank{ctx.rank}.jsonl"), "a")

    def record(trainer, done):
        losses.write(json.dumps({"iter": done, **trainer.last_losses}) + "\n")
        losses.flush()
        if done == args.kill_at:
            if args.kill_with == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt("simulated interruption")

    def eval_fn(m):
        return evaluate(m, data, evaluator_factory=FakeEvaluator)

    trainer = Trainer(cfg, model, lambda s: loader(data, per_rank, seed=cfg.train.seed, start_iter=s, rank=ctx.rank,
                                                   world_size=ctx.world_size),
                      output_dir=args.out, evaluate_fn=eval_fn, resume=args.resume, hooks=[record])
    metrics = trainer.train()
    save_file({k: v.contiguous() for k, v in du.unwrap(trainer.model).state_dict().items()},
              os.path.join(args.out, f"final_rank{ctx.rank}.safetensors"))
    if ctx.is_main:
        with open(os.path.join(args.out, "metrics_out.json"), "w") as f:
            json.dump(metrics, f)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["run", "ddp"])
    p.add_argument("--out", required=True)
    p.add_argument("--max-iter", type=int, default=8)
    p.add_argument("--ckpt-period", type=int, default=4)
    p.add_argument("--eval-period", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--kill-with", choices=["sigkill", "exception"], default="sigkill")
    p.add_argument("--n-images", type=int, default=12)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    from mrcnn_fast.engine import distributed as du

    _run(args, distributed=args.mode == "ddp")
    du.exit_after_cleanup(0)


if __name__ == "__main__":
    sys.exit(main())
