"""Chatting with a model in its own chat format (the Starling / OpenChat-3.5 one for Starling): render, generate, score.

The Starling-LM-7B-alpha model card asks for its exact chat format and greedy decoding:

    single turn  GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:
    multi turn   GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant: Hi<|end_of_turn|>GPT4 Correct User: How are you today?<|end_of_turn|>GPT4 Correct Assistant:
    coding mode  Code User: Implement quicksort using C++<|end_of_turn|>Code Assistant:

`render` produces these strings from chat messages through the tokenizer's own chat template (so a
hub model with another template is rendered its way), `chat` / `chat_batch` generate replies
(`model_card_examples` runs the card's three examples), and `generate` is the batched generation
every evaluation uses: left padding, longest prompts first, greedy unless a temperature is given,
stopping at the end of the turn (`<|end_of_turn|>`, ChatML's `<|im_end|>`, or eos).

`continuation_logprobs` scores fixed continuations of a prompt (the log-probability of each
candidate, e.g. the ratings "1".."10" after a judge prompt); the prompt is run once and its KV cache
shared by all candidates.

Departures from the model card's snippet: the rendered prompt starts with the tokenizer's BOS
written by the template (`<s>`), and tokenizing it adds no second BOS (the card tokenizes the bare
string and lets the tokenizer add BOS: the same ids); replies are decoded without special tokens
and stripped, as FastChat does for MT-Bench.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from starling_lib.data import END_OF_TURN
from starling_lib.sampling import check_engine


@dataclass(frozen=True)
class DecodingConfig:
    """How replies are generated."""

    max_new_tokens: int = 512
    """Most tokens per reply. MT-Bench uses 1024."""

    temperature: float = 0.0
    """0 means greedy decoding (the model card's recommendation); above 0, sampling."""

    top_p: float = 1.0
    """Nucleus sampling mass; only used when sampling."""

    batch_size: int = 8
    """Prompts per generate() call. Left padding makes batching exact for decoder-only models."""

    seed: int = 0
    """Seed of the sampling RNG (forked, so the caller's RNG is untouched). Unused when greedy."""

    engine: str = "auto"
    """"fast" (starling_lib.sampling: a preallocated KV cache; one batch may mix temperatures),
    "hf" (`model.generate`), "auto" (fast where the model is supported, else hf), or "vllm" /
    "vllm-server" (starling_lib.engines; one batch may mix temperatures). Greedy replies are the
    same tokens either way; sampled ones follow the same distribution (top_k from the model's
    generation config, as `generate` reads it) with other random numbers."""

    def __post_init__(self):
        check_engine(self.engine)
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, batch_size >= 1 and max_new_tokens >= 1; got "
                             f"{self.temperature}, {self.top_p}, {self.batch_size}, {self.max_new_tokens}")


def render(tokenizer, messages: Sequence[dict], mode: str = "gpt4") -> str:
    """The prompt text for `messages` ending with an open assistant turn.

    mode: "gpt4" (the default OpenChat/Starling format) or "code" (the model card's coding mode;
    only templates that know `mode`, such as the project's OpenChat template, honour it).
    """
    if mode not in ("gpt4", "code"):
        raise ValueError(f"mode must be 'gpt4' or 'code', got {mode!r}")
    extra = {"mode": "code"} if mode == "code" else {}
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **extra)


# The tokens that end an assistant turn in the chat formats in use: OpenChat-3.5's, ChatML's
# (SmolLM2, Qwen) and Llama-3's.
END_OF_TURN_TOKENS = (END_OF_TURN, "<|im_end|>", "<|eot_id|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a reply: the tokenizer's eos and every end-of-turn token its vocabulary has.

    Checkpoints do not all set eos to their end of turn (OpenChat-based ones keep `</s>`; base
    ChatML models `<|endoftext|>`); stopping only at eos would let the model run on into a
    made-up next turn.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] not in ids]
    return ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote BOS; add_special_tokens would add a second one on Llama tokenizers.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], config: DecodingConfig = DecodingConfig(),
             progress: bool = False, desc: str = "generating",
             temperatures: Sequence[float] | None = None) -> list[str]:
    """Replies to rendered `prompts` (see `render`), in the same order.

    Batches of `config.batch_size`, longest prompts first so that a batch pads little.
    temperatures: each prompt's own (0: greedy) instead of `config.temperature`; with the fast
    engine a batch mixes them, with `model.generate` a batch runs once per temperature.
    """
    from tqdm.auto import tqdm

    from starling_lib import engines
    from starling_lib.sampling import SERVING_ENGINES, sample, use_fast_sampling

    if not prompts:
        return []
    temps = [config.temperature] * len(prompts) if temperatures is None else [float(t) for t in temperatures]
    if len(temps) != len(prompts) or min(temps) < 0:
        raise ValueError(f"temperatures: need one >= 0 per prompt ({len(prompts)}), got {list(temperatures)}")
    device = _device(model)
    encoded = [_encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    longest = max(len(e) for e in encoded) + config.max_new_tokens
    fast = use_fast_sampling(config.engine, model, longest)
    top_k = getattr(model.generation_config, "top_k", None)
    top_k = 50 if top_k is None else top_k            # what generate() samples with when the config is silent

    def run(input_ids, attention_mask, row_temps: list[float]) -> torch.Tensor:
        if config.engine in SERVING_ENGINES:   # each row its own temperature; the seed from the forked generator
            settings = [engines.SamplingSettings(config.max_new_tokens, t, config.top_p, top_k, stops) for t in row_temps]
            return engines.generate_padded(engines.engine_for(model, config.engine, tokenizer), input_ids,
                                           attention_mask, settings, pad_id, engines.seed_from_torch())
        if fast:
            return sample(model, input_ids, attention_mask, config.max_new_tokens, stops, pad_id,
                          temperature=torch.tensor(row_temps), top_k=top_k, top_p=config.top_p,
                          do_sample=max(row_temps) > 0)
        out = input_ids.new_full((len(row_temps), input_ids.shape[1] + config.max_new_tokens), pad_id)
        width = 0
        for temp in sorted(set(row_temps)):              # model.generate takes one temperature a call
            rows = torch.tensor([r for r, t in enumerate(row_temps) if t == temp])
            kwargs = dict(do_sample=True, temperature=temp, top_p=config.top_p) if temp > 0 else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # None: no "unused flag" warnings
            part = model.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                  max_new_tokens=config.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id, **kwargs)
            out[rows, :part.shape[1]] = part
            width = max(width, part.shape[1])
        return out[:, :width]

    replies: list[str | None] = [None] * len(prompts)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), tqdm(total=len(prompts), desc=desc, disable=not progress) as bar:
        torch.manual_seed(config.seed)
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            width = max(len(encoded[i]) for i in idx)
            # Left padding: every prompt ends at the same position, so the first new token of each row
            # is generated right after its own prompt.
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
            attention_mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx],
                                          device=device)
            out = run(input_ids, attention_mask, [temps[i] for i in idx])
            for row, i in enumerate(idx):
                replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
            bar.update(len(idx))
    return replies


