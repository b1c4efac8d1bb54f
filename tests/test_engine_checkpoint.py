import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from mrcnn_fast.engine import CheckpointError, load_weights, save_weights
from mrcnn_fast.engine import checkpoint as ckpt


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_failure_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.pt"
    ckpt.atomic_write_bytes(target, b"old content")

    def half_then_fail(f):
        f.write(b"new cont")
        raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["state.pt"]


def test_atomic_torch_save_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ckpt.STATE_FILE
    ckpt.save_training_state(path, {"iteration": 1, "model": {}, "optimizer": {}, "scheduler": {}})

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")   # something already written when the failure hits
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_state(path, {"iteration": 2, "model": {}, "optimizer": {}, "scheduler": {}})
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_training_state(path)["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == [ckpt.STATE_FILE]


def test_stale_temp_of_dead_process_is_removed(tmp_path):
    # a pid that cannot exist on Linux (> pid_max) stands for a process killed mid-write
    stale = tmp_path / ".model_final.safetensors.4194999.deadbeef.tmp"
    stale.write_bytes(b"x")
    mine = tmp_path / f".model_final.safetensors.{os.getpid()}.cafe0000.tmp"
    mine.write_bytes(b"y")
    ckpt.remove_stale_temps(tmp_path)
    assert not stale.exists() and mine.exists()


def test_written_files_are_world_readable_like_open(tmp_path):
    p = ckpt.atomic_write_text(tmp_path / "config.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


# ---------------------------------------------------------------------------------------------- weights
def test_safetensors_round_trip_including_buffers(tmp_path):
    a, b = _model(0), _model(1)
    a[1].running_mean.add_(3.0)
    a[1].num_batches_tracked += 5
    save_weights(a, tmp_path / "w.safetensors")
    assert not _same(a, b)
    assert load_weights(b, tmp_path / "w.safetensors") == ([], [])
    assert _same(a, b)


@pytest.mark.parametrize("wrap", ["plain", "model_key", "state_dict_key", "ddp_prefix"])
def test_load_torch_state_dicts(tmp_path, wrap):
    a, b = _model(0), _model(1)
    sd = a.state_dict()
    obj = {"plain": sd, "model_key": {"model": sd, "iteration": 3}, "state_dict_key": {"state_dict": sd},
           "ddp_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pth")
    load_weights(b, tmp_path / "w.pth")
    assert _same(a, b)


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(_model(), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_load_weights_corrupt_file(tmp_path, name):
    good = tmp_path / ("good" + os.path.splitext(name)[1])
    if name.endswith(".safetensors"):
        save_weights(_model(), good)
    else:
        torch.save(_model().state_dict(), good)
    (tmp_path / name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])   # truncated
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(_model(), tmp_path / name)


def test_load_weights_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_weights(_model(), tmp_path / "evil.pt")


def test_load_weights_non_state_dict(tmp_path):
    torch.save({"iteration": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_weights(_model(), tmp_path / "x.pt")


def test_load_weights_shape_mismatch_names_keys(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 5))
    save_weights(other, tmp_path / "w.safetensors")
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatch for 2 tensor") as e:
        load_weights(m, tmp_path / "w.safetensors")
    assert "3.weight (checkpoint (5, 4) vs model (2, 4))" in str(e.value) and "3.bias (checkpoint (5,)" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # nothing half-loaded


def test_load_weights_missing_and_unexpected_keys(tmp_path):
    sd = _model().state_dict()
    sd.pop("3.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_weights(sd, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: 3\.bias; not in the model: extra\.weight"):
        load_weights(_model(), tmp_path / "w.safetensors")
    missing, unexpected = load_weights(_model(), tmp_path / "w.safetensors", strict=False)
    assert missing == ["3.bias"] and unexpected == ["extra.weight"]


# ---------------------------------------------------------------------------------------------- training state
def test_training_state_loads_with_weights_only_and_restores_rngs(tmp_path):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.rand(2, 3, 3, 3)).sum().backward()
    opt.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()   # leaves a cached gaussian in numpy
    state = {"model": ckpt.model_state(m), "optimizer": opt.state_dict(), "scheduler": {"iteration": 1},
             "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(), "iteration": 1,
             "rng": [ckpt.rng_state()], "config": ckpt.plain({"a": (1, (2, 3)), "b": "x"})}
    expect = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    ckpt.save_training_state(tmp_path / "s.pt", state)
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)   # the contract: plain weights_only loading
    assert loaded["config"] == {"a": [1, [2, 3]], "b": "x"}
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(loaded["rng"][0])
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:3] == expect[:3] and torch.equal(got[3], expect[3])


def test_load_training_state_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_training_state(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_training_state(tmp_path / "bad.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="not a training state"):
        ckpt.load_training_state(tmp_path / "partial.pt")
