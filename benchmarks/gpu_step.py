"""GPU figures of one training step at Starling's scale: a 7B-shaped Mistral with random weights,
the top 4 of its 32 layers trainable, batch 28.

Two steps are timed:

- reward-model step: 28 sequences (4 prompts x 7 answers, as in Nectar) of `--seq-len` tokens
  through `reward_model.RewardModel` (the Mistral body + a Linear(hidden, 1) head), the
  Plackett-Luce loss over each prompt's 7 rewards, backward, gradient clipping, one AdamW step.
- APA step: 28 random prompts of `--prompt-len` tokens; sampling exactly `--new-tokens` tokens
  each (`sampling.sample`, the project's rollout sampler; `--engine hf` for `generate`); a no-grad forward of `rollout.SharedTrunkPolicy` for the reference
  log-probs and values; GAE; then one optimizer step over the batch, accumulated over
  micro-batches of `--micro-batch`, on the APA loss + 0.1 x the clipped value loss (as
  `policy.methods` does). Generation, the no-grad forward and the update are timed apart.

For each: median step time of `--repeat` steps after one warm-up step (CUDA synchronised), tokens
per second, model FLOPs utilisation (MFU) and peak memory (`torch.cuda.max_memory_allocated`; on a
CPU the process's peak RSS, which is everything the process has held so far).

MFU = model FLOPs per second / the MEASURED dense matmul peak of the same device and dtype
(8192 x 8192 bf16 matmuls on a GPU; 1024 x 1024 float32 on a CPU), not the data sheet's figure.
Model FLOPs, with N_layer the parameters of one decoder layer, L layers of which the top n train,
d the hidden size, V the vocabulary, B sequences of T tokens and S positions per sequence that go
through the (frozen) lm_head (APA: the R response positions; the reward model: none):

    layer(T) = 2 * N_layer * T + 4 * d * T^2           forward of one layer over one sequence:
                                                       matmuls, plus attention scores and their
                                                       weighted sum over the full T x T (PaLM's
                                                       convention; causal kernels skip ~half)
    forward  = B * (L * layer(T) + 2 * V * d * S)
    backward = B * (2 * n * layer(T) + 2 * V * d * S)  trainable layers: input + weight gradients,
                                                       each ~ their forward; lm_head is frozen:
                                                       input gradient only; nothing flows below
                                                       the first trainable layer
    model FLOPs of a step = forward + backward

Not counted: embeddings, norms, softmax, the scalar heads, the optimizer, and recomputation under
`--grad-ckpt` (model FLOPs, not hardware FLOPs). The reward-model MFU is over its whole step; the
APA MFU is over the update only (forward + backward + AdamW), since generation is memory-bound
decoding and is reported as time and tokens/s instead.

Precision, as `policy.online.load_policy` does it: frozen weights in bf16, the trainable layers (and the
reward model's final norm and head, and the value head) in float32 as the optimizer's master
weights, forward under bf16 autocast. AdamW (torch's default implementation) keeps float32 states.
float32 throughout on a CPU.

Departures from a real run: random weights (the speed of a 7B does not depend on them), random
prompt token ids, random reward-model scores for APA (scoring the responses with a second 7B
reward model would double the weights in memory; its cost, one forward of 28 sequences, is not
in the APA step), fixed response lengths (no early stop), one epoch of one minibatch per APA step.

On a GPU (H100 / A100 80GB; defaults: --shape 7b, seq-len 1024, prompts 256 + 256 new tokens):

    python -m benchmarks.gpu_step                 # writes results/gpu_step.json
    python -m benchmarks.gpu_step --grad-ckpt     # if the reward-model step runs out of memory

On a CPU, `--shape tiny` (the default there: the project's tiny model shape, 4 layers x 256,
training its top 2 so that a frozen trunk sits below them as on the 7B) smoke-tests the script
and writes results/gpu_step_tiny_cpu.json, never the GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import time

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, MistralConfig

import benchmarks.common as common
from starling_lib.losses import apa_loss, gae, plackett_luce_loss, ppo_value_loss
from starling_lib.models import train_top_layers
from starling_lib.reward_model import RewardModel
from starling_lib.rollout import SharedTrunkPolicy, per_token_rewards
from starling_lib.sampling import sample

ANSWERS_PER_PROMPT = 7     # Nectar ranks 7 answers per prompt; the reward-model batch is 4 x 7 = 28

SHAPES = {
    # Mistral-7B / Openchat-3.5 (Starling's base): 7.24B parameters, vocabulary 32000 + 2 chat tokens.
    "7b": dict(config=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=14336, vocab_size=32002, max_position_embeddings=8192,
                           sliding_window=4096),
               trainable_layers=4, seq_len=1024, prompt_len=256, new_tokens=256, micro_batch=4),
    # The project's tiny model (models.TinyModelConfig's shape), for a smoke test on a CPU.
    "tiny": dict(config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=688, vocab_size=4096, max_position_embeddings=8192,
                             sliding_window=4096),
                 trainable_layers=2, seq_len=128, prompt_len=32, new_tokens=32, micro_batch=4),
}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--trainable-layers", type=int, help="top layers trained (default: 4 for 7b, 2 for tiny)")
    p.add_argument("--batch", type=int, default=28, help="sequences per step (reward model: a multiple of 7)")
    p.add_argument("--seq-len", type=int, help="reward-model tokens per sequence (default 1024 / 128)")
    p.add_argument("--prompt-len", type=int, help="APA prompt tokens (default 256 / 32)")
    p.add_argument("--new-tokens", type=int, help="APA sampled tokens per prompt (default 256 / 32)")
    p.add_argument("--micro-batch", type=int, help="APA sequences per forward/backward (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed steps after one warm-up step; the median is reported")
    p.add_argument("--engine", choices=["fast", "hf"], default="fast",
                   help="APA sampling: starling_lib.sampling (what rollouts use) or model.generate")
    p.add_argument("--grad-ckpt", action="store_true", help="recompute the trainable layers' activations in backward")
    p.add_argument("--out-name", help="results/<name>.json (default gpu_step on a GPU with --shape 7b, "
                                      "else gpu_step_<shape>_<device>)")
    args = p.parse_args(argv)
    for k, v in SHAPES[args.shape].items():
        if k != "config" and getattr(args, k) is None:
            setattr(args, k, v)
    if args.batch % ANSWERS_PER_PROMPT:
        p.error(f"--batch must be a multiple of {ANSWERS_PER_PROMPT} (answers per prompt)")
    return args


# --------------------------------------------------------------------------------------------
# device plumbing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def now(device: torch.device) -> float:
    """Wall clock after the device has finished what was queued (CUDA kernels run asynchronously)."""
    sync(device)
    return time.perf_counter()


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()   # the models hold reference cycles (SharedTrunkPolicy's hook): free the last one now
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # Linux reports KiB


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s: the ceiling MFU is taken against."""
    n, per_call = (8192, 10) if device.type == "cuda" else (1024, 2)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def matmuls():
        for _ in range(per_call):
            torch.mm(a, b)

    seconds = common.timeit(matmuls, repeat=5 if device.type == "cuda" else 3, warmup=2)
    return 2 * n**3 * per_call / seconds


