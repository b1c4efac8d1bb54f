"""What bfloat16 networks cost in accuracy: COCO AP of a trained model through the Predictor at "fp32" and at
"bf16" (networks in bfloat16, the stages between them in float32), on the same images.

    python bench/bf16_accuracy.py RUN --json VAL.json --images DIR [--precisions fp32,bf16] [--out F.json]

RUN is a `mrcnn-fast train` run folder (or a weights file with config.json beside it). Each precision builds its
own Predictor (BatchNorm folded, channels-last, the C++ graph where the model allows it) and is evaluated with
the trainer's evaluator (engine.evaluate, RLE masks). Prints AP / AP50 / AP75 per task and the bf16 - fp32
differences in AP points (x100). bf16 needs a CPU with native bfloat16 (AMX or AVX512-BF16). Results and the
machines they came from: bench/results/bf16_accuracy.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import mrcnn_fast  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout with the in-place build
    sys.path.insert(0, str(HERE.parent / "python"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mrcnn_fast import Predictor  # noqa: E402
from mrcnn_fast.data import CocoDetection  # noqa: E402
from mrcnn_fast.engine import evaluate  # noqa: E402
from mrcnn_fast.engine.inference import prepare_evaluation  # noqa: E402


class PredictorModel(nn.Module):
    """A Predictor's inference path (its optimised model, precision and stages) with the model's call, for
    engine.evaluate: forward(images, mask_format) -> the model's raw per-image dicts."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.predictor = predictor
        self.net = predictor.model   # registered so that evaluate finds the device

    def forward(self, images, *, mask_format: str = "prob"):
        p = self.predictor
        if p._flip is not None:
            return p._flip(list(images), mask_format=mask_format)
        m = p.model
        batch, image_sizes, _, input_sizes = m.preprocess(list(images))
        return m.inference(m.to_model_layout(batch), image_sizes, input_sizes, mask_format=mask_format,
                           stages=p.graph)


def evaluate_precision(run, dataset, precision: str) -> dict:
    p = Predictor(run, precision=precision)
    iou_types, factory = prepare_evaluation(p.cfg, dataset, source="the val set", model="the model",
                                            log=lambda m: print("note:", m, file=sys.stderr))
    with torch.inference_mode():
        return evaluate(PredictorModel(p), dataset, iou_types=iou_types, evaluator_factory=factory,
                        log=lambda m: print(f"[{precision}] {m}", file=sys.stderr))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run folder or weights file (config.json beside it)")
    ap.add_argument("--json", required=True, help="COCO annotations of the evaluation images")
    ap.add_argument("--images", required=True, help="folder of the evaluation images")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", default=None, help="write the metrics here (JSON)")
    a = ap.parse_args(argv)
    precisions = [s.strip() for s in a.precisions.split(",") if s.strip()]
    probe = Predictor(a.run, precision="fp32")
    kp = probe.cfg.model.keypoint.enabled
    dataset = CocoDetection(a.json, a.images, train=False, use_keypoints=None if kp else False)
    del probe
    metrics = {p: evaluate_precision(a.run, dataset, p) for p in precisions}
    tasks = [t for t in ("bbox", "segm", "keypoints") if all(t in m for m in metrics.values())]
    print(f"{'precision':10s}" + "".join(f"{t + ' AP / AP50 / AP75':>30s}" for t in tasks))
    for p, m in metrics.items():
        print(f"{p:10s}" + "".join(f"{m[t]['AP']:10.4f}{m[t]['AP50']:10.4f}{m[t]['AP75']:10.4f}" for t in tasks))
    if "fp32" in metrics:
        for p, m in metrics.items():
            if p != "fp32":
                diffs = ", ".join(f"{t} {100 * (m[t]['AP'] - metrics['fp32'][t]['AP']):+.2f}" for t in tasks)
                print(f"{p} - fp32, AP points: {diffs}")
    if a.out:
        Path(a.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