def chat_batch(model, tokenizer, conversations: Sequence[Sequence[dict]], mode: str = "gpt4",
               config: DecodingConfig = DecodingConfig(), progress: bool = False) -> list[str]:
    """The assistant's next reply to each conversation (a list of user/assistant messages)."""
    return generate(model, tokenizer, [render(tokenizer, c, mode) for c in conversations], config, progress)


def chat(model, tokenizer, messages: Sequence[dict] | str, mode: str = "gpt4",
         config: DecodingConfig = DecodingConfig()) -> str:
    """The assistant's reply to one conversation; a plain string is one user message.

    >>> chat(model, tokenizer, "Hello, how are you?")                      # single turn
    >>> chat(model, tokenizer, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
    ...                         {"role": "user", "content": "How are you today?"}])  # multi turn
    >>> chat(model, tokenizer, "Implement quicksort using C++", mode="code")  # coding mode
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return chat_batch(model, tokenizer, [messages], mode, config)[0]


# The Starling-LM-7B-alpha model card's three usage examples: (name, messages, mode).
MODEL_CARD_EXAMPLES = [
    ("single turn", [{"role": "user", "content": "Hello"}], "gpt4"),
    ("multi turn", [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                    {"role": "user", "content": "How are you today?"}], "gpt4"),
    ("coding mode", [{"role": "user", "content": "Implement quicksort using C++"}], "code"),
]


def model_card_examples(model, tokenizer, config: DecodingConfig = DecodingConfig(max_new_tokens=64)) -> pd.DataFrame:
    """The model card's examples: rendered prompt and the model's (greedy by default) reply, one row each."""
    rows = [{"example": name, "prompt": render(tokenizer, messages, mode),
             "reply": chat(model, tokenizer, messages, mode, config)} for name, messages, mode in MODEL_CARD_EXAMPLES]
    return pd.DataFrame(rows).set_index("example")


def _continuation_ids(tokenizer, prefix: str, prefix_ids: list[int], continuation: str) -> list[int]:
    # Tokenize prefix + continuation together and keep what follows the prefix's ids, so the
    # continuation is tokenized as it would be in running text (SentencePiece would otherwise give
    # a lone "1" a leading-space piece). If the join merged across the boundary, fall back to the
    # continuation's own ids.
    joint = _encode(tokenizer, prefix + continuation)
    if joint[:len(prefix_ids)] == prefix_ids and len(joint) > len(prefix_ids):
        return joint[len(prefix_ids):]
    return _encode(tokenizer, continuation)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prefix: str, continuations: Sequence[str]) -> torch.Tensor:
    """log p(continuation | prefix) for each continuation (summed over its tokens), shape [n], float32.

    The prefix is run once; its KV cache is repeated for the n continuations, which run as one
    right-padded batch (padding after a sequence cannot change its causal log-probs).
    """
    device = _device(model)
    prefix_ids = _encode(tokenizer, prefix)
    conts = [_continuation_ids(tokenizer, prefix, prefix_ids, c) for c in continuations]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(prefix_ids) + max(len(c) for c in conts) > limit:
        raise ValueError(f"prompt of {len(prefix_ids)} tokens does not fit the model's {limit} positions; "
                         f"shorten the answers being judged (e.g. max_new_tokens) or use a longer-context judge")
    out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1)            # distribution of each continuation's 1st token
    width = max(len(c) for c in conts)
    logps = torch.stack([first[c[0]] for c in conts])
    if width > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(conts))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = torch.tensor([c + [pad_id] * (width - len(c)) for c in conts], device=device)
        logits = model(input_ids=batch, past_key_values=cache, use_cache=False).logits.float().log_softmax(-1)
        for j, c in enumerate(conts):
            for t in range(1, len(c)):  # logits at position t-1 predict token t
                logps[j] += logits[j, t - 1, c[t]]
    return logps.cpu()