def build_model(args, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A Mistral causal LM with random weights, created directly on the device in `dtype`."""
    config = MistralConfig(**SHAPES[args.shape]["config"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)
    with torch.device(device):   # no float32 copy on the CPU first: 7B would be 29 GB of host memory
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def enable_grad_ckpt(model: nn.Module) -> None:
    # activation_checkpointing_enable is gradient_checkpointing_enable's newer name (the old one warns).
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    # transformers also makes the embeddings' output require grad (for LoRA / reentrant checkpointing);
    # that would pull the backward through the whole frozen trunk. Nothing below layer L-n needs it.
    model.disable_input_require_grads()


# --------------------------------------------------------------------------------------------
# model FLOPs (the formula of the module docstring)


def layer_forward_flops(model: nn.Module, seq_len: int) -> float:
    """layer(T) = 2 * N_layer * T + 4 * d * T^2 for one sequence of T tokens."""
    n_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return 2 * n_layer * seq_len + 4 * model.config.hidden_size * seq_len**2


def step_flops(model: nn.Module, n_seqs: int, seq_len: int, trainable_layers: int, head_positions: int) -> float:
    """forward + backward model FLOPs of one step over n_seqs sequences (formula in the docstring)."""
    layer = layer_forward_flops(model, seq_len)
    lm_head = 2 * model.config.vocab_size * model.config.hidden_size * head_positions
    forward = model.config.num_hidden_layers * layer + lm_head
    backward = 2 * trainable_layers * layer + lm_head
    return n_seqs * (forward + backward)


# --------------------------------------------------------------------------------------------
# the reward-model step


def bench_reward_model(args, device, dtype, autocast, peak: float) -> dict:
    torch.manual_seed(0)
    model = build_model(args, device, dtype)
    body = model.model                                       # the MistralModel: RewardModel's backbone
    train_top_layers(body, args.trainable_layers, final_norm=True)       # top n blocks + the final norm train
    for layer in body.layers[-args.trainable_layers:]:
        layer.float()                                        # float32 master weights for AdamW
    body.norm.float()
    head = nn.Linear(body.config.hidden_size, 1, bias=False, device=device, dtype=torch.float32)
    rm = RewardModel(body, head, tokenizer=None, max_length=args.seq_len)
    if args.grad_ckpt:
        enable_grad_ckpt(model)
        rm.train()                                           # transformers checkpoints only in train mode
    else:
        rm.eval()                                            # Mistral has no dropout: same maths either way
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    # 28 sequences = 4 prompts x 7 answers, best answer first; random tokens, no padding.
    b_ids = torch.randint(3, body.config.vocab_size, (args.batch, args.seq_len), device=device)
    b_mask = torch.ones_like(b_ids)

    def step():
        with autocast():
            rewards = rm(b_ids, b_mask)                                         # (B,)
        loss = plackett_luce_loss(rewards.view(-1, ANSWERS_PER_PROMPT))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    times = []
    for _ in range(1 + args.repeat):                         # the first step warms up (and allocates AdamW's states)
        t = now(device)
        step()
        times.append(now(device) - t)
    step_s = median(times[1:])
    flops = step_flops(model, args.batch, args.seq_len, args.trainable_layers, head_positions=0)
    tokens = args.batch * args.seq_len
    row = {"step": f"reward model (PL, {args.batch // ANSWERS_PER_PROMPT} x {ANSWERS_PER_PROMPT})",
           "tokens/seq": args.seq_len, "gen s": None, "logprob s": None,      # none in this step: all of it is update
           "update s": step_s, "step s": step_s, "tokens/step": tokens, "tokens/s": tokens / step_s,
           "model TFLOP/step": flops / 1e12, "TFLOP/s": flops / step_s / 1e12, "MFU": flops / step_s / peak,
           "MFU of": "whole step", "peak mem GB": peak_memory_gb(device)}
    return row


# --------------------------------------------------------------------------------------------
# the APA step


def bench_apa(args, device, dtype, autocast, peak: float) -> dict:
    torch.manual_seed(0)
    model = build_model(args, device, dtype)
    policy = SharedTrunkPolicy(model, num_trainable_layers=args.trainable_layers)   # ref = frozen copy of the top n
    for layer in model.model.layers[policy.split:]:
        layer.float()                                        # float32 master weights, as policy.online.load_policy does
    if args.grad_ckpt:
        enable_grad_ckpt(model)
    params = policy.trainable_parameters()                   # top n layers + value head
    optimizer = torch.optim.AdamW(params, lr=2e-7)           # Starling's APA learning rate
    B, P, R = args.batch, args.prompt_len, args.new_tokens
    vocab = model.config.vocab_size

    def step() -> dict:
        t0 = now(device)
        # ---- 1. sample R tokens for each of B random prompts (no early stop: every response is R long)
        policy.eval()                                        # also keeps the KV cache on under --grad-ckpt
        b_prompts = torch.randint(3, vocab, (B, P), device=device)
        with torch.no_grad(), autocast():
            if args.engine == "fast":   # what rollout.generate uses; no stop tokens: exactly R new tokens
                b_ids = sample(model, b_prompts, torch.ones_like(b_prompts), R, [], PAD_ID)
            else:
                b_ids = model.generate(input_ids=b_prompts, attention_mask=torch.ones_like(b_prompts), do_sample=True,
                                       top_k=0, min_new_tokens=R, max_new_tokens=R, pad_token_id=PAD_ID,
                                       eos_token_id=EOS_ID)
        b_attn = torch.ones_like(b_ids)
        b_mask = torch.ones(B, R, dtype=torch.bool, device=device)
        b_scores = torch.randn(B, device=device)             # stands in for the reward model (see docstring)
        t1 = now(device)

        # ---- 2. no-grad forward: reference log-probs and values; then rewards and GAE advantages
        outs = []
        with torch.no_grad(), autocast():
            for i in range(0, B, args.micro_batch):
                outs.append(policy(b_ids[i:i + args.micro_batch], b_attn[i:i + args.micro_batch], P,
                                   with_ref=True, with_values=True))
        b_ref_logprobs = torch.cat([o["ref_logprobs"] for o in outs])                   # (B, R)
        b_values = torch.cat([o["values"] for o in outs])
        b_rewards = per_token_rewards(b_scores, torch.zeros_like(b_values), b_mask, beta=0.0)   # APA: no KL in the reward
        b_advantages, b_returns = gae(b_rewards, b_values, b_mask, gamma=1.0, gae_lambda=0.95)
        t2 = now(device)

        # ---- 3. one optimizer step over the whole batch, accumulated over micro-batches
        policy.train(args.grad_ckpt)
        n_micro = -(-B // args.micro_batch)
        for i in range(0, B, args.micro_batch):
            mb = slice(i, i + args.micro_batch)
            with autocast():
                out = policy(b_ids[mb], b_attn[mb], P, with_values=True)
            pg_loss, _ = apa_loss(out["logprobs"], b_ref_logprobs[mb], b_advantages[mb], b_mask[mb], lam=0.1)
            vf_loss, _ = ppo_value_loss(out["values"], b_values[mb], b_returns[mb], b_mask[mb], 0.2)
            ((pg_loss + 0.1 * vf_loss) / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = now(device)
        return {"gen s": t1 - t0, "logprob s": t2 - t1, "update s": t3 - t2, "step s": t3 - t0}

    reset_peak_memory(device)
    timings = [step() for _ in range(1 + args.repeat)][1:]   # the first step warms up
    t = {k: median([x[k] for x in timings]) for k in timings[0]}
    flops = step_flops(model, B, P + R, args.trainable_layers, head_positions=R)   # the update's FLOPs
    row = {"step": f"APA ({B} prompts, micro-batch {args.micro_batch})", "tokens/seq": P + R, **t,
           "tokens/step": B * R, "tokens/s": B * R / t["step s"],  # generated tokens per second of the whole step
           "model TFLOP/step": flops / 1e12, "TFLOP/s": flops / t["update s"] / 1e12,
           "MFU": flops / t["update s"] / peak, "MFU of": "update", "peak mem GB": peak_memory_gb(device)}
    return row


# --------------------------------------------------------------------------------------------


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "7b" and device.type != "cuda":
        raise SystemExit("--shape 7b needs a CUDA GPU; use --shape tiny on a CPU")
    # bf16 where the GPU has it (A100, H100); float32 on a CPU, where bf16 matmuls are slow and emulated.
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    autocast = ((lambda: torch.autocast("cuda", dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext)
    out_name = args.out_name or ("gpu_step" if args.shape == "7b" and device.type == "cuda"
                                 else f"gpu_step_{args.shape}_{device.type}")

    peak = matmul_peak_flops(device, dtype)
    print(f"measured {str(dtype).removeprefix('torch.')} matmul peak: {peak / 1e12:.4g} TFLOP/s")
    common_cols = {"shape": args.shape, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
                   "sampler": args.engine,
                   "trainable layers": args.trainable_layers, "grad ckpt": args.grad_ckpt}
    rows = []
    for bench in (bench_reward_model, bench_apa):
        rows.append({**common_cols, **bench(args, device, dtype, autocast, peak), "peak TFLOP/s": peak / 1e12})
        reset_peak_memory(device)

    n_params = sum(p.numel() for p in build_model(args, torch.device("meta"), dtype).parameters())
    notes = (f"{args.shape}-shaped Mistral, {n_params / 1e9:.3g}B parameters, random weights, top "
             f"{args.trainable_layers} layers trained; median of {args.repeat} steps after a warm-up step. "
             f"MFU = model FLOPs/s over the measured {str(dtype).removeprefix('torch.')} matmul peak "
             f"({peak / 1e12:.4g} TFLOP/s); model FLOPs: forward of all layers + backward (2x) of the trainable "
             "ones, attention over full T x T (formula in benchmarks/gpu_step.py). Reward model: tokens/s counts "
             "all tokens scored. APA: tokens/s counts generated tokens over the whole step; MFU is of the update "
             "alone; reward scores are random (the reward-model forward is not in the step); prompts are random "
             "tokens; responses are exactly new-tokens long. Peak memory: torch.cuda.max_memory_allocated on a "
             "GPU, the process's peak RSS on a CPU.")
    common.report(out_name, rows, notes)
    return rows


if __name__ == "__main__":
    main()
