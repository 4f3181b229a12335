"""starling_lib.training: the learning-rate schedule and checkpoint discovery, by hand; checkpoints
that unpickle nothing, survive a torn write and fall back past a damaged one."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from starling_lib import training
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


# --------------------------------------------------------------------------------------------
# checkpoints that can be trusted and survive a torn write


def _cfg(tmp_path, keep=3):
    return SimpleNamespace(output_dir=str(tmp_path), resume=True, keep_checkpoints=keep, device="cpu",
                           mixed_precision="no", fingerprint=lambda: {"lr": 1})


def _trainer(cfg):
    """A minimal trainer's objects, as the real ones make them: the scheduler registered for checkpointing."""
    accelerator = training.make_accelerator(cfg)
    torch.manual_seed(0)
    model, optimizer = accelerator.prepare(torch.nn.Linear(3, 1), None)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    accelerator.register_for_checkpointing(scheduler)
    return accelerator, model, optimizer, scheduler


def _train_and_save(cfg, steps):
    accelerator, model, optimizer, scheduler = _trainer(cfg)
    for step in range(1, steps + 1):
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        training.save_checkpoint(accelerator, cfg, {"step": step, "config": cfg.fingerprint(), "history": []})
    return model, scheduler


def _resume(cfg, path):
    accelerator, model, optimizer, scheduler = _trainer(cfg)
    accelerator.load_state(str(path))
    return model, scheduler


class RunsCode:
    """A pickle that runs code when loaded: it creates the folder `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_the_scheduler_is_checkpointed_as_json_and_resumes_exactly(tmp_path):
    cfg = _cfg(tmp_path)
    model, scheduler = _train_and_save(cfg, 2)
    latest, state = resume_point(cfg)
    assert latest.name == "step-000002" and state["step"] == 2
    assert not list(latest.glob("custom_checkpoint_*.pkl"))            # nothing pickled for it
    assert json.loads((latest / "custom_state_0.json").read_text())["last_epoch"] == 2
    resumed_model, resumed = _resume(cfg, latest)
    assert resumed.last_epoch == 2 and resumed.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(resumed_model.weight, model.weight)
    assert set(state["files"]) == {p.name for p in latest.iterdir()} - {"trainer_state.json"}


def test_resuming_never_unpickles_a_planted_file(tmp_path):
    cfg = _cfg(tmp_path)
    _train_and_save(cfg, 2)
    marker = tmp_path / "code-ran"
    planted = tmp_path / "checkpoints" / "step-000002" / "custom_checkpoint_0.pkl"
    torch.save(RunsCode(marker), planted)
    with pytest.warns(UserWarning, match=r"step-000002 is damaged \(it holds custom_checkpoint_0.pkl, a pickle"):
        latest, _ = resume_point(cfg)
    assert latest.name == "step-000001"                                 # the newest trustworthy one
    assert _resume(cfg, latest)[1].last_epoch == 1
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl, a pickle, which resuming does not load"):
        _resume(cfg, planted.parent)                                    # even when asked for it by name
    assert not marker.exists()


def test_a_torn_trainer_state_is_named_and_the_previous_checkpoint_resumed(tmp_path):
    for step, text in [(2, '{"step": 2, "config": {"lr": 1}}'), (10, '{"step": 10, "conf')]:
        path = tmp_path / "checkpoints" / f"step-{step:06d}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(text)
    cfg = _cfg(tmp_path)
    with pytest.warns(UserWarning, match=r"step-000010 is damaged \(trainer_state.json is not valid JSON"):
        latest, state = resume_point(cfg)
    assert latest.name == "step-000002" and state["step"] == 2
    (tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").write_text("[]")
    with pytest.raises(ValueError, match="every checkpoint .* is damaged: step-000010: .*; step-000002: "
                                         "trainer_state.json has no step and config"):
        resume_point(cfg)


def test_a_truncated_weights_file_is_named_and_the_previous_checkpoint_resumed(tmp_path):
    cfg = _cfg(tmp_path)
    _train_and_save(cfg, 2)
    weights = tmp_path / "checkpoints" / "step-000002" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.warns(UserWarning, match=rf"step-000002 is damaged \(model.safetensors has {size // 2} bytes, "
                                         rf"{size} were saved\)"):
        latest, _ = resume_point(cfg)
    assert latest.name == "step-000001" and _resume(cfg, latest)[1].last_epoch == 1


def test_trainer_state_is_written_atomically(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _train_and_save(cfg, 1)
    real_replace, renamed = os.replace, []

    def crash_before_renaming_trainer_state(src, dst):
        if os.path.basename(dst) == "trainer_state.json":
            raise OSError("killed before the rename")
        renamed.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_renaming_trainer_state)
    accelerator, model, optimizer, scheduler = _trainer(cfg)
    with pytest.raises(OSError, match="killed before the rename"):
        training.save_checkpoint(accelerator, cfg, {"step": 2, "config": cfg.fingerprint(), "history": []})
    torn = tmp_path / "checkpoints" / "step-000002"
    assert renamed == ["custom_state_0.json"] and not (torn / "trainer_state.json").exists()
    assert not [p for p in torn.iterdir() if p.name.startswith(".")]     # no temporary file left either
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000001"]  # the torn one is not a checkpoint
    # and over an existing file: the old content stays whole
    path = tmp_path / "trainer_state.json"
    path.write_text('{"old": true}')
    with pytest.raises(OSError):
        training.write_text_atomically(path, '{"new": true}')
    assert json.loads(path.read_text()) == {"old": True}


def test_saving_again_over_a_damaged_step_replaces_it_and_pruning_keeps_intact_ones(tmp_path):
    cfg = _cfg(tmp_path, keep=1)
    _train_and_save(cfg, 2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002"]
    stale = tmp_path / "checkpoints" / "step-000002" / "stale.bin"
    stale.write_bytes(b"x")
    with pytest.raises(ValueError, match="every checkpoint .* step-000002: it holds files it was not saved with: "
                                         "stale.bin"):
        resume_point(cfg)             # damaged, and no earlier one was kept
    _train_and_save(cfg, 2)           # a fresh run writes step 2 again: the old folder goes first
    assert not stale.exists() and training.checkpoint_damage(tmp_path / "checkpoints" / "step-000002") is None
