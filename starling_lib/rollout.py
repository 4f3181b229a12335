"""Rollouts for online RLHF: sample responses, score them, and get the log-probs the losses need.

Starling tuned only the last 4 of Openchat-3.5's 32 layers. Then the policy and the frozen
reference (the initial policy) are identical below those layers, and holding a second full model
as the reference wastes memory and a full forward per batch. `SharedTrunkPolicy` keeps ONE copy of
the frozen trunk (embeddings and the bottom layers) plus a frozen copy of just the top N layers:

    input ids -> embeddings -> frozen layers 1..L-N -> h ─┬─> policy layers (trainable) -> norm -> lm_head -> log pi
                                                           └─> reference layers (frozen)  -> norm -> lm_head -> log pi_ref

One trunk forward feeds both heads. The final norm and lm_head stay frozen and are shared too, so
the reference costs N layers of memory (4/32 of Mistral-7B's layers: about 11% of the weights).
A value head (PPO's critic) reads the policy's last hidden state.

Sequences are a left-padded prompt of P tokens followed by a right-padded response of R tokens;
the log-prob of response token j is read at position P - 1 + j. Position ids come from the
attention mask, exactly as `generate` computes them, so scoring sees what sampling saw.

Departures from TRL's PPO: the reference shares the policy's trunk (above); the value head shares
the policy's top layers (TRL 0.x's AutoModelForCausalLMWithValueHead did the same; TRL's later
PPOTrainer used a separate value model).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from starling_lib.chat import stop_token_ids
from starling_lib.models import decoder_layers, position_ids_from_mask, top_layers_from, train_top_layers


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position.  logits (B, R, V), tokens (B, R) -> (B, R), float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position.  (B, R, V) -> (B, R)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_outputs(lm_head: nn.Module, value_head: nn.Module | None, h: torch.Tensor, response: torch.Tensor,
                     with_entropy: bool, with_values: bool) -> dict:
    """From the hidden states h (B, R, H) before each response token (B, R): `logprobs`, and if
    asked `entropy` (no grad) and `values` (the value head, float32), each (B, R)."""
    logits = lm_head(h)                                                             # (B, R, V)
    out = {"logprobs": logprobs_from_logits(logits, response)}
    if with_entropy:
        with torch.no_grad():
            out["entropy"] = entropy_from_logits(logits)
    if with_values:
        out["values"] = value_head(h.float()).squeeze(-1)
    return out


class SharedTrunkPolicy(nn.Module):
    """A causal LM with only its last `num_trainable_layers` decoder layers trainable, a frozen
    reference that shares everything below them, and a scalar value head.

    The wrapped model's embeddings, bottom layers, final norm and lm_head are frozen; the reference
    is a frozen copy of the top layers, taken at construction (so it is the initial policy).

    Frozen-trunk caching: the trunk (embeddings and bottom layers) is frozen, so its output for a
    rollout batch is the same in the rollout's no-grad pass and in every update epoch and
    micro-batch. `forward(..., return_trunk=True)` hands it out and `forward(..., trunk=...)` starts
    from it, running only the top layers (the model computes its mask and rotary embeddings from
    the same inputs as always): the same numbers as the full forward, for a fraction of its cost
    when few layers train (Starling: 4 of 32).
    """

    def __init__(self, model: nn.Module, num_trainable_layers: int = 4, value_head: bool = True):
        super().__init__()
        layers = decoder_layers(model)
        if not 0 < num_trainable_layers <= len(layers):
            raise ValueError(f"num_trainable_layers must be in 1..{len(layers)}, got {num_trainable_layers}")
        self.model = model
        self.split = len(layers) - num_trainable_layers          # index of the first trainable layer
        train_top_layers(model, num_trainable_layers)   # embeddings, lower layers, final norm, lm_head frozen
        self.ref_layers = copy.deepcopy(layers[self.split:]).requires_grad_(False).eval()
        hidden = model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            # Start the critic at zero so the first advantages are the raw rewards, not noise.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(device=model.device, dtype=torch.float32)
        self._capture: dict | None = None
        layers[self.split].register_forward_pre_hook(self._grab_trunk_output, with_kwargs=True)

    def _grab_trunk_output(self, module, args, kwargs):
        # Called with the first trainable layer's input: the trunk's output and the model's own
        # attention mask and rotary embeddings, which the reference layers reuse as they are.
        if self._capture is not None:
            self._capture["hidden"] = args[0] if args else kwargs["hidden_states"]
            self._capture["kwargs"] = {k: v for k, v in kwargs.items()
                                       if k not in ("hidden_states", "past_key_values", "use_cache")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                with_ref: bool = False, with_values: bool = False, with_entropy: bool = False,
                return_trunk: bool = False, trunk: torch.Tensor | None = None) -> dict:
        """Per-token quantities over the response tokens `input_ids[:, response_start:]`.

        Returns a dict of (B, R) float32 tensors: `logprobs` (policy), and if asked `ref_logprobs`
        (reference, no grad), `values` (value head), `entropy` (policy, no grad); with
        `return_trunk`, `trunk` (B, T, H): the frozen trunk's output, detached, which a later
        forward on the same rows can pass as `trunk` to run only the top layers.
        """
        response = input_ids[:, response_start:]                                   # (B, R)
        self._capture = {} if (with_ref or return_trunk) else None
        try:
            from_trunk = top_layers_from(self.model.model, self.split, trunk) if trunk is not None else None
            with from_trunk or contextlib.nullcontext():
                hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids_from_mask(attention_mask),
                                          use_cache=False).last_hidden_state          # (B, T, H)
            captured = self._capture
        finally:
            self._capture = None
        # Position P-1+j predicts response token j.
        h = hidden[:, response_start - 1:-1]                                        # (B, R, H)
        out = response_outputs(self.model.lm_head, self.value_head, h, response, with_entropy, with_values)
        if with_ref:
            with torch.no_grad():
                ref_h = captured["hidden"].detach()
                for layer in self.ref_layers:
                    ref_h = layer(ref_h, **captured["kwargs"])
                    ref_h = ref_h[0] if isinstance(ref_h, tuple) else ref_h
                ref_h = self.model.model.norm(ref_h)[:, response_start - 1:-1]
                out["ref_logprobs"] = logprobs_from_logits(self.model.lm_head(ref_h), response)
        if return_trunk:
            out["trunk"] = captured["hidden"].detach()
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


@dataclass
class RolloutBatch:
    """One batch of sampled responses. Token tensors are (B, P + R); per-token ones are (B, R)."""

    input_ids: torch.Tensor        # left-padded prompt followed by the right-padded response
    attention_mask: torch.Tensor   # 1 on real prompt and response tokens (through <|end_of_turn|>)
    response_start: int            # P: where the response begins
    response_mask: torch.Tensor    # (B, R) bool: real response tokens
    prompts: list                  # the prompts' chat messages, for scoring and logging
    responses: list[str]           # decoded responses, without the end-of-turn token
    trunk: torch.Tensor | None = None   # (B, P + R, H): the frozen trunk's output, when the sampler kept it

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start:]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True, top_k: int = 0,
             engine: str = "auto", keep_trunk: int | None = None) -> RolloutBatch:
    """Sample one response per prompt (chat messages) in the model's chat template.

    Left-padded prompts; generation stops at the tokenizer's eos or `<|end_of_turn|>`
    (chat.stop_token_ids). Everything after a sequence's stop token is masked out.
    top_k 0 and top_p 1 sample from the full softmax, the distribution the RL losses score.
    engine: "fast" (`sampling.sample`: a preallocated KV cache, about 2x `generate` on the tiny
    model, benchmarks/rollout.py), "hf" (`model.generate`), "auto" (fast where the model is
    supported, else hf), or a serving engine, "vllm" / "vllm-server" (starling_lib.engines: created
    at the first call for `model` and kept for it; its seed is drawn from torch's generator).
    keep_trunk: a layer index s (SharedTrunkPolicy.split): the fast engine also returns the input of
    layer s at every position as `batch.trunk`, so that the log-prob pass and the updates after it
    run only the layers from s up; `model.generate` cannot, and its batches have `trunk` None.
    """
    from starling_lib import engines
    from starling_lib.sampling import SERVING_ENGINES, check_engine

    check_engine(engine)
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        # The template already wrote BOS; don't let the tokenizer add another.
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    stops = stop_token_ids(tokenizer)
    trunk = None
    if engine in SERVING_ENGINES:   # vLLM (engines.py): the tokens only; its seed from torch's generator
        settings = engines.SamplingSettings(max_new_tokens, temperature if do_sample else 0.0, top_p, top_k, stops)
        out = engines.generate_padded(engines.engine_for(model, engine, tokenizer), enc["input_ids"],
                                      enc["attention_mask"], settings, tokenizer.pad_token_id, engines.seed_from_torch())
    else:
        out, trunk = engines.hf_decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, stops,
                                       tokenizer.pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k,
                                       do_sample=do_sample, engine=engine, keep_trunk=keep_trunk)
    P = enc["input_ids"].shape[1]
    response = out[:, P:]                                                          # (B, R)
    is_eos = torch.isin(response, torch.tensor(stops, device=response.device))
    # Keep tokens up to and including the first eos: the policy is credited for stopping.
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = ~after_eos
    response = response.masked_fill(after_eos, tokenizer.pad_token_id)
    input_ids = torch.cat([enc["input_ids"], response], dim=1)
    attention_mask = torch.cat([enc["attention_mask"], response_mask.long()], dim=1)
    decoded = tokenizer.batch_decode(response.masked_fill(is_eos, tokenizer.pad_token_id), skip_special_tokens=True)
    return RolloutBatch(input_ids, attention_mask, P, response_mask, list(prompts), decoded, trunk)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """RLHF reward per token: -beta * KL_t everywhere, plus the reward model's score on the last
    real token (Ziegler et al. 2019).  scores (B,), kl and mask (B, R) -> (B, R)."""
    rewards = -beta * kl.float() * response_mask
    last = response_mask.long().sum(-1).clamp(min=1) - 1                          # (B,)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.float().unsqueeze(1))


def iterate_minibatches(batch_size: int, minibatch_size: int, generator: torch.Generator | None = None):
    """Shuffled index minibatches covering a batch once (one PPO/APA epoch)."""
    order = torch.randperm(batch_size, generator=generator)
    for i in range(0, batch_size, minibatch_size):
        yield order[i:i + minibatch_size]

