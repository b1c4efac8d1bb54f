import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_standin import FakeEvaluator, TinyDataset, TinyDetector, loader, small_cfg
from mrcnn_fast.config import merge
from mrcnn_fast.engine import Trainer, evaluate, seed_everything
from mrcnn_fast.engine import checkpoint as ckpt

HERE = Path(__file__).resolve().parent


def _env():
    env = dict(os.environ)
    # the subprocess must import the same mrcnn_fast (source tree or installed) as this test process
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in sys.path if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_script(out, *args, expect_rc=0):
    r = subprocess.run([sys.executable, str(HERE / "engine_standin.py"), "run", "--out", str(out), *args],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == expect_rc, r.stderr[-3000:]
    return r


def _losses(out):
    lines = (Path(out) / "losses_rank0.jsonl").read_text().splitlines()
    return {d["iter"]: d for d in map(json.loads, lines)}


def _assert_same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    common = ["--max-iter", "10", "--ckpt-period", "4", "--eval-period", "3"]
    _run_script(straight, *common)
    # SIGKILL right after iteration 6: the last checkpoint is the one of iteration 4
    _run_script(killed, *common, "--kill-at", "6", expect_rc=-9)
    assert not (killed / ckpt.FINAL_WEIGHTS).exists()
    assert torch.load(killed / ckpt.STATE_FILE, weights_only=True)["iteration"] == 4
    _run_script(killed, *common, "--resume")
    _assert_same_weights(straight / ckpt.FINAL_WEIGHTS, killed / ckpt.FINAL_WEIGHTS)
    _assert_same_weights(straight / "model_0000008.safetensors", killed / "model_0000008.safetensors")
    a, b = _losses(straight), _losses(killed)   # b: iterations 1-6 of the killed run, then 5-10 resumed
    assert sorted(b) == list(range(1, 11))
    for it in range(5, 11):
        assert a[it] == b[it], it
    state = torch.load(killed / ckpt.STATE_FILE, weights_only=True)
    assert state["iteration"] == 10 and state["config"]["solver"]["max_iter"] == 10
    assert not [p for p in os.listdir(killed) if p.endswith(".tmp")]


def _trainer(out, *, max_iter=8, resume=False, hooks=(), cfg=None, evaluate_fn=None):
    cfg = cfg or merge(small_cfg(max_iter=max_iter), {"train": {"checkpoint_period": 3}})
    seed_everything(cfg.train.seed)
    model = TinyDetector()
    data = TinyDataset()
    return Trainer(cfg, model, lambda s: loader(data, 4, seed=cfg.train.seed, start_iter=s), output_dir=out,
                   resume=resume, hooks=hooks, evaluate_fn=evaluate_fn, log=lambda m: None)


def test_resume_after_exception_in_process(tmp_path):
    torch.set_num_threads(1)
    ref = _trainer(tmp_path / "ref")
    ref.train()

    def interrupt(trainer, done):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "run", hooks=[interrupt]).train()
    resumed = _trainer(tmp_path / "run", resume=True)
    assert resumed.iteration == 3
    resumed.train()
    _assert_same_weights(tmp_path / "ref" / ckpt.FINAL_WEIGHTS, tmp_path / "run" / ckpt.FINAL_WEIGHTS)
    assert resumed.last_losses == ref.last_losses
    assert resumed.optimizer.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"]


def test_resume_without_checkpoint_starts_at_zero_and_finished_run_does_not_retrain(tmp_path):
    logs = []
    t = _trainer(tmp_path, resume=True)
    assert t.iteration == 0
    t.train()
    final = (tmp_path / ckpt.FINAL_WEIGHTS).read_bytes()
    calls = []
    again = _trainer(tmp_path, resume=True, evaluate_fn=lambda m: calls.append(1) or {"bbox": {"AP": 0.1}})
    assert again.iteration == 8
    seen = []
    again.hooks.append(lambda tr, d: seen.append(d))
    again.train()
    assert seen == [] and calls == [1]   # no training step, evaluation still runs
    assert (tmp_path / ckpt.FINAL_WEIGHTS).read_bytes() == final
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"iteration": 8, "bbox": {"AP": 0.1}}
    del logs


