"""Rollout throughput: the project's sampler (starling_lib.sampling) against plain `model.generate`.

Generated tokens per second on the same model, prompts, batch and lengths: every engine samples
exactly `--new-tokens` tokens per prompt from the full softmax (stop tokens off, so no engine
wins by stopping early). Engines:

    hf-generate         model.generate with its default dynamic KV cache
    hf-generate-static  model.generate(cache_implementation="static"): transformers' preallocated cache
    starling-sampler    sampling.sample: preallocated cache, projections through F.linear, one additive
                        mask per step, one rotary call per layer, inverse-CDF sampling (what
                        rollout.generate uses for Llama/Mistral/Qwen2)
    vllm                starling_lib.engines.VLLMEngine: vLLM in this process on the same prompt ids
                        and weights (what rollout_engine "vllm" uses), where vllm is importable:
                        on a CPU run this script with .venv-vllm/bin/python (make vllm-env). Its
                        row adds startup_s: creating the engine and pushing every weight into it;
                        tokens/s is the steady state (the median of the timed runs after a warm-up)

Target (issue 7): at least 2x plain `generate` (8 prompts x 64 tokens with the tiny model).
The prompts are the first bundled Nectar prompts that fit in `--max-prompt-tokens` (64, the policy
trainer's default) in the chat template, left-padded. Longer prompts add a prefill that costs
every engine alike (8 prompts of up to 256 tokens: ~100 ms, a third of the sampler's time).

    python -m benchmarks.rollout                      # tiny model, 8 x 64, on CPU
    python -m benchmarks.rollout --layers 8 --batch 32 --new-tokens 128
    .venv-vllm/bin/python -m benchmarks.rollout --engine starling-sampler,vllm --name rollout_vllm_cpu
    # on a GPU: the sampler, generate and vLLM on a 7B-shaped random-weight Mistral, 64 prompts x 1024 tokens
    python -m benchmarks.rollout --shape 7b --batch 64 --new-tokens 1024 --max-prompt-tokens 256 \
        --engine hf-generate,starling-sampler,vllm --repeat 3 --name rollout_7b_gpu

On CPU the OpenMP wait policy matters as much as the engine: with OMP_WAIT_POLICY=PASSIVE (what
the Makefile's demo/test targets set, to survive a loaded machine) small decoding steps pay for
waking the threads each time; the machine block of the result records the policy in force.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics

import torch

from benchmarks.common import report, timeit
from starling_lib.models import load_model_and_tokenizer
from starling_lib.sampling import sample


ENGINES = ("hf-generate", "hf-generate-static", "starling-sampler", "vllm")


def make_vllm(model, enc, n, pad_id):
    """(run, startup seconds): the vllm engine (starling_lib.engines) sampling the same prompt ids
    with the model's weights, exactly n tokens each (no stop ids) from the full softmax."""
    from starling_lib.engines import SamplingSettings, VLLMEngine, generate_padded

    engine = VLLMEngine(model)
    settings = SamplingSettings(n, temperature=1.0)
    seeds = iter(range(10**6))
    return (lambda: generate_padded(engine, enc["input_ids"], enc["attention_mask"], settings, pad_id, next(seeds)),
            engine.startup_s)


def build_7b(device: torch.device):
    """A 7B-shaped Mistral (benchmarks.gpu_step's, Starling's base) with random weights, in bf16 on the GPU."""
    from benchmarks.gpu_step import build_model

    if device.type != "cuda":
        raise SystemExit("--shape 7b needs a CUDA GPU (in float32 on a CPU it would be 29 GB); use --shape tiny")
    return build_model(argparse.Namespace(shape="7b"), device, torch.bfloat16).eval()


# What a decoding step's CPU time is spent on, by operator (torch.profiler's self time): the
# matrix products are the same work for every engine (the model's weights times the same
# activations), so their share bounds what any engine can gain over another.
CATEGORIES = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
              "attention": ("aten::_scaled_dot_product", "aten::_softmax")}


