"""benchmarks/gpu_step.py runs end to end: the tiny shape on a CPU, the 7B shape where there is a GPU."""

import json

import pytest
import torch

import benchmarks.common as common
from benchmarks import gpu_step


def check_rows(rows):
    assert [r["step"].split()[0] for r in rows] == ["reward", "APA"]
    for r in rows:
        assert r["step s"] > 0 and r["update s"] > 0 and r["tokens/s"] > 0
        assert r["model TFLOP/step"] > 0
        assert 0 < r["MFU"] < 1, r
        assert r["peak mem GB"] > 0
    assert rows[1]["gen s"] > 0 and rows[1]["logprob s"] > 0


def test_tiny_shape_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    rows = gpu_step.main(["--shape", "tiny", "--repeat", "1", "--seq-len", "32", "--prompt-len", "8",
                          "--new-tokens", "4", "--out-name", "gpu_step_test"])
    check_rows(rows)
    saved = json.loads((tmp_path / "gpu_step_test.json").read_text())
    assert saved["rows"] == rows


def test_model_flops_formula():
    # 7B shape on the meta device: forward 2 N T per token over all 32 layers (plus attention),
    # backward twice the forward of the 4 trainable layers.
    args = gpu_step.parse_args(["--shape", "7b"])
    model = gpu_step.build_model(args, torch.device("meta"), torch.bfloat16)
    n_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert n_layer == pytest.approx(218.1e6, rel=1e-3)
    T = 1024
    layer = 2 * n_layer * T + 4 * 4096 * T**2
    assert gpu_step.step_flops(model, 28, T, 4, head_positions=0) == 28 * (32 + 8) * layer
    lm_head = 2 * 32002 * 4096 * 256
    assert gpu_step.step_flops(model, 1, 512, 4, head_positions=256) == pytest.approx(
        (32 + 8) * gpu_step.layer_forward_flops(model, 512) + 2 * lm_head)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_7b_shape_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    rows = gpu_step.main(["--shape", "7b", "--repeat", "1", "--seq-len", "128", "--prompt-len", "32",
                          "--new-tokens", "16", "--out-name", "gpu_step_test"])
    check_rows(rows)
    assert all(r["peak mem GB"] < torch.cuda.get_device_properties(0).total_memory / 1e9 for r in rows)
