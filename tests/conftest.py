import pytest
import torch

import mrcnn_fast

HAS_CUDA = mrcnn_fast.has_cuda() and torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of mrcnn_fast")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rand_boxes(n, size=100.0, *, dtype=torch.float32, device="cpu", generator=None):
    """Tensor[n, 4] of valid (x1, y1, x2, y2) boxes inside roughly [0, size]."""
    xy = torch.rand(n, 2, dtype=torch.float64, generator=generator) * size
    wh = torch.rand(n, 2, dtype=torch.float64, generator=generator) * size / 2 + 0.5
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)
