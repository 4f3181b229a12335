"""One online-RL step end to end: our APA step (`policy.train_policy`: rollout, scoring, the
no-grad forward for old and reference log-probs and values, the update) against TRL 1.16's
`RLOOTrainer` on the same policy, reward model, prompts and batch, in completion tokens per second.

Reference measurement before any project code (4-layer, 256-wide models, 8 prompts x 2
completions x 64 tokens): 2.65 s per RLOO step, 393 tokens/s; a third of it is generation, and two
extra full forwards compute the old and the reference log-probs. Target: APA at least 2.5x RLOO's
completion tokens/s (1.5x before issue 22), with the last layers trainable and the reference sharing the frozen trunk
(`rollout.SharedTrunkPolicy`). The default model is deeper (8 layers, the top 2 trainable) so
that the trunk the reference shares is most of the model.

What is the same on both sides:
- policy: the cached tiny Mistral (`models.tiny_model_path(num_hidden_layers=--layers)`, random
  weights, float32 on CPU); only the top `--trainable` decoder layers train on both sides
  (embeddings, lower layers, final norm and lm_head frozen: RLOO's model is frozen by hand the
  way SharedTrunkPolicy freezes ours, so both backward passes stop at the same layer);
- reward model: one `MistralForSequenceClassification` on the same tiny backbone with a seeded
  head; RLOO gets it as its reward function, and ours reads the very same weights, adopted with
  `RewardModel.from_sequence_classifier` and saved with `save_reward_model`;
- prompts: `--prompts` first user turns from the bundled Nectar sample that fit in 64 tokens in
  the chat template (and fall in the training split of the policy trainer's seed 0), the same
  ones at every step on both sides: RLOO's dataset is exactly these prompts with
  num_generations=`--generations`; ours is a Nectar file of exactly these prompts (plus one
  held-out prompt that only keeps the trainer's evaluation split non-empty) with
  rollouts_per_step = prompts x generations, so each step answers each prompt `--generations`
  times (in a shuffled order rather than side by side);
- sampling: temperature 1, top_p 1, at most `--new-tokens` new tokens, stopping at eos or
  `<|end_of_turn|>` (RLOO's model is given those stop ids too);
- update: ONE optimizer step per rollout batch on both sides (ours: epochs_per_batch=1,
  minibatch_size = micro_batch_size = rollouts_per_step; RLOO: per_device_train_batch_size =
  prompts x generations, gradient_accumulation_steps=1, num_iterations=1), one forward/backward
  over all the completions at once; AdamW at the same learning rate (`--lr`), constant schedule,
  gradient clipping at norm 1, no weight decay; no evaluation, nothing saved, no logging;
- RLOO's beta > 0 (0.05), so it computes reference log-probs as it does by default: it builds a
  separate full reference model and runs it, plus a full forward of the policy for the old
  log-probs. Ours runs one no-grad forward of the shared trunk that gives the policy's and the
  reference's log-probs (the reference's top layers on the trunk's output) and the values.

What differs (on purpose, or as the libraries are):
- the algorithms: APA trains a value head too (GAE advantages, APA loss + value loss), RLOO has
  no critic (leave-one-out baseline over each prompt's completions, KL in the reward);
- RLOO's gradient (activation) checkpointing, on by TRL's default, is turned OFF, as ours has
  none: neither side recomputes activations;
- sampling engines: ours is `rollout.generate` (starling_lib.sampling's preallocated-cache loop),
  RLOO's is `model.generate`; both sample from the full softmax (top_k 0, top_p 1).
  Random-weight models almost never stop early either way; the measured mean completion
  length of each side is reported and tokens/s counts the actual completion tokens;
- the reward model reads each side's own text: ours the OpenChat-format chat with
  `<|end_of_turn|>` appended to the response, TRL the tokenizer's chat template of prompt +
  completion (a token or two apart);
- optimizers: ours `torch.optim.AdamW`; TRL's the transformers default ("adamw_torch_fused");
- what a step's clock covers: ours, the whole loop body of `train_policy` (rollout to metrics:
  the differences of its per-step `policy/apa/elapsed_s`); RLOO, on_step_begin to on_step_end of
  a TrainerCallback (generation, scoring, the two no-grad forwards, loss, backward, clipping,
  optimizer and scheduler steps; not the dataloader's fetch nor logging).

Both run on the CPU (TRL `use_cpu=True`, ours device="cpu") in one process, ours first. Each side
runs `--steps` + 1 steps; the first is a warm-up and is not timed. Reported: median wall seconds
per step, completion tokens/s = mean completion tokens per timed step / median s per step, mean
completion length, and APA's tokens/s over RLOO's.

    python -m benchmarks.apa_vs_rloo                    # the full measurement (idle machine!)
    python -m benchmarks.apa_vs_rloo --steps 2 --new-tokens 16   # a quick check that it runs

The APA step with each rollout engine (starling_lib.engines): `--apa-engines auto,hf,vllm` runs
our side once per engine (vllm where it is installed: on a CPU run this with .venv-vllm/bin/python,
after make vllm-env), `--no-rloo` leaves TRL out. With vllm the step's generate phase is vLLM's,
and its update phase includes pushing the trained layers into the engine; the warm-up step, which
creates the engine, is reported apart as first_step_s.

    .venv-vllm/bin/python -m benchmarks.apa_vs_rloo --apa-engines auto,vllm --no-rloo --name apa_engines_cpu
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import report

RM_MAX_LENGTH = 512           # tokens the reward model reads; prompt (<= 64) + completion fit easily
MAX_PROMPT_TOKENS = 64        # prompts longer than this in the chat template are not used
POLICY_SEED = 0               # the seed of the policy trainer's split, sampling and batches
TARGET = 2.5                  # APA / RLOO completion tokens/s (issue 22; issue 7's was 1.5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per trainer, after one untimed warm-up step (default 5)")
    p.add_argument("--layers", type=int, default=8,
                   help="decoder layers of the tiny policy and reward model (default 8)")
    p.add_argument("--trainable", type=int, default=2, help="top decoder layers trained on both sides (default 2)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step, the same every step (default 8)")
    p.add_argument("--generations", type=int, default=2,
                   help="completions per prompt (RLOO's num_generations; default 2)")
    p.add_argument("--new-tokens", type=int, default=64, help="most tokens per completion (default 64)")
    p.add_argument("--lr", type=float, default=1e-6,
                   help="learning rate of both trainers (TRL's default; it does not change the cost; default 1e-6)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads; 0 leaves torch's default (OMP_NUM_THREADS, else all cores)")
    p.add_argument("--apa-engines", default="auto",
                   help="comma-separated rollout engines of our APA side, one run each (default auto)")
    p.add_argument("--no-rloo", action="store_true", help="run only our APA side")
    p.add_argument("--name", default="apa_vs_rloo", help="results/<name>.json")
    args = p.parse_args(argv)
    from starling_lib.sampling import check_engine
    args.apa_engines = [e.strip() for e in args.apa_engines.split(",")]
    for engine in args.apa_engines:
        try:
            check_engine(engine)
        except ValueError as e:
            p.error(str(e))
    if args.steps < 1 or args.generations < 2 or args.prompts < 1 or args.new_tokens < 1:
        p.error("need --steps >= 1, --generations >= 2 (RLOO's leave-one-out), --prompts >= 1, --new-tokens >= 1")
    if not 0 < args.trainable < args.layers:
        p.error("need 0 < --trainable < --layers")
    return args


# --------------------------------------------------------------------------------------------
# shared inputs: prompts and the reward model


def pick_prompts(tokenizer, n: int) -> tuple[list[dict], dict]:
    """(the first `n` distinct first user turns of the bundled Nectar sample that fit in
    MAX_PROMPT_TOKENS in the chat template and land in the training split of the policy trainer
    (seed POLICY_SEED, its default test fraction), one such turn that lands in its test split),
    as Nectar records whose prompt is that one turn.

    The held-out one only keeps the trainer's evaluation split non-empty (`policy.load_prompts`
    tokenizes it even when nothing is evaluated); no step trains on it.
    """
    import datasets

    from starling_lib.data import load_nectar, prompt_to_messages, split_by_prompt
    from starling_lib.policy import PolicyTrainConfig

    records, seen = [], set()
    for rec in load_nectar("bundled"):
        first = prompt_to_messages(rec["prompt"])[0]["content"]
        prompt = f"\n\nHuman: {first}\n\nAssistant: "
        if first in seen or prompt_to_messages(prompt) != [{"role": "user", "content": first}]:
            continue
        text = tokenizer.apply_chat_template([{"role": "user", "content": first}], tokenize=False,
                                             add_generation_prompt=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > MAX_PROMPT_TOKENS:
            continue
        seen.add(first)
        records.append({**rec, "prompt": prompt, "turns": 1})
    split = split_by_prompt(datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in records]}),
                            test_fraction=PolicyTrainConfig.test_fraction, seed=POLICY_SEED)
    train = set(split["train"]["prompt"])
    chosen = [r for r in records if r["prompt"] in train][:n]
    held_out = [r for r in records if r["prompt"] not in train][:1]
    if len(chosen) < n or not held_out:
        raise ValueError(f"only {len(chosen)} bundled training prompts (and {len(held_out)} held-out) fit in "
                         f"{MAX_PROMPT_TOKENS} tokens; asked for {n} (and 1)")
    return chosen, held_out[0]


def build_shared_reward_model(backbone: Path, out_dir: Path):
    """(sequence-classification model for TRL, folder of the same weights as our RewardModel)."""
    from transformers import AutoModelForSequenceClassification

    from starling_lib.models import load_tokenizer, quiet_transformers
    from starling_lib.reward_model import RewardModel
    from starling_lib.rm_io import save_reward_model

    tokenizer = load_tokenizer(str(backbone))
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(1)
        seqcls = AutoModelForSequenceClassification.from_pretrained(str(backbone), num_labels=1,
                                                                    dtype=torch.float32)
        hidden = seqcls.config.hidden_size
        torch.nn.init.normal_(seqcls.score.weight, std=1 / math.sqrt(hidden + 1))   # as build_reward_model
    seqcls.config.pad_token_id = tokenizer.pad_token_id
    seqcls.eval().requires_grad_(False)
    rm = RewardModel.from_sequence_classifier(seqcls, tokenizer, RM_MAX_LENGTH, str(backbone))
    path = save_reward_model(rm, out_dir / "reward_model")
    return seqcls, tokenizer, path


# --------------------------------------------------------------------------------------------
# the two trainers


def run_apa(args, policy_path: Path, rm_path: Path, nectar_file: Path, prompts: list[dict],
            engine: str = "auto") -> dict:
    """Our APA step through `train_policy` with rollout engine `engine`; per-step times from its
    `policy/apa/elapsed_s`."""
    from starling_lib.models import load_model_and_tokenizer
    from starling_lib.policy import PolicyTrainConfig, load_prompts, train_policy

    batch = args.prompts * args.generations
    cfg = PolicyTrainConfig(policy=str(policy_path), reward_model=str(rm_path), method="apa",
                            nectar_source=str(nectar_file), max_prompt_tokens=MAX_PROMPT_TOKENS,
                            steps=args.steps + 1, rollouts_per_step=batch, minibatch_size=batch,
                            micro_batch_size=batch, epochs_per_batch=1, max_new_tokens=args.new_tokens,
                            temperature=1.0, top_p=1.0, lr=args.lr, lr_schedule="constant", max_grad_norm=1.0,
                            unfrozen_layers=args.trainable, device="cpu", mixed_precision="no", seed=POLICY_SEED,
                            eval_every=0, output_dir="", progress=False, rollout_engine=engine)
    # Every step must answer exactly these prompts: all of them in the training split, none held out.
    _, tokenizer = load_model_and_tokenizer(str(policy_path), device="cpu")
    train, _ = load_prompts(cfg, tokenizer)
    assert sorted(m[0]["content"] for m in train) == sorted(p["messages"][0]["content"] for p in prompts), \
        "the policy trainer does not see exactly the chosen prompts"

    result = train_policy(cfg)
    elapsed = [r["policy/apa/elapsed_s"] for r in result.history]
    times = [b - a for a, b in zip(elapsed, elapsed[1:])]                  # steps 2..N+1 (step 1: warm-up)
    tokens = [r["policy/apa/response_length"] * batch for r in result.history[1:]]
    # Where the step's time goes: the trainer's own per-phase clock (policy/apa/time_<phase>_s).
    phases = {k.split("time_")[1][:-2]: [r[k] for r in result.history[1:]]
              for k in result.history[0] if k.startswith("policy/apa/time_")}
    return {"times": times, "tokens": tokens, "phases": phases, "first_step_s": elapsed[0]}


def run_rloo(args, policy_path: Path, seqcls, rm_tokenizer, prompts: list[dict], out_dir: Path) -> dict:
    """TRL's RLOOTrainer: per-step times from a callback, completion tokens from its `_generate`."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from starling_lib.chat import stop_token_ids
    from starling_lib.models import load_model_and_tokenizer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    class CountingRLOO(RLOOTrainer):
        completion_tokens: list[int]
        generate_s: list[float]

        def _generate(self, prompts):
            t = time.perf_counter()
            prompt_ids, completion_ids, completions = super()._generate(prompts)
            self.generate_s.append(time.perf_counter() - t)                            # sampling, as ours is timed
            self.completion_tokens.append(sum(len(ids) for ids in completion_ids))   # after-eos tokens excluded
            return prompt_ids, completion_ids, completions

    _, tokenizer = load_model_and_tokenizer(str(policy_path), device="cpu")
    model = AutoModelForCausalLM.from_pretrained(str(policy_path), dtype=torch.float32)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)   # stop where ours stops
    model.requires_grad_(False)
    for layer in model.model.layers[-args.trainable:]:                  # as SharedTrunkPolicy trains
        layer.requires_grad_(True)

    config = RLOOConfig(
        output_dir=str(out_dir / "rloo"), use_cpu=True, bf16=False, seed=POLICY_SEED,
        per_device_train_batch_size=args.prompts * args.generations, gradient_accumulation_steps=1,
        num_generations=args.generations, num_iterations=1, max_completion_length=args.new_tokens,
        temperature=1.0, top_p=1.0, beta=0.05, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps + 1,
        activation_checkpointing=False, disable_dropout=True,   # (transformers 5's name of gradient_checkpointing)
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
    )
    dataset = datasets.Dataset.from_dict({"prompt": [p["messages"] for p in prompts]})
    timer = StepTimer()
    trainer = CountingRLOO(model=model, reward_funcs=seqcls, args=config, train_dataset=dataset,
                           processing_class=tokenizer, reward_processing_classes=rm_tokenizer, callbacks=[timer])
    trainer.completion_tokens, trainer.generate_s = [], []
    assert not trainer.args.gradient_checkpointing and not trainer.model.is_activation_checkpointing
    trained = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    first = args.layers - args.trainable
    assert trained and all(n.startswith(tuple(f"model.layers.{i}." for i in range(first, args.layers)))
                           for n in trained), trained
    trainer.train()
    assert len(timer.times) == args.steps + 1 == len(trainer.completion_tokens), \
        (timer.times, trainer.completion_tokens)
    rest = [t - g for t, g in zip(timer.times[1:], trainer.generate_s[1:])]
    return {"times": timer.times[1:], "tokens": trainer.completion_tokens[1:],
            "phases": {"generate": trainer.generate_s[1:], "score+forward+update": rest}}