def breakdown(fn) -> dict[str, float]:
    """Seconds of one run of `fn` by category (matmul, attention, the rest), from the profiler's
    self CPU time, scaled to the run's wall time (the profiler's own overhead is spread evenly)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = timeit(fn, repeat=1, warmup=0)
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values()) or 1.0
    shares = {name: sum(us for key, us in self_us.items() if key.startswith(prefixes)) / total
              for name, prefixes in CATEGORIES.items()}
    shares["other"] = 1.0 - sum(shares.values())
    return {f"{name}_s": share * t for name, share in shares.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="prompts sampled at once")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt")
    parser.add_argument("--max-prompt-tokens", type=int, default=64,
                        help="use prompts this long at most (PolicyTrainConfig.max_prompt_tokens' default)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny model")
    parser.add_argument("--model", default="tiny", help='"tiny" or a from_pretrained folder / hub id')
    parser.add_argument("--shape", choices=["tiny", "7b"], default="tiny",
                        help="7b: a 7B-shaped Mistral with random weights (GPU only), prompts from the tiny tokenizer")
    parser.add_argument("--engine", default="all",
                        help=f"comma-separated engines of {', '.join(ENGINES)}, or all (vllm where importable)")
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per engine, interleaved (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 leaves torch's default")
    parser.add_argument("--name", default="rollout", help="results/<name>.json")
    args = parser.parse_args(argv)
    wanted = list(ENGINES) if args.engine == "all" else [e.strip() for e in args.engine.split(",")]
    if unknown := [e for e in wanted if e not in ENGINES]:
        parser.error(f"unknown engine(s) {unknown}; choose among {', '.join(ENGINES)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from starling_lib.data import load_nectar, prompt_to_messages

    extra = {"num_hidden_layers": args.layers} if args.model == "tiny" else {}
    model, tok = load_model_and_tokenizer(args.model, **extra)
    model.eval()
    if args.shape == "7b":
        model = build_7b(next(model.parameters()).device)
    device = next(model.parameters()).device
    # The first bundled prompts that fit, as the policy trainer picks them (max_prompt_tokens).
    texts = []
    for p in load_nectar("bundled")["prompt"]:
        text = tok.apply_chat_template(prompt_to_messages(p), tokenize=False, add_generation_prompt=True)
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= args.max_prompt_tokens:
            texts.append(text)
        if len(texts) == args.batch:
            break
    if len(texts) < args.batch:
        raise SystemExit(f"only {len(texts)} bundled prompts fit in {args.max_prompt_tokens} tokens")
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    n = args.new_tokens

    def hf(cache: str | None):
        extra_args = {"cache_implementation": cache} if cache else {}
        return lambda: model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0, top_p=1.0,
                                      pad_token_id=tok.pad_token_id, **extra_args)

    def ours():
        return sample(model, enc["input_ids"], enc["attention_mask"], n, [], tok.pad_token_id)

    engines = {"hf-generate": hf(None), "hf-generate-static": hf("static"), "starling-sampler": ours}
    engines = {name: fn for name, fn in engines.items() if name in wanted}
    startup, errors, vllm_note = {}, {}, ""
    if "vllm" in wanted:
        if importlib.util.find_spec("vllm") is None:
            vllm_note = ("vLLM: not installed in this environment (on a CPU: .venv-vllm/bin/python -m benchmarks.rollout, "
                         "after make vllm-env). ")
            if args.engine != "all":
                errors["vllm"] = "vllm is not installed here"
        else:
            try:
                engines["vllm"], startup["vllm"] = make_vllm(model, enc, n, tok.pad_token_id)
            except Exception as e:
                errors["vllm"] = f"{type(e).__name__}: {str(e)[:160]}"
    times = {name: [] for name in engines}
    with torch.no_grad():
        for name, fn in engines.items():   # warm-up, and the check that every engine samples n tokens
            try:
                out = fn()
                assert out.shape[1] == enc["input_ids"].shape[1] + n, out.shape
            except Exception as e:  # an engine this torch/transformers cannot run is reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e)[:120]}"
        # Rounds of one run per engine, so a slow spell of a shared machine hits every engine alike.
        for _ in range(args.repeat):
            for name, fn in engines.items():
                if name not in errors:
                    times[name].append(timeit(fn, repeat=1, warmup=0))
        split = {name: breakdown(fn) for name, fn in engines.items() if name not in errors and name != "vllm"}
    rows = []
    for name in [*engines, *[e for e in errors if e not in engines]]:
        if name in errors:
            rows.append({"engine": name, "error": errors[name]})
        else:
            s = statistics.median(times[name])
            # the profiled run's split, scaled to the median run
            parts = {k: v * s / sum(split[name].values()) for k, v in split.get(name, {}).items()}
            rows.append({"engine": name, "s_per_batch": s, "tokens_per_s": args.batch * n / s,
                         "min_s": min(times[name]), "max_s": max(times[name]), **parts,
                         **({"startup_s": startup[name]} if name in startup else {})})
    base = next((r for r in rows if r["engine"] == "hf-generate" and "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r:
            r["speed-up vs generate"] = r["tokens_per_s"] / base["tokens_per_s"]
    ours = next((r for r in rows if r["engine"] == "starling-sampler" and "matmul_s" in r), None)
    ceiling = ""
    if base and ours and "matmul_s" in base:
        bound = base["s_per_batch"] / ours["matmul_s"]
        ceiling = (f"Where the time goes (profiler self time, scaled to the median run): the matrix products take "
                   f"{ours['matmul_s']:.3f} s of the sampler's {ours['s_per_batch']:.3f} s "
                   f"({ours['matmul_s'] / ours['s_per_batch']:.0%}) and {base['matmul_s']:.3f} s of generate's "
                   f"{base['s_per_batch']:.3f} s; the rest is {ours['s_per_batch'] - ours['matmul_s']:.3f} s against "
                   f"{base['s_per_batch'] - base['matmul_s']:.3f} s "
                   f"({(base['s_per_batch'] - base['matmul_s']) / max(ours['s_per_batch'] - ours['matmul_s'], 1e-9):.1f}x "
                   f"less). With everything but the matrix products free, the sampler could be at most {bound:.2f}x "
                   f"generate on this machine. ")
    shape = "7B-shaped Mistral, random weights, bf16" if args.shape == "7b" else f"{args.model} model ({args.layers} layers)"
    notes = (f"{shape}, {args.batch} prompts of up to {enc['input_ids'].shape[1]} "
             f"tokens x {n} sampled tokens, device {device}, torch threads {torch.get_num_threads()}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; median of {args.repeat} interleaved runs. "
             "Target: starling-sampler >= 2x hf-generate. " + ceiling
             + vllm_note)
    report(args.name, rows, notes)


if __name__ == "__main__":
    main()
