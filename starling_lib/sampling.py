"""Batched sampling for rollouts: a decoding loop with a preallocated KV cache, for Llama/Mistral/Qwen2.

Online RLHF spends a third or more of each step generating (TRL's RLOO on a tiny model: a third;
at Starling's 1024 new tokens far more). `transformers`' `generate` is general: every new token
goes through its logits processors, stopping criteria, mask builders and a cache that grows by
concatenation (O(T^2) copying over a response). This loop does only what a rollout needs:

    prefill: the left-padded prompts through every layer, K and V written into a cache of
             (B, kv_heads, P + max_new_tokens, head_dim) per layer, allocated once; a prompt
             that several rows share (a prompt's rollouts, an evaluation's samples) runs once
             and its cache is copied to each of its rows
    decode:  for each new token: one position through every layer, K and V written in place,
             attention over the filled part of the cache; sample from softmax(logits / T)
             (optionally top-k / top-p); rows that emitted a stop token are padded from then on

It runs on the model's own weights and modules (embeddings, rotary embedding, lm_head; norms,
projections and MLP with the same arithmetic as the family's modules: plain nn.Linear layers go
through F.linear on their weights, hooked or quantised ones through their forward), so weights,
dtypes, autocast and rope scaling are the model's; the attention call, the rotation by cos/sin
(the arithmetic of the family's `apply_rotary_pos_emb`) and the cache are ours. Greedy decoding
gives exactly the tokens of `model.generate`, in float32 and in the policy's bf16 mixed precision
(tested). A decoding step of the tiny model is ~100 small kernels, so what it saves is mostly
per-call work: no module dispatch, one mask for all layers, one rotary call per layer.

Scope: decoder-only models of the Llama family (`model.model.layers[i].self_attn.{q,k,v,o}_proj`,
half-split rotary embedding) with sdpa or eager attention, no sliding window shorter than the
sequence, and parameters not sharded by FSDP or ZeRO-3. `supports_fast_sampling` says whether a
model qualifies; `rollout.generate` falls back to `model.generate` when it does not.

Departures from `generate`: sampling defaults to the full softmax (top_k=0, top_p=1), not the
generation config's top_k=50, because the RL losses score responses under the full distribution;
the random numbers are drawn differently, so sampled tokens differ from `generate`'s for the same
seed (their distribution does not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules import module as module_globals   # torch's global forward-hook registries

from starling_lib.models import position_ids_from_mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports_fast_sampling(model, total_length: int = 0) -> bool:
    """Whether `sample` can run `model` for sequences of `total_length` tokens."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    if not hasattr(getattr(model, "model", None), "layers"):
        return False   # a PeftModel wrapper: its base model (get_base_model()) is what this loop runs
    adapters = getattr(model, "peft_config", None) or {}
    if any(getattr(c.peft_type, "value", c.peft_type) != "LORA" for c in adapters.values()):
        return False   # prompt-learning adapters change attention in ways this loop does not call
    if is_sharded(model):
        return False
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and total_length > window:
        return False
    return True


ENGINES = ("auto", "fast", "hf", "vllm", "vllm-server")
# Engines that generate apart from the model object (starling_lib.engines: vLLM in this process, or
# a vLLM server), with a copy of its weights that the trainer updates after each step.
SERVING_ENGINES = ("vllm", "vllm-server")


