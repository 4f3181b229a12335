"""starling_lib.training: the learning-rate schedule and checkpoint discovery, by hand."""

from types import SimpleNamespace

import pytest

from starling_lib.training import checkpoints, lr_lambda, resume_point


def test_lr_schedule_by_hand():
    cfg = SimpleNamespace(warmup_steps=2, steps=6, lr_schedule="linear")
    assert [lr_lambda(cfg)(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    cfg.lr_schedule = "cosine"                          # halfway through the decay: (1 + cos(pi/2)) / 2
    assert lr_lambda(cfg)(4) == pytest.approx(0.5) and lr_lambda(cfg)(6) == pytest.approx(0.0)
    cfg.lr_schedule = "constant"
    assert [lr_lambda(cfg)(s) for s in (0, 1, 5, 100)] == [0.5, 1.0, 1.0, 1.0]


def test_only_complete_checkpoints_count_in_step_order(tmp_path):
    for step, complete in [(10, True), (2, True), (30, False)]:   # step 30 was interrupted mid-save
        path = tmp_path / "checkpoints" / f"step-{step:06d}"
        path.mkdir(parents=True)
        if complete:
            (path / "trainer_state.json").write_text('{"step": %d, "config": {"lr": 1}}' % step)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002", "step-000010"]
    cfg = SimpleNamespace(output_dir=str(tmp_path), resume=True, fingerprint=lambda: {"lr": 1})
    latest, state = resume_point(cfg)
    assert latest.name == "step-000010" and state["step"] == 10
    cfg.resume = False
    assert resume_point(cfg) == (None, None)
    cfg.resume, cfg.fingerprint = True, lambda: {"lr": 2}
    with pytest.raises(ValueError, match="lr: checkpoint 1 vs now 2"):
        resume_point(cfg)