def summarise(name: str, run: dict, completions_per_step: int) -> dict:
    s_per_step = statistics.median(run["times"])
    mean_tokens = statistics.fmean(run["tokens"])
    return {"trainer": name, "s_per_step": s_per_step, "completion_tokens_per_s": mean_tokens / s_per_step,
            "mean_completion_len": mean_tokens / completions_per_step, "timed_steps": len(run["times"]),
            "min_s": min(run["times"]), "max_s": max(run["times"]),
            **{f"{phase}_s": statistics.median(v) for phase, v in run["phases"].items()},
            **({"first_step_s": run["first_step_s"]} if "first_step_s" in run else {})}


def breakdown(rows: list[dict], target: float) -> str:
    """Where each side's step goes, and what generation alone allows: with everything but sampling
    free on our side, the ratio could be no more than RLOO's step over our generation."""
    rloo, apa = rows
    apa_rest = apa["s_per_step"] - apa["generate_s"]
    ceiling = rloo["s_per_step"] / apa["generate_s"]
    return (f"Per phase (median s): RLOO generate {rloo['generate_s']:.3f}, the rest {rloo['score+forward+update_s']:.3f}; "
            f"APA generate {apa['generate_s']:.3f}, score {apa['score_s']:.3f}, forward {apa['forward_s']:.3f}, "
            f"update {apa['update_s']:.3f}. Sampling is {rloo['generate_s'] / apa['generate_s']:.2f}x faster on our side "
            f"and the rest {rloo['score+forward+update_s'] / apa_rest:.2f}x; with the rest free, our step could be at "
            f"most {ceiling:.2f}x RLOO's ({'above' if ceiling >= target else 'below'} the {target:g}x target).")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from starling_lib.data import prompt_to_messages
    from starling_lib.models import load_model_and_tokenizer, tiny_model_path

    policy_path = tiny_model_path(num_hidden_layers=args.layers)
    _, tokenizer = load_model_and_tokenizer(str(policy_path), device="cpu")
    prompts, held_out = pick_prompts(tokenizer, args.prompts)
    for p in prompts:
        p["messages"] = prompt_to_messages(p["prompt"])
    per_step = args.prompts * args.generations

    with tempfile.TemporaryDirectory(prefix="apa_vs_rloo_") as tmp:
        tmp = Path(tmp)
        nectar_file = tmp / "prompts.jsonl"
        nectar_file.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "messages"}) + "\n"
                                       for p in [*prompts, held_out]))
        seqcls, rm_tokenizer, rm_path = build_shared_reward_model(policy_path, tmp)
        apa = {e: run_apa(args, policy_path, rm_path, nectar_file, prompts, e) for e in args.apa_engines}
        rloo = None if args.no_rloo else run_rloo(args, policy_path, seqcls, rm_tokenizer, prompts, tmp)

    rows = [summarise("starling_lib APA (train_policy" + ("" if e == "auto" else f", rollout_engine={e}") + ")",
                      run, per_step) for e, run in apa.items()]
    shape = (f"{args.layers}-layer tiny Mistral (hidden 256), top {args.trainable} layers trained; {args.prompts} "
             f"prompts x {args.generations} completions x <= {args.new_tokens} new tokens per step, one optimizer step "
             f"per rollout batch, lr {args.lr:g}, CPU float32, {torch.get_num_threads()} thread(s). Median over "
             f"{args.steps} timed steps after 1 warm-up step (first_step_s: the warm-up, which creates a vllm engine).")
    if rloo is None:
        report(args.name, rows, shape + " APA only (--no-rloo); engines: " + ", ".join(args.apa_engines) + ".")
        return
    rows.insert(0, summarise("TRL 1.16 RLOOTrainer", rloo, per_step))
    for row in rows[1:]:
        row["speed_up_vs_rloo"] = row["completion_tokens_per_s"] / rows[0]["completion_tokens_per_s"]
    speedup = rows[1]["speed_up_vs_rloo"]
    notes = (f"{args.layers}-layer tiny Mistral (hidden 256), top {args.trainable} layers trained on both sides; "
             f"{args.prompts} prompts x {args.generations} completions x <= {args.new_tokens} new tokens per step, "
             f"one optimizer step per rollout batch, lr {args.lr:g}, CPU float32, {torch.get_num_threads()} thread(s). "
             f"Median over {args.steps} timed steps after 1 warm-up step; tokens/s = mean completion tokens per "
             f"step / median s per step. RLOO: beta 0.05 (separate reference model), gradient checkpointing off. "
             f"APA / RLOO completion tokens/s: {speedup:.2f}x (target >= {TARGET:g}x: "
             f"{'met' if speedup >= TARGET else 'not met'}). " + breakdown(rows[:2], TARGET))
    report(args.name, rows, notes)


if __name__ == "__main__":
    main()
