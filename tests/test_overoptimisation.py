"""starling_lib.overoptimisation: the curve summary by hand on synthetic curves, the fitted forms,
the config's checks, the proxy's settings, and a small run on the tiny model end to end whose
recorded gold scores are the gold model's own scores of the same responses."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from readings_check import underived_numbers

from starling_lib import overoptimisation as oo


def synthetic(gold_by_seed, kl=(0.0, 1.0, 4.0, 9.0, 16.0), proxy_by_seed=None, method="apa"):
    rows = []
    for seed, gold in enumerate(gold_by_seed):
        proxy = proxy_by_seed[seed] if proxy_by_seed else gold
        for step, (g, p, k) in enumerate(zip(gold, proxy, kl)):
            rows.append({"method": method, "seed": seed, "step": step, "kl": k, "gold": g, "proxy": p})
    return oo.add_gains(pd.DataFrame(rows), {"gold": {"mean": 0.0, "sd": 1.0}, "proxy": {"mean": 0.0, "sd": 1.0}})


T1 = 12.706204736174698   # t(0.975, 1 degree of freedom)


def test_peak_fall_and_intervals_by_hand():
    curves = synthetic([[0, 1, 2, 1, 0], [0, 2, 3, 2, 0.5]])
    s = oo.curve_summary(curves, "apa", "gold", smooth_steps=1)
    # mean over seeds [0, 1.5, 2.5, 1.5, 0.25]: the peak is step 2
    assert s["peak_step"] == 2 and s["peak_gain"] == pytest.approx(2.5)
    assert s["peak_gain_se"] == pytest.approx(0.5)                     # sd of (2, 3) / sqrt 2
    assert s["peak_kl"] == pytest.approx(4.0) and s["peak_sqrt_kl"] == pytest.approx(2.0)
    assert s["final_step"] == 4 and s["final_gain"] == pytest.approx(0.25) and s["final_kl"] == pytest.approx(16.0)
    # per-seed falls 2 and 2.5: mean 2.25, sd 0.3536, se 0.25, 95% t-interval 2.25 -+ 12.706 x 0.25
    assert s["fall"] == pytest.approx(2.25) and s["fall_se"] == pytest.approx(0.25)
    assert s["fall_low"] == pytest.approx(2.25 - T1 * 0.25) and s["fall_high"] == pytest.approx(2.25 + T1 * 0.25)
    assert s["falls"] is False and s["peaked_inside"] is True            # 2 seeds: the interval holds 0
    assert s["start_gain"] == 0 and s["rise"] == pytest.approx(0.25) and s["rise_se"] == pytest.approx(0.25)


def test_the_fall_is_read_after_smoothing():
    curves = synthetic([[0, 1, 2, 1, 0], [0, 2, 3, 2, 0.5]])
    s = oo.curve_summary(curves, "apa", "gold", smooth_steps=3)
    # centred means of 3 (2 at the ends): seed 0 [0.5, 1, 4/3, 1, 0.5], seed 1 [1, 5/3, 7/3, 11/6, 1.25]
    assert s["peak_step"] == 2 and s["peak_gain"] == pytest.approx((4 / 3 + 7 / 3) / 2)
    assert s["final_gain"] == pytest.approx((0.5 + 1.25) / 2)
    assert s["fall"] == pytest.approx(((4 / 3 - 0.5) + (7 / 3 - 1.25)) / 2)
    assert s["start_gain"] == 0                                           # the first batch is not smoothed


def test_a_clear_fall_and_a_curve_that_never_peaks():
    falling = synthetic([[0, 1, 3, 1, 0], [0, 1, 3, 1.2, 0.2], [0, 1, 3, 0.8, -0.2]])
    s = oo.curve_summary(falling, "apa", "gold")
    assert s["peak_step"] == 2 and s["fall"] == pytest.approx(3.0) and s["fall_se"] == pytest.approx(0.2 / math.sqrt(3))
    assert s["falls"] is True
    rising = synthetic([[0, 1, 2, 3, 4], [0, 2, 3, 4, 5]])
    r = oo.curve_summary(rising, "apa", "proxy")
    assert r["peak_step"] == 4 and r["peaked_inside"] is False and r["fall"] == 0 and r["falls"] is False
    assert r["rise"] == pytest.approx(4.5)


def test_mean_curve_and_gains():
    curves = synthetic([[0, 1, 2, 1, 0], [0, 2, 3, 2, 0.5]], kl=(0.0, 0.25, 1.0, 2.25, 4.0))
    mc = oo.mean_curve(curves, "apa", "gold")
    assert list(mc["step"]) == [0, 1, 2, 3, 4] and list(mc["seeds"]) == [2] * 5
    assert mc.loc[1, "gain"] == pytest.approx(1.5) and mc.loc[1, "gain_se"] == pytest.approx(0.5)
    assert mc.loc[1, "gain_low"] == pytest.approx(1.5 - T1 * 0.5)
    assert list(mc["sqrt_kl"]) == pytest.approx([0, 0.5, 1, 1.5, 2])
    raw = pd.DataFrame([{"method": "apa", "seed": 0, "step": 0, "kl": -0.01, "gold": 3.0, "proxy": -1.0}])
    g = oo.add_gains(raw, {"gold": {"mean": 2.0, "sd": 0.5}, "proxy": {"mean": 0.0, "sd": 2.0}})
    assert g.loc[0, "gold_gain"] == pytest.approx(2.0) and g.loc[0, "proxy_gain"] == pytest.approx(-0.5)
    assert g.loc[0, "sqrt_kl"] == 0.0                                     # a slightly negative estimate is clipped


def test_gap_at_end_is_paired_by_seed():
    curves = synthetic([[0, 1, 1, 1, 1], [0, 1, 1, 1, 2]], proxy_by_seed=[[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    gap = oo.gap_at_end(curves, "apa")
    assert gap["gap"] == pytest.approx(2.5) and gap["gap_se"] == pytest.approx(0.5)


def test_fitted_forms_recover_known_curves():
    d = np.linspace(0.2, 6, 30)
    fit = oo.fit_gao_forms(d, d * (1.0 - 0.5 * np.log(d)))
    assert fit["rl_alpha"] == pytest.approx(1.0) and fit["rl_beta"] == pytest.approx(0.5)
    assert fit["rl_peak_d"] == pytest.approx(math.e) and fit["rl_peak_kl"] == pytest.approx(math.e ** 2)
    assert fit["rl_r2"] == pytest.approx(1.0)
    bon = oo.fit_gao_forms(np.r_[0.0, d], np.r_[0.0, d * (1.0 - 0.25 * d)])   # d = 0 is dropped
    assert bon["bon_alpha"] == pytest.approx(1.0) and bon["bon_peak_d"] == pytest.approx(2.0)
    assert oo.fitted_curve(fit, "rl", np.array([0.0, math.e]))[1] == pytest.approx(math.e * 0.5)
    rising = oo.fit_gao_forms(d, 2 * d)
    assert math.isnan(rising["bon_peak_d"]) or rising["bon_beta"] <= 1e-9
    assert math.isnan(oo.fit_gao_forms([1.0, 2.0], [1.0, 2.0])["rl_alpha"])   # too few points


@pytest.mark.parametrize("bad, message", [
    ({"proxy_fraction": 0.0}, "proxy_fraction"), ({"proxy_fraction": 1.5}, "proxy_fraction"),
    ({"methods": ("apa", "dpo")}, "dpo"), ({"methods": ()}, "at least one"), ({"methods": ("apa", "apa")}, "twice"),
    ({"seeds": 0}, "seeds"), ({"steps": 1}, "steps"), ({"smooth_steps": 0}, "smooth_steps"), ({"lr": 0.0}, "lr"),
    ({"beta": -0.1}, "beta"), ({"prompt_pool": -1}, "prompt_pool"), ({"proxy_steps": 1.5}, "proxy_steps"),
    ({"responses_per_prompt": 3}, "multiples"),                               # PolicyTrainConfig's own check
    ({"responses_per_prompt": 1, "score_norm": "prompt"}, "responses_per_prompt"),
])
def test_config_checks(bad, message):
    with pytest.raises(ValueError, match=message):
        oo.OveroptConfig(**bad)


def test_config_from_params_reads_methods_as_text():
    cfg = oo.config_from_params({"rl_methods": " ppo, apa ", "seeds": 3, "run_dir": "/x", "heldout_prompts": 4})
    assert cfg.methods == ("ppo", "apa") and cfg.seeds == 3 and cfg.seed_list == [0, 1, 2]
    with pytest.raises(TypeError, match="steps"):
        oo.config_from_params({"steps": "many"})


class Constant:
    def __init__(self, value):
        self.value, self.calls = value, []

    def score(self, prompts, responses, batch_size=16):
        self.calls.append(batch_size)
        return torch.full((len(responses),), self.value) + torch.arange(len(responses))


def test_dual_scorer_returns_the_proxy_and_records_both():
    proxy, gold = Constant(1.0), Constant(5.0)
    scorer = oo.DualScorer(proxy, gold, batch_size=3)
    out = scorer.score(["p", "q"], ["a", "b"])
    assert out.tolist() == [1.0, 2.0] and proxy.calls == gold.calls == [3]
    rec = scorer.records[0]
    assert rec["gold"].tolist() == [5.0, 6.0] and rec["responses"] == ["a", "b"] and rec["prompts"] == ["p", "q"]


# --------------------------------------------------------------------------------------------
# on the tiny model


@pytest.fixture(scope="module")
def gold_dir(tmp_path_factory):
    """A gold reward model as rm_train saves it (its training settings recorded), in a few seconds."""
    from starling_lib.rm_train import RMTrainConfig, train_reward_model

    out = tmp_path_factory.mktemp("gold")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        train_reward_model(RMTrainConfig(backbone="tiny", steps=2, max_length=64, unfrozen_layers=1, cache_trunk=True,
                                         train_prompts=8, output_dir=str(out), progress=False, report_to="none",
                                         device="cpu"))
    return out / "reward_model"


def small_config(**overrides):
    return oo.OveroptConfig(**{"policy": "tiny", "seeds": 2, "steps": 3, "rollouts_per_step": 4,
                               "responses_per_prompt": 2, "prompt_pool": 2, "minibatch_size": 4, "micro_batch_size": 4,
                               "max_new_tokens": 6, "max_prompt_tokens": 64, "device": "cpu", "progress": False,
                               "proxy_steps": 2, **overrides})


def test_proxy_takes_the_gold_settings_on_fewer_prompts(gold_dir, tmp_path):
    proxy, gold_n = oo.proxy_config(small_config(proxy_fraction=0.25, proxy_steps=0), gold_dir, tmp_path / "p")
    gold = oo.gold_training(gold_dir)
    # a quarter of the prompts, a quarter of the steps (the same epochs; at least one)
    assert gold_n == 8 and proxy.train_prompts == 2 and gold["steps"] == 2 and proxy.steps == 1
    for key in ("backbone", "max_length", "unfrozen_layers", "lr", "loss", "seed", "batch_size", "chat_format", "k"):
        assert getattr(proxy, key) == gold[key], key
    assert proxy.cache_trunk and proxy.output_dir == str(tmp_path / "p")
    half, _ = oo.proxy_config(small_config(proxy_fraction=0.5, proxy_steps=5), gold_dir)
    assert half.train_prompts == 4 and half.steps == 5 and half.output_dir == "" and not half.save_model
    with pytest.raises(ValueError, match="records no training"):
        import json
        info = json.loads((gold_dir / "reward_model.json").read_text())
        info.pop("training")
        bare = tmp_path / "bare"
        bare.mkdir()
        (bare / "reward_model.json").write_text(json.dumps(info))
        oo.gold_training(bare)


def test_a_small_run_records_the_gold_models_own_scores(gold_dir, tmp_path, monkeypatch):
    from readings_check import reading_lines  # noqa: F401  (the same checker as the notebooks')

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = small_config()
    proxy_cfg, gold_n = oo.proxy_config(cfg, gold_dir, tmp_path / "proxy")
    proxy_result = oo.train_proxy(proxy_cfg)
    assert (tmp_path / "proxy" / "reward_model" / "reward_model.json").exists()
    gold = oo.load_gold(gold_dir, device="cpu")
    result = oo.run_overoptimisation(cfg, gold, proxy_result.model)

    c = result.curves
    assert len(c) == 2 * 2 * 3 and set(c["method"]) == {"apa", "ppo"} and set(c["seed"]) == {0, 1}
    assert sorted(set(c["step"])) == [0, 1, 2] and result.pool_size == 2
    assert c.loc[c["step"] == 0, "kl"].abs().max() < 1e-4                 # the first batch is the initial policy's
    assert (c.loc[c["step"] == 2, "kl"] > 0).all()
    # the recorded scores are each model's own scores of the very same responses
    for s in result.samples:
        assert len(s["responses"]) == cfg.rollouts_per_step
        torch.testing.assert_close(gold.score(s["prompts"], s["responses"]), s["gold"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(proxy_result.model.score(s["prompts"], s["responses"]), s["proxy"], atol=1e-5, rtol=1e-5)
    # the curves are the batches' means, and the gains are on the initial policy's scale
    first = [s for s in result.samples if s["step"] == 0]
    g0 = torch.cat([s["gold"] for s in first])
    assert result.initial["gold"]["mean"] == pytest.approx(float(g0.mean()), abs=1e-5)
    row = c.iloc[4]
    sample = result.samples[4]
    assert row["gold"] == pytest.approx(float(sample["gold"].mean()), abs=1e-5)
    assert row["gold_gain"] == pytest.approx((row["gold"] - result.initial["gold"]["mean"]) / result.initial["gold"]["sd"])
    assert c.loc[c["step"] == 0, "gold_gain"].mean() == pytest.approx(0.0, abs=1e-5)

    summary = oo.summarise(result)
    heldout = oo.heldout_comparison(gold, proxy_result.model, proxy_cfg, prompts=3)
    assert heldout["prompts"] == 3 and 0 <= heldout["proxy_pair_accuracy"] <= 1
    m = oo.overoptimisation_metrics(result, summary, oo.proxy_info(proxy_result, gold_n, heldout), notebook_s=1.0)
    assert all(k.startswith("overopt/") for k in m) and m["overopt/proxy/train_prompts"] == 2
    assert m["overopt/apa/gold/seeds"] == 2 and len(m["overopt/curves"]) == 12
    lines = oo.readings(result, summary, heldout=heldout, proxy_cfg=proxy_cfg, gold_n=gold_n)
    assert len(lines) == 5 and underived_numbers(lines, m) == []          # every printed number is a metric
    frame = oo.samples_frame(result, steps=(0, 2))
    assert len(frame) == 2 * 2 * 2 * 4 and set(frame["batch"]) == {"first batch (initial policy)", "last batch (step 2)"}


def test_proxy_settings_override_the_gold_ones(gold_dir):
    proxy, _ = oo.proxy_config(small_config(proxy_settings="lr=1e-3, max_length:48,chat_format:openchat_3.5"), gold_dir)
    assert proxy.lr == 1e-3 and proxy.max_length == 48 and proxy.chat_format == "openchat_3.5"
    for bad, message in (("steps=3", "proxy_steps"), ("nonsense=1", "unknown setting"), ("lr", "key=value"),
                         ("max_length=long", "max_length")):
        with pytest.raises(ValueError, match=message):
            small_config(proxy_settings=bad)
