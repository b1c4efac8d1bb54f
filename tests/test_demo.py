"""The demo's recipe, its CPU-dependent precision and what it says when a machine is too slow for it."""
import pytest

from mrcnn_fast import cli, demo
from mrcnn_fast.engine import trainer as tr


def test_expected_ap_follows_the_measured_curve():
    pts = demo.SEGM_AP_BY_ITERATIONS
    for n, ap in pts:
        assert demo.expected_segm_ap(n) == pytest.approx(ap)
    (n0, a0), (n1, a1) = pts[1], pts[2]
    assert demo.expected_segm_ap((n0 + n1) // 2) == pytest.approx(a0 + (a1 - a0) * ((n0 + n1) // 2 - n0) / (n1 - n0))
    assert demo.expected_segm_ap(0) == 0.0 and demo.expected_segm_ap(10 ** 6) == pts[-1][1]
    # monotone: more iterations never expect less
    seq = [demo.expected_segm_ap(n) for n in range(0, pts[-1][0] + 200, 50)]
    assert all(b >= a for a, b in zip(seq, seq[1:]))


def test_iterations_for_the_target_is_where_the_curve_reaches_it():
    need = demo.iterations_for(demo.TARGET_SEGM_AP)
    assert need is not None
    assert demo.expected_segm_ap(need) == pytest.approx(demo.TARGET_SEGM_AP, abs=1e-3)
    assert demo.expected_segm_ap(need - 50) < demo.TARGET_SEGM_AP
    assert demo.iterations_for(0.99) is None


def test_shortfall_note_only_when_too_few_iterations():
    need = demo.iterations_for(demo.TARGET_SEGM_AP)
    assert demo.shortfall_note(need, 3.0) == [] and demo.shortfall_note(need + 500, None) == []
    lines = demo.shortfall_note(need // 2, 1.25)
    assert len(lines) == 2
    assert f"trained {need // 2} iterations" in lines[0] and "1.25 it/s" in lines[0]
    assert f"~{demo.expected_segm_ap(need // 2):.2f}" in lines[0] and f"--max-iter {need}" in lines[1]


@pytest.mark.parametrize("native", [True, False])
def test_demo_precision_follows_the_cpu(monkeypatch, native):
    """bfloat16 autocast where the CPU has native bfloat16 (AMX / AVX512-BF16), float32 elsewhere."""
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: native)
    cfg = demo.demo_config(100)
    assert cfg.solver.cpu_autocast == "auto"
    assert tr.cpu_bf16_autocast(cfg.solver.cpu_autocast) is native


def test_cpu_flags_decide_native_bf16(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open

    def fake_cpuinfo(flags):
        def _open(path, *a, **k):
            if path == "/proc/cpuinfo":
                p = tmp_path / "cpuinfo"
                p.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
                return real_open(p, *a, **k)
            return real_open(path, *a, **k)
        return _open

    for flags, want in (("fpu sse avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                        ("fpu sse avx2 avx512f", False)):
        monkeypatch.setattr(builtins, "open", fake_cpuinfo(flags))
        assert tr.cpu_has_native_bf16() is want, flags


def test_demo_command_prints_the_note_last(monkeypatch, capsys, tmp_path):
    notes = demo.shortfall_note(100, 0.5)
    metrics = {"bbox": {"AP": 0.1}, "segm": {"AP": 0.12}}
    seen = {}

    def fake_run_demo(output, **kw):
        seen.update(kw)
        return demo.DemoResult(metrics, 100, 0.5, notes)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--output", str(tmp_path), "--opts", "solver.base_lr=0.01"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == "segm AP 0.1200 bbox AP 0.1000"
    assert err.strip().splitlines()[-2:] == notes
    assert seen["overrides"] == {"solver": {"base_lr": 0.01}} and seen["max_iter"] is None


def test_run_demo_rejects_bad_arguments_before_any_work(tmp_path):
    for kw, msg in (({"max_iter": 0}, "max_iter"), ({"val_images": 0}, "val images"),
                    ({"num_images": -1}, "num_images"), ({"time_budget": demo.DEMO_RESERVE}, "time_budget")):
        with pytest.raises(ValueError, match=msg):
            demo.run_demo(tmp_path / "d", **kw)
    assert not (tmp_path / "d").exists()
