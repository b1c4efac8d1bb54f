import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from data_helpers import require_shared, write_json
from mrcnn_fast.data import CocoDetection, build_loader, collate, transforms
from mrcnn_fast.data.keypoints import COCO_PERSON_FLIP_PAIRS
from mrcnn_fast.data.loader import EvalBatchSampler, TrainBatchSampler

H, W = 40, 60
# pycocotools' own decode trips numpy 2's __array__(copy=...) deprecation in the reference computations.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed (crowd) RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = mask.T.reshape(-1)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def mini_coco(tmp_path, *, with_keypoints=False):
    """A two-image COCO set: polygon, two-part polygon, crowd (uncompressed RLE), compressed RLE, a degenerate
    box, and an image without annotations. Category ids 5 and 7 (not contiguous)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (H, W), "b.png": (30, 20)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
    crowd = np.zeros((H, W), np.uint8)
    crowd[25:35, 5:20] = 1
    comp = np.zeros((H, W), np.uint8, order="F")
    comp[2:9, 40:55] = 1
    comp_rle = mask_util.encode(np.asfortranarray(comp))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [10, 5, 20, 15], "area": 150.0,
         "segmentation": [[10, 5, 30, 5, 20, 20]]},
        {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [30, 20, 25, 15], "area": 150.0,
         "segmentation": [[30, 20, 40, 20, 40, 30, 30, 30], [45, 25, 55, 25, 55, 35, 45, 35]]},
        {"id": 3, "image_id": 1, "category_id": 5, "iscrowd": 1, "bbox": [5, 25, 15, 10], "area": 150.0,
         "segmentation": _uncompressed_rle(crowd)},
        {"id": 4, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [40, 2, 15, 7], "area": 105.0,
         "segmentation": {"size": [H, W], "counts": comp_rle["counts"].decode()}},
        {"id": 5, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [1, 1, 0.5, 10], "area": 1.0,
         "segmentation": [[1, 1, 1.5, 1, 1.5, 11, 1, 11]]},
    ]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": 30, "width": 20}],
            "annotations": anns,
            "categories": [{"id": 7, "name": "seven"}, {"id": 5, "name": "five"}]}
    if with_keypoints:
        for c in data["categories"]:
            c["keypoints"] = ["top", "right", "bottom", "left"]
        for a in anns:
            a["keypoints"] = [a["bbox"][0] + 1, a["bbox"][1], 2, a["bbox"][0] + 3, a["bbox"][1] + 2, 1,
                              a["bbox"][0] + 2, a["bbox"][1] + 3, 2, 0, 0, 0]
    return data, img_dir


def make_set(tmp_path, data=None, **kw):
    if data is None:
        data, img_dir = mini_coco(tmp_path)
    else:
        img_dir = tmp_path / "images"
    return CocoDetection(write_json(tmp_path / "ann.json", data), img_dir, **kw)


# ---------------------------------------------------------------- the mini set: every annotation kind

def test_mini_set_targets(tmp_path):
    data, img_dir = mini_coco(tmp_path)
    ds = CocoDetection(write_json(tmp_path / "ann.json", data), img_dir)
    assert len(ds) == 2 and ds.ids == [1, 2] and ds.num_classes == 2
    assert ds.cat_ids == [5, 7] and ds.class_names == ["five", "seven"] and ds.num_keypoints == 0
    image, t = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    raw = np.array(Image.open(img_dir / "a.png").convert("RGB"))
    torch.testing.assert_close(image, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    # ann 5 (0.5 px wide) is dropped; eval mode keeps the crowd instance.
    assert t["image_id"] == 1 and t["orig_size"] == (H, W)
    assert t["labels"].tolist() == [1, 2, 1, 2] and t["iscrowd"].tolist() == [0, 0, 1, 0]
    assert t["boxes"].dtype == torch.float32 and t["masks"].dtype == torch.uint8
    torch.testing.assert_close(t["boxes"], torch.tensor([[10., 5, 30, 20], [30, 20, 55, 35], [5, 25, 20, 35],
                                                         [40, 2, 55, 9]]))
    torch.testing.assert_close(t["area"], torch.tensor([150., 150, 150, 105]))
    assert "keypoints" not in t
    for m, ann_id in zip(t["masks"], [1, 2, 3, 4]):
        np.testing.assert_array_equal(m.numpy(), ds.coco.annToMask(ds.coco.anns[ann_id]))
    # the two polygon parts: union of the parts, each rasterised alone
    parts = [mask_util.decode(mask_util.frPyObjects([p], H, W))[..., 0] for p in data["annotations"][1]["segmentation"]]
    np.testing.assert_array_equal(t["masks"][1].numpy(), np.maximum(*parts))
    assert (t["masks"][1].numpy()[:, :42] > 0).any() and (t["masks"][1].numpy()[:, 44:] > 0).any()
    assert t["masks"][2].sum() == 150 and t["masks"][2][25:35, 5:20].all()   # crowd RLE decodes exactly
    assert t["masks"][3].sum() == 105 and t["masks"][3][2:9, 40:55].all()    # compressed RLE
    _, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["masks"].shape == (0, 30, 20) and t2["labels"].shape == (0,)
    assert ds[-1][1]["image_id"] == 2
    with pytest.raises(IndexError):
        ds[2]


def test_train_mode_drops_crowd_and_flips(tmp_path):
    data, img_dir = mini_coco(tmp_path, with_keypoints=True)
    path = write_json(tmp_path / "ann.json", data)
    ev = CocoDetection(path, img_dir)
    assert ev.num_keypoints == 4 and ev.keypoint_names == ["top", "right", "bottom", "left"]
    tr = CocoDetection(path, img_dir, train=True, flip_prob=1.0, flip_pairs=((1, 3),))
    img_e, t_e = ev[0]
    img_t, t_t = tr[0]
    assert t_t["iscrowd"].tolist() == [0, 0, 0]
    keep = t_e["iscrowd"] == 0
    torch.testing.assert_close(img_t, img_e.flip(-1))
    torch.testing.assert_close(t_t["masks"], t_e["masks"][keep].flip(-1))
    b = t_e["boxes"][keep]
    torch.testing.assert_close(t_t["boxes"], torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1))
    kp = t_e["keypoints"][keep]
    assert torch.equal(t_t["keypoints"][:, 1, 2], kp[:, 3, 2]) and torch.equal(t_t["keypoints"][:, 3, 2], kp[:, 1, 2])
    torch.testing.assert_close(t_t["keypoints"][:, 0, 0], W - kp[:, 0, 0])
    # never flips with flip_prob=0, keeps crowd with drop_crowd=False
    t0 = CocoDetection(path, img_dir, train=True, flip_prob=0.0, drop_crowd=False, flip_pairs=((1, 3),))[0][1]
    torch.testing.assert_close(t0["boxes"], t_e["boxes"])
    # a seeded index gives the same flip decision every time
    tr_half = CocoDetection(path, img_dir, train=True, flip_pairs=((1, 3),))
    decisions = {bool(torch.equal(tr_half[(0, s)][0], img_e)) for s in range(20)}
    assert decisions == {True, False}
    for s in range(5):
        assert torch.equal(tr_half[(0, s)][0], tr_half[(0, s)][0])


# ---------------------------------------------------------------- the shared real sets

def test_coco_samples(tmp_path):
    root = require_shared("coco_samples")
    ds = CocoDetection(root / "annotations.json", root / "images")
    coco = ds.coco
    assert len(ds) == 6 and ds.num_classes == 80 and ds.cat_ids == sorted(coco.cats) and ds.num_keypoints == 0
    seen = {"multipart": 0, "crowd": 0, "empty": 0}
    for i in range(len(ds)):
        image, t = ds[i]
        info = coco.imgs[ds.ids[i]]
        assert image.shape == (3, info["height"], info["width"]) and t["orig_size"] == (info["height"], info["width"])
        anns = [a for a in coco.imgToAnns[ds.ids[i]] if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        assert len(t["boxes"]) == len(anns)
        for k, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            torch.testing.assert_close(t["boxes"][k], torch.tensor([x, y, min(x + w, info["width"]),
                                                                    min(y + h, info["height"])], dtype=torch.float32))
            assert ds.cat_ids[int(t["labels"][k]) - 1] == a["category_id"]
            np.testing.assert_array_equal(t["masks"][k].numpy(), coco.annToMask(a))
            assert t["iscrowd"][k] == a["iscrowd"]
            if isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1:
                seen["multipart"] += 1
                union = np.zeros_like(coco.annToMask(a))
                for p in a["segmentation"]:
                    union |= mask_util.decode(mask_util.frPyObjects([p], info["height"], info["width"]))[..., 0]
                np.testing.assert_array_equal(t["masks"][k].numpy(), union)
            if a["iscrowd"]:
                seen["crowd"] += 1
                counts = a["segmentation"]["counts"]
                assert isinstance(counts, list) and int(t["masks"][k].sum()) == sum(counts[1::2])
        if not anns:
            seen["empty"] += 1
            assert t["masks"].shape == (0, info["height"], info["width"])
    assert seen == {"multipart": 1, "crowd": 1, "empty": 1}
    # training mode drops the crowd instance
    tr = CocoDetection(root / "annotations.json", root / "images", train=True, flip_prob=0.0)
    crowd_img = ds.ids.index(464689)
    assert tr[crowd_img][1]["iscrowd"].sum() == 0
    assert len(tr[crowd_img][1]["boxes"]) == len(ds[crowd_img][1]["boxes"]) - 1


@pytest.mark.parametrize("which", ["coco_samples/keypoints_annotations.json", "coco_persons/annotations.json"])
def test_shared_keypoint_sets(which):
    folder, name = which.split("/")
    root = require_shared(folder)
    ds = CocoDetection(root / name, root / "images")
    assert ds.num_keypoints == 17 and len(ds.keypoint_names) == 17 and ds.keypoint_names[1] == "left_eye"
    no_visible = 0
    for i in range(len(ds)):
        _, t = ds[i]
        anns = ds.coco.imgToAnns[ds.ids[i]]
        assert t["keypoints"].shape == (len(anns), 17, 3) and t["keypoints"].dtype == torch.float32
        for k, a in enumerate(anns):
            ref = torch.tensor(a["keypoints"], dtype=torch.float32).reshape(17, 3)
            torch.testing.assert_close(t["keypoints"][k], ref)
            assert int((t["keypoints"][k, :, 2] > 0).sum()) == a["num_keypoints"]
            no_visible += a["num_keypoints"] == 0
            np.testing.assert_array_equal(t["masks"][k].numpy(), ds.coco.annToMask(a))
    assert no_visible > 0
    # a flip swaps left/right and mirrors; unlabelled stay (0, 0, 0); flipping back restores
    img, t = ds[0]
    fimg, ft = transforms.hflip(img, t, COCO_PERSON_FLIP_PAIRS)
    kp, fk = t["keypoints"], ft["keypoints"]
    w = img.shape[-1]
    for a, b in [(1, 2), (5, 6), (15, 16)]:
        vis = kp[:, a, 2] > 0
        assert torch.equal(fk[:, b, 2], kp[:, a, 2])
        torch.testing.assert_close(fk[vis, b, 0], w - kp[vis, a, 0])
        torch.testing.assert_close(fk[:, b, 1], kp[:, a, 1])
    assert (fk[fk[..., 2] == 0] == 0).all()
    _, back = transforms.hflip(fimg, ft, COCO_PERSON_FLIP_PAIRS)
    torch.testing.assert_close(back["keypoints"], kp)


# ---------------------------------------------------------------- transforms

def _target(n=3, h=50, w=70, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 2
    boxes = torch.cat([xy, xy + wh], 1).floor()
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[i, y1:y2, x1:x2] = 1
    kp = torch.rand(n, k, 3, generator=g) * torch.tensor([w, h, 1.0])
    kp[..., 2] = torch.randint(0, 3, (n, k), generator=g).float()
    kp[kp[..., 2] == 0] = 0
    return {"boxes": boxes, "masks": masks, "keypoints": kp, "labels": torch.arange(1, n + 1),
            "area": (masks.sum((1, 2))).float(), "image_id": 3}


def _mask_boxes(masks):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(out, dtype=torch.float32)


def test_hflip():
    img = torch.rand(3, 50, 70)
    t = _target()
    orig = copy.deepcopy(t)
    fimg, ft = transforms.hflip(img, t, ((1, 3),))
    assert torch.equal(fimg, img.flip(-1))
    for k in orig:   # input untouched
        assert torch.equal(torch.as_tensor(t[k]), torch.as_tensor(orig[k]))
    torch.testing.assert_close(_mask_boxes(ft["masks"]), ft["boxes"])   # boxes follow masks
    kp, fk = t["keypoints"], ft["keypoints"]
    for a, b in [(1, 3), (3, 1), (0, 0), (2, 2)]:
        vis = kp[:, a, 2] > 0
        torch.testing.assert_close(fk[:, b, 2], kp[:, a, 2])
        torch.testing.assert_close(fk[vis, b, 0], 70 - kp[vis, a, 0])
        torch.testing.assert_close(fk[:, b, 1], kp[:, a, 1])
        assert (fk[~vis, b] == 0).all()
    assert ft["image_id"] == 3 and torch.equal(ft["labels"], t["labels"])
    bimg, bt = transforms.hflip(fimg, ft, ((1, 3),))
    assert torch.equal(bimg, img)
    for k in ("boxes", "masks", "keypoints"):
        torch.testing.assert_close(bt[k], t[k])
    assert transforms.hflip(img, None)[1] is None
    with pytest.raises(ValueError, match="flip_pairs"):
        transforms.hflip(img, t, ((1, 4),))
    with pytest.raises(ValueError, match="twice"):
        transforms.hflip(img, t, ((1, 3), (3, 2)))


def test_resize_shortest_edge():
    img = torch.rand(3, 50, 70)
    t = _target()
    rimg, rt = transforms.resize_shortest_edge(img, t, 100, 1000)
    assert rimg.shape == (3, 100, 140)
    torch.testing.assert_close(rt["boxes"], t["boxes"] * 2)
    torch.testing.assert_close(_mask_boxes(rt["masks"]), rt["boxes"])   # masks scale with the boxes
    assert rt["masks"].dtype == torch.uint8 and set(rt["masks"].unique().tolist()) <= {0, 1}
    torch.testing.assert_close(rt["keypoints"][..., :2], t["keypoints"][..., :2] * 2)
    assert torch.equal(rt["keypoints"][..., 2], t["keypoints"][..., 2])
    torch.testing.assert_close(rt["area"], t["area"] * 4)
    torch.testing.assert_close(rimg.mean(), img.mean(), atol=0.02, rtol=0)
    # the long side caps the scale: 50x200 -> min(100/50, 300/200) = 1.5 -> 75x300
    r2, _ = transforms.resize_shortest_edge(torch.rand(3, 50, 200), None, 100, 300)
    assert r2.shape == (3, 75, 300)
    # non-uniform rounding: boxes scale by the actual per-axis ratios
    img3, t3 = torch.rand(3, 33, 47), _target(h=33, w=47)
    r3, rt3 = transforms.resize_shortest_edge(img3, t3, 20, 1000)
    sy, sx = r3.shape[1] / 33, r3.shape[2] / 47
    assert r3.shape[1:] == (20, 28)
    torch.testing.assert_close(rt3["boxes"], t3["boxes"] * torch.tensor([sx, sy, sx, sy]))
    # empty targets
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 50, 70, dtype=torch.uint8)}
    _, e = transforms.resize_shortest_edge(img, empty, 100, 1000)
    assert e["boxes"].shape == (0, 4) and e["masks"].shape == (0, 100, 140)
    with pytest.raises(ValueError, match="min_size"):
        transforms.resize_shortest_edge(img, None, 0, 100)
    with pytest.raises(ValueError, match="image"):
        transforms.resize_shortest_edge(torch.rand(50, 70), None, 10, 100)


def test_batch_images():
    imgs = [torch.rand(3, 50, 70), torch.rand(3, 65, 33)]
    batch, sizes = transforms.batch_images(imgs, 32)
    assert batch.shape == (2, 3, 96, 96) and sizes == [(50, 70), (65, 33)]
    assert torch.equal(batch[0, :, :50, :70], imgs[0]) and torch.equal(batch[1, :, :65, :33], imgs[1])
    assert batch[0, :, 50:].abs().sum() == 0 and batch[0, :, :, 70:].abs().sum() == 0
    assert batch[1, :, 65:].abs().sum() == 0 and batch[1, :, :, 33:].abs().sum() == 0
    assert transforms.batch_images(imgs, 0)[0].shape == (2, 3, 65, 70)
    assert transforms.batch_images([torch.rand(3, 64, 32)], 32)[0].shape == (1, 3, 64, 32)
    with pytest.raises(ValueError, match="empty"):
        transforms.batch_images([])
    with pytest.raises(ValueError, match="images\\[1\\]"):
        transforms.batch_images([torch.rand(3, 5, 5), torch.rand(1, 5, 5)])
    with pytest.raises(ValueError, match="size_divisible"):
        transforms.batch_images(imgs, -1)


# ---------------------------------------------------------------- loaders

class _IndexSet(torch.utils.data.Dataset):
    """Items record the index and the augmentation seed they were asked with."""
    accepts_seeded_index = True

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i, seed = i if isinstance(i, tuple) else (i, None)
        return torch.tensor([i]), {"index": i, "seed": seed}


def _take(loader, k):
    out = []
    for b, (_, targets) in enumerate(loader):
        if b == k:
            break
        out.append([(t["index"], t["seed"]) for t in targets])
    return out


def test_collate():
    imgs, targets = collate([(torch.zeros(3, 4, 5), {"a": 1}), (torch.ones(3, 6, 2), {"a": 2})])
    assert [i.shape for i in imgs] == [(3, 4, 5), (3, 6, 2)] and [t["a"] for t in targets] == [1, 2]


def test_train_loader_deterministic_and_resumable():
    ds = _IndexSet(10)
    fresh = _take(build_loader(ds, 3, train=True, num_workers=0, seed=7), 12)
    assert fresh == _take(build_loader(ds, 3, train=True, num_workers=0, seed=7), 12)
    assert fresh != _take(build_loader(ds, 3, train=True, num_workers=0, seed=8), 12)
    for k in (1, 3, 4, 7):   # k=3 and 7 start mid-epoch (10 images, 3 per batch)
        assert _take(build_loader(ds, 3, train=True, num_workers=0, seed=7, start_iter=k), 12 - k) == fresh[k:]
    # each epoch is a permutation; epochs differ
    stream = [i for b in fresh for i, _ in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    seeds = [s for b in fresh for _, s in b]
    assert len(set(seeds)) == len(seeds)
    # worker processes deliver the same batches in the same order
    assert _take(build_loader(ds, 3, train=True, num_workers=2, seed=7, start_iter=2), 5) == fresh[2:7]


def test_train_loader_resume_replays_flips(tmp_path):
    data, img_dir = mini_coco(tmp_path, with_keypoints=True)
    data["images"] += [dict(data["images"][0], id=10 + i) for i in range(5)]
    ds = CocoDetection(write_json(tmp_path / "ann.json", data), img_dir, train=True, flip_pairs=((1, 3),))
    fresh = [b for _, b in zip(range(6), build_loader(ds, 2, train=True, num_workers=0, seed=3))]
    resumed = [b for _, b in zip(range(3), build_loader(ds, 2, train=True, num_workers=0, seed=3, start_iter=3))]
    flips = set()
    for (ia, ta), (ib, tb) in zip(fresh[3:], resumed):
        for x, y, u, v in zip(ia, ib, ta, tb):
            assert torch.equal(x, y) and u["image_id"] == v["image_id"] and torch.equal(u["boxes"], v["boxes"])
    for imgs, targets in fresh:
        for img, t in zip(imgs, targets):
            if img.shape[-1] == W:
                flips.add(bool(torch.equal(img, ds.load_image(ds.coco.imgs[t["image_id"]]))))
    assert flips == {True, False}


def test_train_loader_distributed_sharding():
    n, bs, ws = 24, 2, 3
    ds = _IndexSet(n)
    per_rank = [_take(build_loader(ds, bs, train=True, num_workers=0, seed=1, distributed=True, rank=r,
                                   world_size=ws), 8) for r in range(ws)]
    single = _take(build_loader(ds, bs * ws, train=True, num_workers=0, seed=1), 8)
    for it in range(8):
        joined = [x for r in range(ws) for x in per_rank[r][it]]
        assert [i for i, _ in joined] == [i for i, _ in single[it]]   # the ranks split the global batch
    first_epoch = [i for it in range(n // (bs * ws)) for r in range(ws) for i, _ in per_rank[r][it]]
    assert sorted(first_epoch) == list(range(n))
    with pytest.raises(ValueError, match="rank"):
        build_loader(ds, 2, train=True, distributed=True, rank=3, world_size=3)
    with pytest.raises(ValueError, match="distributed=False"):
        build_loader(ds, 2, train=True, rank=1, world_size=2)


@pytest.mark.parametrize("n,ws,bs", [(10, 1, 3), (10, 3, 2), (2, 4, 1), (0, 2, 2), (17, 4, 5)])
def test_eval_loader_covers_each_image_once(n, ws, bs):
    ds = _IndexSet(n)
    seen = []
    for r in range(ws):
        loader = build_loader(ds, bs, train=False, num_workers=0, distributed=ws > 1, rank=r, world_size=ws)
        batches = [[t["index"] for t in targets] for _, targets in loader]
        assert len(batches) == len(loader.batch_sampler)
        assert all(len(b) <= bs for b in batches)
        flat = [i for b in batches for i in b]
        assert flat == sorted(flat)          # sequential within a rank
        seen += flat
    assert sorted(seen) == list(range(n)) and len(seen) == n


def test_loader_bad_arguments():
    ds = _IndexSet(4)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, 0, train=True)
    with pytest.raises(ValueError, match="empty"):
        build_loader(_IndexSet(0), 2, train=True)
    with pytest.raises(ValueError, match="start_iter"):
        build_loader(ds, 2, train=True, start_iter=-1)
    with pytest.raises(ValueError, match="num_workers"):
        build_loader(ds, 2, train=True, num_workers=-1)
    assert TrainBatchSampler(4, 2).batch(0) == TrainBatchSampler(4, 2, start_iter=5).batch(0)
    assert EvalBatchSampler(5, 2, rank=1, world_size=2).indices() == [2, 3, 4]


# ---------------------------------------------------------------- bad input

def test_missing_and_malformed_json(tmp_path):
    data, img_dir = mini_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "nope.json", img_dir)
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        CocoDetection(bad, img_dir)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="broken.json"):
        CocoDetection(bad, img_dir)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="top level"):
        CocoDetection(bad, img_dir)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        CocoDetection(write_json(tmp_path / "ok.json", data), tmp_path / "no_such_dir")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_required_key(tmp_path, key):
    data, _ = mini_coco(tmp_path)
    del data[key]
    with pytest.raises(ValueError, match=f"missing required key.*{key}"):
        make_set(tmp_path, data)


@pytest.mark.parametrize("field,value,match", [
    ("image_id", 99, "unknown image id 99"),
    ("category_id", 3, "unknown category id 3"),
    ("bbox", [1, 2, 3], "bbox"),
    ("bbox", [1, 2, float("nan"), 4], "non-finite"),
    ("bbox", [1, 2, float("inf"), 4], "non-finite"),
])
def test_bad_annotation_references(tmp_path, field, value, match):
    data, _ = mini_coco(tmp_path)
    data["annotations"][1][field] = value
    with pytest.raises(ValueError, match=match) as e:
        make_set(tmp_path, data)
    assert "annotation id 2" in str(e.value) and "ann.json" in str(e.value)


def test_nan_anywhere_in_annotations(tmp_path):
    data, _ = mini_coco(tmp_path, with_keypoints=True)
    data["annotations"][0]["segmentation"][0][3] = float("nan")   # json.dumps writes the NaN literal
    with pytest.raises(ValueError, match="annotation id 1.*NaN"):
        make_set(tmp_path, data)
    data, _ = mini_coco(tmp_path, with_keypoints=True)
    data["annotations"][3]["keypoints"][4] = float("-inf")
    with pytest.raises(ValueError, match="annotation id 4.*keypoints"):
        make_set(tmp_path, data)
    data, _ = mini_coco(tmp_path)
    data["annotations"][0]["segmentation"][0][3] = 12345.678
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data).replace("12345.678", "1e999"))   # parses to inf without a NaN literal
    ds = CocoDetection(path, tmp_path / "images")
    with pytest.raises(ValueError, match="annotation id 1.*non-finite"):
        ds[0]


def test_duplicate_ids(tmp_path):
    data, _ = mini_coco(tmp_path)
    data["annotations"][1]["id"] = 1
    with pytest.raises(ValueError, match="duplicate annotation id 1"):
        make_set(tmp_path, data)
    data, _ = mini_coco(tmp_path)
    data["images"][1]["id"] = 1
    with pytest.raises(ValueError, match="duplicate image id 1"):
        make_set(tmp_path, data)


def test_image_file_problems(tmp_path):
    data, img_dir = mini_coco(tmp_path)
    data["images"].append({"id": 3, "file_name": "gone.jpg", "height": 10, "width": 10})
    data["images"].append({"id": 4, "file_name": "junk.png", "height": 10, "width": 10})
    data["images"].append({"id": 5, "file_name": "cut.png", "height": H, "width": W})
    data["images"][1]["width"] = 21   # b.png is 20 wide
    (img_dir / "junk.png").write_bytes(b"this is not an image")
    full = (img_dir / "a.png").read_bytes()
    (img_dir / "cut.png").write_bytes(full[: len(full) // 2])
    ds = make_set(tmp_path, data)     # problems surface per image, at __getitem__
    assert ds[0][0].shape == (3, H, W)
    with pytest.raises(ValueError, match="b.png.*20x30.*21x30"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        ds[2]
    with pytest.raises(ValueError, match="junk.png"):
        ds[3]
    with pytest.raises(ValueError, match="cut.png"):
        ds[4]


def test_bad_segmentations(tmp_path):
    data, _ = mini_coco(tmp_path)
    data["annotations"][1]["segmentation"][1] = [45, 25, 55, 25]   # a 2-point part: skipped with a warning
    ds = make_set(tmp_path, data)
    with pytest.warns(UserWarning, match="annotation id 2.*2 point"):
        _, t = ds[0]
    np.testing.assert_array_equal(t["masks"][1].numpy(), mask_util.decode(
        mask_util.frPyObjects([data["annotations"][1]["segmentation"][0]], H, W))[..., 0])
    data["annotations"][1]["segmentation"] = [[45, 25, 55, 25]]     # nothing left: instance dropped
    ds = make_set(tmp_path, data)
    with pytest.warns(UserWarning) as record:
        _, t = ds[0]
    assert any("instance dropped" in str(w.message) for w in record)
    assert len(t["boxes"]) == 3
    for seg, match in [([[1, 2, 3, 4, 5, 6, 7]], "odd number"), ([[[1, 2], 1, 2, 3, 4, 5]], "annotation id 2"),
                       ({"size": [H + 1, W], "counts": "abc"}, "RLE size"),
                       ({"size": [H, W], "counts": [5, 6]}, "sum"), (17, "segmentation must be")]:
        data["annotations"][1]["segmentation"] = seg
        ds = make_set(tmp_path, data)
        with pytest.raises(ValueError, match=match):
            ds[0]


def test_bad_keypoint_settings(tmp_path):
    data, img_dir = mini_coco(tmp_path)
    with pytest.raises(ValueError, match="use_keypoints"):
        make_set(tmp_path, data, use_keypoints=True)
    data, _ = mini_coco(tmp_path, with_keypoints=True)
    with pytest.raises(ValueError, match="flip_pairs"):
        make_set(tmp_path, data, train=True)   # the default COCO person pairs do not fit 4 keypoints
    assert make_set(tmp_path, data, use_keypoints=False)[0][1].get("keypoints") is None
    data["annotations"][0]["keypoints"] = [1, 2, 2]
    with pytest.raises(ValueError, match="annotation id 1.*12 numbers"):
        make_set(tmp_path, data)[0]
    with pytest.raises(ValueError, match="flip_prob"):
        make_set(tmp_path, data, flip_prob=1.5)


def test_image_modes(tmp_path):
    """16-bit grey is scaled (PIL's convert would clip it to white), grey / palette / RGBA give RGB, float
    images are refused by name, and EXIF orientation is applied as detectron2 does."""
    data, img_dir = mini_coco(tmp_path)
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(ref).save(img_dir / "b.png")
    ds = make_set(tmp_path, data)
    assert torch.equal(ds[1][0], torch.from_numpy(ref).permute(2, 0, 1).float() / 255)

    g16 = rng.integers(0, 65536, (30, 20), dtype=np.uint16)
    Image.fromarray(g16).save(img_dir / "b.png")            # a 16-bit PNG ("I;16" or "I" in PIL)
    img = ds[1][0]
    expect = torch.from_numpy(np.rint(g16 * (255 / 65535)).astype(np.uint8)).float() / 255
    assert img.shape == (3, 30, 20) and torch.allclose(img, expect.expand(3, -1, -1), atol=1.5 / 255)
    assert img.mean() < 0.9 and img.std() > 0.1             # not the clipped, near-white image

    for mode in ("L", "P", "RGBA", "LA", "CMYK"):
        Image.fromarray(ref).convert(mode).save(img_dir / "b.tif")
        data["images"][1]["file_name"] = "b.tif"
        img = make_set(tmp_path, data)[1][0]
        assert img.shape == (3, 30, 20) and img.dtype == torch.float32, mode
        if mode == "RGBA":
            assert torch.equal(img, torch.from_numpy(ref).permute(2, 0, 1).float() / 255)

    Image.fromarray(rng.random((30, 20), dtype=np.float32)).save(img_dir / "b.tif")
    with pytest.raises(ValueError, match="b.tif.*float"):
        make_set(tmp_path, data)[1]

    # EXIF orientation 6 (rotate 90 clockwise to display): a 20 x 30 (WxH) file shown as 30 x 20
    stored = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(img_dir / "r.jpg", exif=exif, quality=100)
    data["images"][1].update(file_name="r.jpg", width=30, height=20)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    img = make_set(tmp_path, data)[1][0]
    shown = np.rot90(np.asarray(Image.open(img_dir / "r.jpg").convert("RGB")), k=-1)
    assert img.shape == (3, 20, 30)
    assert torch.equal(img, torch.from_numpy(shown.copy()).permute(2, 0, 1).float() / 255)
    data["images"][1].update(width=20, height=30)             # sizes of the stored (unrotated) file
    with pytest.raises(ValueError, match="r.jpg is 30x20 .*EXIF orientation.*20x30.*says 20x30"):
        make_set(tmp_path, data)[1]
