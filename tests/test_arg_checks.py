"""The package's shared integer validators (mrcnn_fast.ops._checks)."""
import numpy as np
import pytest
import torch

from mrcnn_fast.ops._checks import check_int, check_int_pair


def test_check_int():
    assert check_int(3, "n") == 3 and type(check_int(np.int64(3), "n")) is int
    assert check_int(torch.tensor(4), "n") == 4 and check_int(0, "n", minimum=0) == 0
    for bad in (True, 2.0, "2", None, torch.tensor(2.0), torch.tensor([1, 2])):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int(bad, "n")
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        check_int(0, "n", minimum=1)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        check_int(-1, "n", minimum=0)


def test_check_int_pair():
    assert check_int_pair(7, "size") == (7, 7) and check_int_pair((2, np.int32(3)), "size") == (2, 3)
    assert check_int_pair(torch.Size([4, 5]), "size", minimum=1, scalar=False) == (4, 5)
    for bad in ("7", "77", (4.5, 4), (1, 2, 3), (True, 1), None):
        with pytest.raises(TypeError, match=r"size must be an int or a pair of ints"):
            check_int_pair(bad, "size")
    with pytest.raises(TypeError, match=r"size must be a pair of ints \(h, w\)"):
        check_int_pair(4, "size", scalar=False)
    with pytest.raises(ValueError, match=r"size must be positive, got \(2, 0\)"):
        check_int_pair((2, 0), "size", minimum=1)
    assert check_int_pair((0, -3), "padding") == (0, -3)     # no minimum: the caller checks the range
