import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from mrcnn_fast.visualize import PALETTE, draw_instances, to_pil


def _output(rle=False):
    h = w = 64
    masks = torch.zeros(2, 1, h, w)
    masks[0, 0, 10:30, 10:30] = 0.9
    masks[1, 0, 40:60, 40:60] = 0.9
    out = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0]]),
           "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.2]),
           "keypoints": torch.tensor([[[20.0, 10.0, 1.0], [30.0, 20.0, 1.0]], [[50.0, 40.0, 1.0], [60.0, 50.0, 1.0]]]),
           "keypoints_scores": torch.ones(2, 2)}
    if rle:
        enc = mask_util.encode(np.asfortranarray((masks[:, 0] > 0.5).numpy().transpose(1, 2, 0).astype(np.uint8)))
        out["masks_rle"] = [{"size": r["size"], "counts": r["counts"].decode()} for r in enc]
    else:
        out["masks"] = masks
    return out


@pytest.mark.parametrize("rle", [False, True])
def test_draws_masks_boxes_and_respects_threshold(rle):
    image = torch.zeros(3, 64, 64)
    img = draw_instances(image, _output(rle), class_names=["a", "b"], score_thresh=0.5, skeleton=[(0, 1)])
    assert img.size == (64, 64) and img.mode == "RGB"
    a = np.asarray(img).astype(int)
    # inside the kept instance's mask (away from box, text and keypoints): black blended with its colour
    expect = np.round(np.asarray(PALETTE[0]) * 0.45)
    assert np.abs(a[22, 14] - expect).max() <= 1, a[22, 14]
    # the low-scoring instance is not drawn at all
    assert a[45:58, 45:58].max() == 0
    # box outline in the instance colour
    assert (np.abs(a[29, 10:30] - np.asarray(PALETTE[0])).max(1) <= 1).any()


def test_keypoints_drawn_and_input_types():
    out = _output()
    img = np.asarray(draw_instances(np.zeros((64, 64, 3), np.uint8), out, score_thresh=0.5))
    assert img[20, 30].sum() > 0    # keypoint (30, 20) of the kept instance
    pil = to_pil(torch.full((3, 4, 5), 255, dtype=torch.uint8))
    assert pil.size == (5, 4) and np.asarray(pil).min() == 255
    with pytest.raises(ValueError, match="Tensor"):
        to_pil(torch.zeros(4, 4))
    bad = dict(out, masks=torch.zeros(2, 1, 10, 10))
    with pytest.raises(ValueError, match="mask"):
        draw_instances(torch.zeros(3, 64, 64), bad, score_thresh=0.5)


def test_no_detections_returns_plain_image():
    out = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
           "masks": torch.zeros(0, 1, 8, 8)}
    img = draw_instances(torch.full((3, 8, 8), 0.5), out)
    assert np.asarray(img).min() == np.asarray(img).max() == 128