def test_periodic_and_final_files(tmp_path):
    t = _trainer(tmp_path, max_iter=7)
    t.train()
    names = sorted(os.listdir(tmp_path))
    assert names == [ckpt.STATE_FILE, "model_0000003.safetensors", "model_0000006.safetensors", ckpt.FINAL_WEIGHTS]
    st = torch.load(tmp_path / ckpt.STATE_FILE, weights_only=True)
    assert st["iteration"] == 7 and st["world_size"] == 1 and len(st["rng"]) == 1
    assert set(st["model"]) == set(load_file(str(tmp_path / ckpt.FINAL_WEIGHTS)))


def test_non_finite_loss_raises_with_iteration(tmp_path):
    class Exploding(TinyDetector):
        def forward(self, images, targets=None):
            out = super().forward(images, targets)
            out["loss_box"] = out["loss_box"] * float("nan")
            return out

    cfg = small_cfg()
    t = Trainer(cfg, Exploding(), lambda s: loader(TinyDataset(), 4, seed=0, start_iter=s), output_dir=tmp_path,
                log=lambda m: None)
    with pytest.raises(FloatingPointError, match="iteration 0.*loss_box"):
        t.train()


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    cfg = merge(small_cfg(max_iter=1), {"solver": {"clip_grad_norm": 1e-3, "weight_decay": 0.0, "base_lr": 1.0,
                                                    "warmup_iters": 0, "momentum": 0.0}})
    t = _trainer(tmp_path, cfg=cfg)
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(t.model.parameters(), before)))
    assert 0 < step.item() <= 1e-3 * 1.0001   # lr 1 * clipped norm


def test_progress_log_lines_without_tty(tmp_path, capsys):
    cfg = merge(small_cfg(max_iter=4), {"train": {"log_period": 2}})
    seed_everything(0)
    t = Trainer(cfg, TinyDetector(), lambda s: loader(TinyDataset(), 4, seed=0, start_iter=s), output_dir=tmp_path)
    t.train()
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("iter ")]
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "4/4"]
    assert all("loss " in ln and "cls " in ln and " lr " in ln and "it/s" in ln and "eta " in ln for ln in lines)


def test_evaluate_single_process_covers_all_images():
    data = TinyDataset(n=5)
    m = TinyDetector()
    m.train()
    metrics = evaluate(m, data, evaluator_factory=FakeEvaluator)
    assert metrics["images"]["ids"] == [100, 101, 102, 103, 104]
    assert m.training   # mode restored


def test_hook_can_change_run_length(tmp_path):
    t = _trainer(tmp_path, max_iter=100, hooks=[lambda tr, d: d == 3 and tr.set_max_iter(6)])
    t.train()
    assert t.iteration == 6
    st = torch.load(tmp_path / ckpt.STATE_FILE, weights_only=True)
    assert st["iteration"] == 6 and st["config"]["solver"]["max_iter"] == 6
    with pytest.raises(ValueError, match="max_iter"):
        t.set_max_iter(5)


@pytest.mark.parametrize("seconds, expect", [(0.0, 8), (1e6, 20)])
def test_demo_time_budget_hook(tmp_path, seconds, expect):
    import time

    from mrcnn_fast.engine.hooks import TimeBudget

    budget = TimeBudget(time.perf_counter() + seconds, calibrate=4, skip=2, min_iter=8, max_iter=20,
                        step_fractions=(5 / 6,))
    cfg = merge(small_cfg(max_iter=1000), {"solver": {"schedule": "step", "steps": [900]}})
    t = _trainer(tmp_path, cfg=cfg, hooks=[budget])
    t.train()
    assert budget.chosen == expect and t.iteration == expect
    assert t.cfg.solver.steps == (round(expect * 5 / 6),) and t.scheduler.kw["steps"] == t.cfg.solver.steps


def test_progress_bar_on_a_terminal():
    import io

    from mrcnn_fast.engine.trainer import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    p = Progress(0, 10, log_period=2, stream=s)
    assert p.bar is not None
    for i in range(1, 11):
        p.update(i, {"loss_a": 1.0} if i % 2 == 0 else None, 0.01, grad_norm=3.0 if i % 2 == 0 else None)
    p.write("hello")
    p.close()
    text = s.getvalue()
    assert "10/10" in text and "a 1.000" in text and "gnorm 3" in text and "hello" in text


