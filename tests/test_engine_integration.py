"""The real model and data end to end: CLI train -> checkpoints -> CLI eval -> AP table, and exact resume."""
import re

import pytest
import torch
from safetensors.torch import load_file

from mrcnn_fast import cli
from mrcnn_fast.config import get_config, merge
from mrcnn_fast.engine import checkpoint as ckpt
from mrcnn_fast.engine import train

# A shrunken small_cpu: 96-pixel inputs, few proposals; 4 iterations are enough to exercise everything.
TINY_OPTS = ["input.min_size_train=[96]", "input.max_size_train=128", "input.min_size_test=96",
             "input.max_size_test=128", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=50",
             "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=30",
             "model.roi_heads.batch_size_per_image=32",
             "solver.ims_per_batch=2", "solver.warmup_iters=2", "solver.base_lr=0.005", "train.checkpoint_period=2",
             "train.num_workers=0", "train.log_period=1", "train.device=cpu", "model.keypoint.num_convs=1",
             "model.keypoint.conv_dim=16", "model.mask.num_convs=1", "model.mask.conv_dim=16"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from mrcnn_fast.data import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=3, seed=1, image_size=(96, 96))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_cli_train_then_eval_prints_ap_table(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--train-json", shapes["train_json"], "--train-images", shapes["train_images"],
                     "--val-json", shapes["val_json"], "--val-images", shapes["val_images"], "--output", str(out),
                     "--config", "small_cpu", "--max-iter", "4", "--opts", *TINY_OPTS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "iter 4/4" in captured.err
    for name in ("model_0000002.safetensors", ckpt.FINAL_WEIGHTS, ckpt.STATE_FILE, ckpt.CONFIG_FILE, "metrics.json"):
        assert (out / name).is_file(), name
    state = torch.load(out / ckpt.STATE_FILE, weights_only=True)
    assert state["iteration"] == 4 and state["config"]["input"]["min_size_test"] == 96
    train_lines = captured.out.strip().splitlines()
    assert "iou type" in train_lines[0] and re.fullmatch(
        r"segm AP \d\.\d{4} bbox AP \d\.\d{4} keypoints AP \d\.\d{4}", train_lines[-1]), captured.out

    # eval reads config.json beside the weights: same model, same numbers
    code = cli.main(["eval", "--weights", str(out / ckpt.FINAL_WEIGHTS), "--json", shapes["val_json"],
                     "--images", shapes["val_images"], "--num-workers", "0", "--output", str(tmp_path / "m.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    eval_lines = captured.out.strip().splitlines()
    assert eval_lines[-1] == train_lines[-1]
    assert any(line.startswith("segm ") and "|" in line for line in eval_lines)
    assert (tmp_path / "m.json").is_file()

    # the training state is itself loadable as weights
    code = cli.main(["eval", "--weights", str(out / ckpt.STATE_FILE), "--json", shapes["val_json"],
                     "--images", shapes["val_images"], "--num-workers", "0"])
    assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1] == train_lines[-1]


def test_cli_train_time_budget_and_scaled_steps(shapes, tmp_path, capsys):
    """--max-iter keeps a step schedule's steps at their fractions of the run (the shapes preset drops the lr
    at 5/6); --time-budget is accepted and validated."""
    base = ["train", "--train-json", shapes["train_json"], "--train-images", shapes["train_images"],
            "--output", str(tmp_path / "run"), "--config", "shapes"]
    assert get_config("shapes").solver.steps == (2500,) and get_config("shapes").solver.max_iter == 3000
    code = cli.main(base + ["--max-iter", "6", "--time-budget", "1000", "--opts", *TINY_OPTS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "time budget" in captured.err and "iter 6/6" in captured.err
    state = torch.load(tmp_path / "run" / ckpt.STATE_FILE, weights_only=True)
    assert state["iteration"] == 6 and list(state["config"]["solver"]["steps"]) == [5]
    assert cli.main(base + ["--time-budget", "-5"]) != 0
    assert "--time-budget must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_resume_matches_uninterrupted(shapes, tmp_path):
    cfg = merge(get_config("small_cpu"), cli.parse_opts(TINY_OPTS + ["train.log_period=100"]))
    kw = dict(train_json=shapes["train_json"], train_images=shapes["train_images"], max_iter=5, log=lambda m: None)
    train(cfg, output_dir=tmp_path / "straight", **kw)

    def stop(trainer, done):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, output_dir=tmp_path / "resumed", hooks=[stop], **kw)
    assert torch.load(tmp_path / "resumed" / ckpt.STATE_FILE, weights_only=True)["iteration"] == 2
    train(cfg, output_dir=tmp_path / "resumed", resume=True, **kw)
    a = load_file(str(tmp_path / "straight" / ckpt.FINAL_WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / ckpt.FINAL_WEIGHTS))
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()}
    assert max(diff.values()) == 0.0, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.slow
def test_cli_train_under_torchrun_two_processes(shapes, tmp_path):
    import os
    import subprocess
    import sys

    from test_engine_distributed import _torchrun

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "mrcnn_fast", "train",
                         "--train-json", shapes["train_json"], "--train-images", shapes["train_images"],
                         "--val-json", shapes["val_json"], "--val-images", shapes["val_images"],
                         "--output", str(tmp_path), "--config", "small_cpu", "--max-iter", "3",
                         "--opts", *TINY_OPTS]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("segm AP ") == 1 and "2 process(es)" in r.stderr   # rank 0 alone prints
    assert torch.load(tmp_path / ckpt.STATE_FILE, weights_only=True)["world_size"] == 2


def test_demo_command_end_to_end(tmp_path, capsys):
    code = cli.main(["demo", "--output", str(tmp_path), "--max-iter", "2", "--train", "4", "--val", "2",
                     "--num-images", "2", "--opts", *[o for o in TINY_OPTS if not o.startswith("train.checkpoint")]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["000001.png", "000002.png"]
    assert (tmp_path / "train" / ckpt.FINAL_WEIGHTS).is_file()
    assert re.fullmatch(r"segm AP \d\.\d{4} bbox AP \d\.\d{4} keypoints AP \d\.\d{4}",
                        captured.out.strip().splitlines()[-1])
    assert "[demo] total wall time" in captured.err


@pytest.mark.slow
def test_cpu_bfloat16_autocast_trains_and_resumes_exactly(shapes, tmp_path):
    """solver.cpu_autocast=bfloat16: the model runs under CPU bfloat16 autocast (the ops take the bfloat16
    features in float32), losses, weights and checkpoints stay float32, training changes the weights and a
    killed run resumes bit-exactly as with float32."""
    cfg = merge(get_config("small_cpu"), cli.parse_opts(TINY_OPTS + ["train.log_period=100",
                                                                     "solver.cpu_autocast=bfloat16"]))
    seen = []

    def spy(trainer, done):
        assert trainer.amp_cpu
        seen.append(dict(trainer.last_losses))

    kw = dict(train_json=shapes["train_json"], train_images=shapes["train_images"], max_iter=4, log=lambda m: None)
    train(cfg, output_dir=tmp_path / "straight", hooks=[spy], **kw)
    assert len(seen) == 4 and all(all(map(torch.isfinite, map(torch.tensor, d.values()))) for d in seen)
    a = load_file(str(tmp_path / "straight" / ckpt.FINAL_WEIGHTS))
    assert {v.dtype for v in a.values() if v.is_floating_point()} == {torch.float32}

    def stop(trainer, done):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, output_dir=tmp_path / "resumed", hooks=[stop], **kw)
    train(cfg, output_dir=tmp_path / "resumed", resume=True, **kw)
    b = load_file(str(tmp_path / "resumed" / ckpt.FINAL_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["fp16", "on", ""])
def test_cpu_autocast_rejects_unknown_modes(shapes, tmp_path, mode):
    cfg = merge(get_config("small_cpu"), cli.parse_opts(TINY_OPTS))
    cfg = merge(cfg, {"solver": {"cpu_autocast": mode}})
    with pytest.raises(ValueError, match="solver.cpu_autocast must be"):
        train(cfg, train_json=shapes["train_json"], train_images=shapes["train_images"], output_dir=tmp_path,
              max_iter=1, log=lambda m: None)


def test_cpu_bf16_autocast_modes(monkeypatch):
    from mrcnn_fast.engine import trainer as tr

    assert tr.cpu_bf16_autocast("bfloat16") and not tr.cpu_bf16_autocast("none")
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: False)
    assert not tr.cpu_bf16_autocast("auto")
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: True)
    assert tr.cpu_bf16_autocast("auto")