def check_engine(engine: str) -> None:
    """Raise a ValueError unless `engine` is one of ENGINES."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")


def use_fast_sampling(engine: str, model, total_length: int) -> bool:
    """Whether generation with `engine` ("fast", "hf" or "auto": fast where supported) runs `sample`
    rather than `model.generate`; "fast" on a model `sample` cannot run is an error. A serving
    engine (SERVING_ENGINES) runs neither: False."""
    check_engine(engine)
    fast = engine in ("auto", "fast") and supports_fast_sampling(model, total_length)
    if engine == "fast" and not fast:
        raise ValueError(f"engine='fast' does not support {type(model).__name__} here; use engine='hf' or 'auto'")
    return fast


def is_sharded(model) -> bool:
    """Whether FSDP (1 or 2) or DeepSpeed ZeRO-3 shards `model`'s parameters.

    They gather a block's weights in hooks around the wrapped module's forward; this loop calls a
    block's projections and reads its norm weights directly, so it would see the shards (FSDP2:
    "mixed torch.Tensor and DTensor"). `model.generate` runs the wrapped modules, so it works.
    """
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") or type(p).__name__ in ("DTensor", "FlatParameter") for p in model.parameters())


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with everything outside the top-k / the top-p nucleus set to -inf.  (B, V) -> (B, V).

    top_k 0 and top_p 1.0 keep everything. The nucleus is the smallest set of most likely tokens
    whose probabilities sum to at least top_p (the most likely token is always kept).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked before it already carry top_p of the mass.
        drop_sorted = probs.cumsum(-1) - probs >= top_p                           # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, Q, D) by cos, sin_signed (B, 1, Q, D).

    The family's `x * cos + rotate_half(x) * sin`, with rotate_half(x) = [-x2, x1]: that equals
    x.roll(D / 2) * [-sin1, sin2] bit for bit, one kernel (roll) instead of three (neg, cat, slices).
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _sign_sin(sin: torch.Tensor) -> torch.Tensor:
    """[sin1, sin2] -> [-sin1, sin2] over the last dimension, for `_rotate`."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def _direct(module):
    """`module` as a plain function: F.linear on its weights when it is exactly an nn.Linear that
    nothing hooks (skipping nn.Module.__call__, a few microseconds each, 29 times per token on the
    tiny model), else the module itself: quantised layers, forward hooks and accelerate's
    offloading hooks (`_hf_hook`, a replaced `forward`) keep their own forward."""
    plain = (type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)
             and not hasattr(module, "_hf_hook") and "forward" not in vars(module)
             and not (getattr(module_globals, "_global_forward_hooks", True)
                      or getattr(module_globals, "_global_forward_pre_hooks", True)))
    if plain:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _attention(q, k, v, mask, scaling: float, eager: bool) -> torch.Tensor:
    """q (B, H, Q, D), k and v (B, KV, S, D), mask (B, 1, Q, S) additive float -> (B, Q, H * D)."""
    groups = q.shape[1] // k.shape[1]
    if eager:   # the arithmetic of transformers' eager_attention_forward, so bf16 rounds as it does there
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling + mask                      # (B, H, Q, S)
        out = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse): the index of the first row of each distinct (ids, mask) row, in order of
    first appearance, (U,); and for every row the position of its distinct row in `first`, (B,).
    So input_ids[first][inverse] == input_ids."""
    B = input_ids.shape[0]
    if B == 1:
        zero = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        return zero, zero
    keys = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1)           # (B, 2P)
    _, group = torch.unique(keys, dim=0, return_inverse=True)                       # (B,) in sorted order
    rows = torch.arange(B, device=input_ids.device)
    first_of_group = torch.full((int(group.max()) + 1,), B, device=input_ids.device).scatter_reduce(
        0, group, rows, "amin")                                                     # (U,) by sorted group
    order = first_of_group.argsort()                                                # groups by first appearance
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=input_ids.device))
    return first_of_group[order], rank[group]


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           stop_ids: list[int], pad_id: int, temperature: float | torch.Tensor = 1.0, top_k: int = 0, top_p: float = 1.0,
           do_sample: bool = True, generator: torch.Generator | None = None,
           stop_check_every: int = 0, keep_trunk: int | None = None):
    """Prompt ids followed by up to `max_new_tokens` new ones, as `model.generate` returns them.

    input_ids, attention_mask: (B, P) left-padded prompts. Returns (B, P + R), R <= max_new_tokens
    (shorter when every row stopped early); after a row's stop token come `pad_id`s.
    temperature: one for every row, or a (B,) tensor of each row's own, where 0 means greedy for
    that row (MT-Bench answers every category in one batch, each at its own temperature).
    keep_trunk: a layer index s; then returns (ids, trunk) with trunk (B, P + R, H) the input of
    layer s at every position, i.e. the output of the frozen trunk (embeddings and layers below s)
    that a policy training only layers s.. would compute again for these sequences
    (rollout.SharedTrunkPolicy starts from it). Its values are the full forward's to float
    rounding at every real token; the last position, which no later token attends to and whose
    output predicts nothing of the response, is never run and holds zeros.
    stop_check_every: ask whether every row has stopped every this many tokens; 0: every token on
    a CPU, every 16 elsewhere. The answer is a copy to the host, which on a GPU waits for every
    kernel launched so far, so asking each token would keep the host from queueing the next
    step's kernels while the GPU runs this one. The output is the same either way; a rarer check
    only runs up to stop_check_every - 1 needless steps after the last row stops.
    """
    B, P = input_ids.shape
    T = P + max_new_tokens
    if not supports_fast_sampling(model, T):
        raise ValueError(f"{type(model).__name__} is not supported by sampling.sample; use model.generate")
    if keep_trunk is not None and not 0 <= keep_trunk < len(model.model.layers):
        raise ValueError(f"keep_trunk must be a layer index in 0..{len(model.model.layers) - 1}, got {keep_trunk}")
    config, body = model.config, model.model
    eager = config._attn_implementation == "eager"
    device = input_ids.device
    stops = torch.tensor(stop_ids, device=device)
    # Rows with the same prompt (a prompt's several rollouts, an evaluation's samples) share one
    # prefill: it runs on the distinct prompts and their cache is copied out to every row.
    first, inverse = distinct_rows(input_ids, attention_mask)                      # (U,), (B,)

    # Which cache slots hold tokens, as the additive mask sdpa takes (0 or -inf): built once, not
    # converted from a bool mask by every layer's attention call at every step.
    key_bias = torch.full((B, T), float("-inf"), device=device)
    key_bias[:, :P].masked_fill_(attention_mask.bool(), 0.0)
    positions = position_ids_from_mask(attention_mask)                             # (B, P) as generate counts
    next_position = positions[:, -1:] + 1                                        # (B, 1)
    caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def norm(module, x: torch.Tensor) -> torch.Tensor:
        # Llama/Mistral/Qwen2 RMSNorm: weight * (rmsnorm of x in float32, cast back to x's dtype).
        if x.dtype == module.weight.dtype == torch.float32:   # then one fused kernel is the same maths
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=module.variance_epsilon).to(x.dtype)

    # Per layer, once: the norms and functions the step calls (attribute lookups through
    # nn.Module.__getattr__ are Python work too, repeated per layer and token).
    plan = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        plan.append((layer.input_layernorm, _direct(attn.q_proj), _direct(attn.k_proj), _direct(attn.v_proj),
                     _direct(attn.o_proj), layer.post_attention_layernorm, _direct(mlp.gate_proj),
                     _direct(mlp.up_proj), mlp.act_fn, _direct(mlp.down_proj), attn.head_dim, attn.scaling))

    trunk: list[torch.Tensor] = []   # with keep_trunk: (B, T, H), allocated at prefill in the stream's dtype

    def forward(ids: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, start: int,
                mask: torch.Tensor) -> torch.Tensor:
        """ids (b, Q) at cache slots start..start+Q-1, cos and sin_signed (b, 1, Q, D), mask (b, 1, Q, S)
        -> last position's logits (b, V), float32. b is B, or the distinct prompts' count at prefill."""
        h = body.embed_tokens(ids)
        B, Q = ids.shape
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, act, down, D, scaling) in enumerate(plan):
            if i == keep_trunk:
                if not trunk:
                    trunk.append(h.new_zeros(B, T, h.shape[-1]))
                trunk[0][:, start:start + Q] = h
            x = norm(norm1, h)
            q = q_proj(x).view(B, Q, -1, D)
            k = k_proj(x).view(B, Q, -1, D)
            v = v_proj(x).view(B, Q, -1, D).transpose(1, 2)                                   # (B, KV, Q, D)
            # Rotate queries and keys in one call: (B, H + KV, Q, D).
            qk = _rotate(torch.cat([q, k], 2).transpose(1, 2), cos, sin_signed)
            q, k = qk[:, :q.shape[2]], qk[:, q.shape[2]:]                                  # (B, H, Q, D), (B, KV, Q, D)
            if len(caches) <= i:   # allocated at prefill, in the dtype autocast gave the keys
                caches.append((k.new_zeros(B, k.shape[1], T, D), v.new_zeros(B, v.shape[1], T, D)))
            k_cache, v_cache = caches[i]
            mask = mask.to(q.dtype)   # sdpa wants the query's dtype under autocast; once, then a no-op
            k_cache[:, :, start:start + Q] = k
            v_cache[:, :, start:start + Q] = v
            end = start + Q
            a = _attention(q, k_cache[:, :, :end], v_cache[:, :, :end], mask, scaling, eager)
            h = h + o_proj(a)
            x = norm(norm2, h)
            h = h + down(act(gate(x)) * up(x))   # the Llama-family MLP
        return model.lm_head(norm(body.norm, h[:, -1])).float()

    # Prefill, of the distinct prompts. A pad query sees only itself, so no row of the mask is
    # empty (an empty row is NaN).
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    allowed = (causal & (key_bias[first, None, :P] == 0)) | torch.eye(P, dtype=torch.bool, device=device)
    mask = torch.zeros(len(first), 1, P, P, device=device).masked_fill_(~allowed.unsqueeze(1), float("-inf"))
    h0 = body.embed_tokens(input_ids[:1, :1])   # only for the rotary embedding's dtype and device
    cos, sin = body.rotary_emb(h0, positions[first])                                # (U, P, D)
    logits = forward(input_ids[first], cos.unsqueeze(1), _sign_sin(sin).unsqueeze(1), 0, mask)
    if len(first) < B:   # every row gets its prompt's cache, trunk output and next-token logits
        caches[:] = [(k.index_select(0, inverse), v.index_select(0, inverse)) for k, v in caches]
        trunk[:] = [t.index_select(0, inverse) for t in trunk]
        logits = logits.index_select(0, inverse)
    # cos/sin of every decoding step's position at once, not one small call per token.
    cos, sin = body.rotary_emb(h0, next_position + torch.arange(max_new_tokens, device=device))   # (B, R, D)
    cos, sin_signed = cos.unsqueeze(1), _sign_sin(sin).unsqueeze(1)                   # (B, 1, R, D)

    per_row = isinstance(temperature, torch.Tensor)
    if per_row:
        temps = temperature.to(device=device, dtype=torch.float32).reshape(B, 1)              # (B, 1)
        greedy_rows = temps.squeeze(1) == 0                                                   # (B,)
        temps = temps.masked_fill(temps == 0, 1.0)   # those rows take the argmax below
        do_sample = do_sample and not bool(greedy_rows.all())
    check_every = stop_check_every or (1 if device.type == "cpu" else 16)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        if do_sample:
            scaled = logits / temps if per_row else logits / temperature if temperature != 1.0 else logits
            probs = filter_logits(scaled, top_k, top_p).softmax(-1)
            # Inverse-CDF sampling: one uniform number per row. (torch.multinomial draws an
            # exponential per vocabulary entry: on CPU it was a fifth of the whole decoding step.)
            u = torch.rand(B, 1, device=device, generator=generator)
            # right=True: the first cumulative sum strictly above u, never a token of probability 0
            token = torch.searchsorted(probs.cumsum(-1), u, right=True).squeeze(1)
            token = token.clamp(max=probs.shape[-1] - 1)   # the cumsum can round to just under 1
            if per_row:
                token = torch.where(greedy_rows, logits.argmax(-1), token)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(done, pad_id)
        out[:, t] = token
        steps = t + 1
        done |= torch.isin(token, stops)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        key_bias[:, P + t] = 0.0
        logits = forward(token.unsqueeze(1), cos[:, :, t:t + 1], sin_signed[:, :, t:t + 1], P + t,
                         key_bias[:, None, None, :P + t + 1])
    if steps and check_every > 1:   # cut the needless steps: end where the last row stopped
        is_stop = torch.isin(out[:, :steps], stops)
        stopped_at = torch.where(is_stop.any(-1), is_stop.int().argmax(-1), steps - 1)   # (B,) first stop
        steps = int(stopped_at.max()) + 1
    ids = torch.cat([input_ids, out[:, :steps]], dim=1)
    if keep_trunk is None:
        return ids
    return ids, trunk[0][:, :P + steps]