def test_demo_time_budget_follows_a_slowing_run(monkeypatch):
    """Iterations get 2x slower halfway (as when the RPN starts feeding positives to the heads): the re-measured
    speed must still end the run within the deadline, close to it, and never move a step already passed."""
    import types

    from mrcnn_fast.engine import hooks

    clock = [0.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: clock[0])

    class FakeTrainer:
        def __init__(self):
            self.max_iter = 3000
            self.cfg = types.SimpleNamespace(solver=types.SimpleNamespace(schedule="step", steps=(2500,)))
            self.history = []

        def set_max_iter(self, n, *, steps=None):
            assert n >= done
            self.history.append((done, n, tuple(steps)))
            self.max_iter, self.cfg.solver.steps = n, tuple(steps)

    tr = FakeTrainer()
    budget = hooks.TimeBudget(60.0, calibrate=20, skip=5, recheck=10, min_iter=10, max_iter=3000)
    done = 0
    while done < tr.max_iter:
        clock[0] += 0.1 if done < 150 else 0.2
        done += 1
        budget(tr, done)
    assert 0.85 * 60 <= clock[0] <= 60.0, (clock[0], tr.history)
    assert tr.max_iter == done and tr.max_iter < 600
    step = tr.cfg.solver.steps[0]
    assert step < tr.max_iter
    # once passed, the step never moved again
    assert all(s[0] == step for d, n, s in tr.history if d >= step)


def test_demo_time_budget_stops_at_deadline(monkeypatch):
    import types

    from mrcnn_fast.engine import hooks

    clock = [0.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: clock[0])
    tr = types.SimpleNamespace(max_iter=1000,
                               cfg=types.SimpleNamespace(solver=types.SimpleNamespace(schedule="cosine")))

    def set_max_iter(n, *, steps=None):
        assert steps is None
        tr.max_iter = n

    tr.set_max_iter = set_max_iter
    budget = hooks.TimeBudget(10.0, calibrate=4, skip=1, recheck=2, min_iter=4, max_iter=1000)
    done = 0
    while done < tr.max_iter:
        clock[0] += 0.5 if done < 10 else 5.0   # a sudden 10x slow-down (machine got loaded)
        done += 1
        budget(tr, done)
    assert done <= 16 and clock[0] < 10.0 + 3 * 5.0
    with pytest.raises(ValueError):
        hooks.TimeBudget(1.0, calibrate=2, skip=2)


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_trainer_keeps_freed_host_memory_when_configured(tmp_path, monkeypatch, keep):
    from mrcnn_fast.engine import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = merge(small_cfg(), {"train": {"keep_freed_memory": keep}})
    Trainer(cfg, TinyDetector(), lambda s: loader(TinyDataset(), 4, seed=0, start_iter=s), output_dir=tmp_path)
    assert calls == ([1] if keep else [])


def test_keep_freed_memory_sets_glibc_thresholds():
    """In fresh processes (the setting is process-wide): an 8 MB block, above glibc's default mmap threshold, is
    mmapped and its memory returned to the OS when freed without the setting; with it the block comes from the
    heap and stays there after free. Idempotent; reports False where it does not apply (not Linux/glibc)."""
    import platform

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        from mrcnn_fast.engine import host_memory as hm
        assert hm.keep_freed_memory() is False
        return
    code = (
        "import ctypes, sys\n"
        "from mrcnn_fast.engine import host_memory as hm\n"
        "if sys.argv[1] == 'keep':\n"
        "    assert hm.keep_freed_memory() is True and hm.keep_freed_memory() is True\n"
        "class MI(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',\n"
        "                                                'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "if not hasattr(libc, 'mallinfo2'): print('no-mallinfo2'); sys.exit(0)\n"
        "libc.mallinfo2.restype = MI\n"
        "libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = (ctypes.c_void_p,)\n"
        "before = libc.mallinfo2()\n"
        "p = libc.malloc(8 << 20); ctypes.memset(p, 1, 8 << 20); during = libc.mallinfo2(); libc.free(p)\n"
        "after = libc.mallinfo2()\n"
        "print(during.hblkhd - before.hblkhd >= 8 << 20, after.fordblks >= 8 << 20)\n")
    out = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", code, mode], env=_env(), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out[mode] = r.stdout.split()
        if out[mode] == ["no-mallinfo2"]:
            pytest.skip("glibc older than 2.33 (no mallinfo2 to observe the heap with)")
    assert out["default"] == ["True", "False"]   # mmapped, and unmapped again on free
    assert out["keep"] == ["False", "True"]      # from the heap, and kept free there
