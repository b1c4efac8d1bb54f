import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mrcnn_fast.engine import checkpoint as ckpt
from mrcnn_fast.engine import distributed as du

HERE = Path(__file__).resolve().parent


def _torchrun():
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.slow
def test_two_process_gloo_training_stays_in_sync_and_gathers_every_image_once(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in sys.path if p])
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # 7 images: the two ranks get uneven shards (4 + 3) and nothing may be padded or duplicated
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", str(HERE / "engine_standin.py"), "ddp",
                         "--out", str(tmp_path), "--n-images", "7", "--max-iter", "6", "--ckpt-period", "4",
                         "--eval-period", "3"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    w0, w1 = load_file(str(tmp_path / "final_rank0.safetensors")), load_file(str(tmp_path / "final_rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:   # parameters via DDP's all-reduce, BatchNorm statistics via the broadcast before saving
        assert torch.equal(w0[k], w1[k]), k
    final = load_file(str(tmp_path / ckpt.FINAL_WEIGHTS))
    assert all(torch.equal(final[k], w0[k]) for k in w0)

    metrics = json.loads((tmp_path / "metrics_out.json").read_text())
    assert metrics["images"]["ids"] == list(range(100, 107))

    l0 = (tmp_path / "losses_rank0.jsonl").read_text()
    assert l0 == (tmp_path / "losses_rank1.jsonl").read_text()   # losses are averaged over ranks
    assert len(l0.splitlines()) == 6
    st = torch.load(tmp_path / ckpt.STATE_FILE, weights_only=True)
    assert st["world_size"] == 2 and len(st["rng"]) == 2 and st["iteration"] == 6
    assert not torch.equal(st["rng"][0]["torch"], st["rng"][1]["torch"])   # per-rank random streams
    # only rank 0 printed
    assert r.stderr.count("iter 6/6") == 1


def test_single_process_helpers_are_identities():
    assert not du.is_dist() and du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main_process()
    assert du.all_gather_object({"a": 1}) == [{"a": 1}]
    assert du.broadcast_object(3) == 3
    t = torch.ones(2)
    assert du.all_reduce_mean(t) is t
    du.barrier()
    ctx = du.init_distributed("cpu")
    assert ctx.world_size == 1 and ctx.device == torch.device("cpu") and not ctx.distributed
    with pytest.raises(ValueError, match="train.device"):
        du.init_distributed("tpu")
