"""Keypoint conventions in one place: the COCO person keypoints' horizontal-flip pairs, the flip pairs read from
keypoint names, and the index permutation a flip applies. Used by the data sets, the config and the trainer."""
from __future__ import annotations

import re
from collections.abc import Sequence

# 0-based indices of the 17 COCO person keypoints swapped by a horizontal flip (left_eye <-> right_eye, ...).
COCO_PERSON_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


def flip_pairs_from_names(names: Sequence[str]) -> tuple[tuple[int, int], ...] | None:
    """The index pairs of keypoint names that are mirror images by their words: "left_eye" / "right_eye",
    "Left Hand" / "Right Hand", "top" / "bottom" is not one, a lone "left" / "right" is (a shape's left and right
    vertex). None when the names are not unique (no reliable map); () when no name has a mirror."""
    low = [n.strip().lower() for n in names]
    if len(set(low)) != len(low):
        return None
    index = {n: i for i, n in enumerate(low)}
    pairs = []
    for i, n in enumerate(low):
        words = re.split(r"([^a-z0-9]+)", n)
        if "left" not in words:
            continue
        j = index.get("".join("right" if w == "left" else w for w in words))
        if j is not None and j != i:
            pairs.append((min(i, j), max(i, j)))
    return tuple(sorted(set(pairs)))


def flip_permutation(num_keypoints: int, flip_pairs: Sequence[Sequence[int]]) -> list[int]:
    """The keypoint index permutation a horizontal flip applies (0-based pairs, e.g. left/right eye)."""
    perm = list(range(num_keypoints))
    seen = set()
    for pair in flip_pairs:
        if len(pair) != 2:
            raise ValueError(f"flip_pairs entries must be (i, j) pairs, got {pair!r}")
        i, j = int(pair[0]), int(pair[1])
        for k in (i, j):
            if not 0 <= k < num_keypoints:
                raise ValueError(
                    f"flip_pairs index {k} out of range for {num_keypoints} keypoints (pairs are 0-based)")
            if k in seen:
                raise ValueError(f"flip_pairs uses keypoint {k} twice")
            seen.add(k)
        perm[i], perm[j] = j, i
    return perm
