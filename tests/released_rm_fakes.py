"""Tiny stand-ins for the released Starling reward models, in their repositories' layouts, and the
model cards' own classes to score them with (tests/test_released_rm.py, tests/test_rm_notebook.py).

  * `llama2_base(folder)`: a Llama "meta-llama/Llama-2-7b-chat-hf": config.json, safetensors and a
    tokenizer that puts "<s>" before every text by itself, as Llama-2's does (unk "<unk>" = id 0,
    "<s>" = 1, "</s>" = 2; no pad token).
  * `rm_7b_alpha(folder, base)`: "berkeley-nest/Starling-RM-7B-alpha": only pytorch_model.bin, the
    state dict of the card's `GPTRewardModel` (keys model.model.*, model.lm_head.weight, transformer.*,
    v_head.weight) with its own body weights, and the repository's config.json that names no
    transformers class (architectures "LLMForSequenceRegression").
  * `yi_base(folder)`: "01-ai/Yi-34B-Chat" as the 34B card uses it: a tokenizer (and config.json), with
    <|im_start|> / <|im_end|>, which adds nothing by itself and pads with "<unk>" = id 0.
  * `rm_34b(folder)`: "Nexusflow/Starling-RM-34B": the card's `LlamaForSequenceClassification`
    (transformer + v_head) saved by transformers, sharded safetensors with an index. Yi is a Llama.

The tokenizers are the tiny model's byte-level BPE (starling_lib.models) with the special tokens
changed: what matters here is which tokens the tokenizer adds and pads with, not its vocabulary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

HIDDEN, LAYERS = 32, 2
CARD_MAX_LENGTH = 2048   # both cards' get_reward: truncation=True, max_length=2048, padding="max_length"


def card_text_7b(prompt: str, answer: str) -> str:
    """The 7B card's example with its strings put in: "<s>[INST] Hello? </s> [/INST] Hi, how can I help you?</s>"."""
    return f"<s>[INST] {prompt} </s> [/INST] {answer}</s>"


def card_text_34b(prompt: str, answer: str) -> str:
    """The 34B card's "Yi chat template" example with its strings put in."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"


def stand_in_tokenizer(auto_bos: bool, chatml: bool):
    """The tiny byte-level BPE with "<s>" put before every text (`auto_bos`, Llama-2's) and/or the
    ChatML tokens, pad "<unk>" (Yi's) when `chatml`."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from starling_lib.models import tiny_model_path

    backend = Tokenizer.from_file(str(tiny_model_path() / "tokenizer.json"))   # ids 0..2: <unk>, <s>, </s>
    if chatml:
        backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    if auto_bos:   # Llama-2's tokenizer: "<s>" before every text (add_bos_token)
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>",
                                   eos_token="<|im_end|>" if chatml else "</s>", pad_token="<unk>" if chatml else None,
                                   clean_up_tokenization_spaces=False)


def _config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                       eos_token_id=2)


def _randomize(module: nn.Module, seed: int) -> None:
    """New weights for every parameter (a fine-tuned body differs from its base everywhere)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def llama2_base(folder: Path) -> Path:
    from transformers import LlamaForCausalLM

    tokenizer = stand_in_tokenizer(auto_bos=True, chatml=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(len(tokenizer)))
    _randomize(model, 0)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


class CardGPTRewardModel(nn.Module):
    """The 7B card's class, as written there, except PAD_ID (see below)."""

    def __init__(self, model_path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__()
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.config = model.config
        self.config.n_embd = self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.n_embd
        self.model = model
        self.transformer = model.model
        self.v_head = nn.Linear(self.config.n_embd, 1, bias=False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.pad_token = self.tokenizer.unk_token
        # The card: self.tokenizer(self.tokenizer.pad_token)["input_ids"][0], which with a tokenizer that
        # puts BOS first is BOS's id; unk's is the id its c_ind - 1 rule means (starling_lib/released_rm.py).
        self.PAD_ID = self.tokenizer.unk_token_id

    def forward(self, input_ids=None, attention_mask=None):
        bs = input_ids.shape[0]
        hidden_states = self.transformer(input_ids, attention_mask=attention_mask)[0]
        scores = []
        rewards = self.v_head(hidden_states).squeeze(-1)
        for i in range(bs):
            c_inds = (input_ids[i] == self.PAD_ID).nonzero()
            c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
            scores.append(rewards[i, c_ind - 1])
        return scores


def card_rewards(model: nn.Module, tokenizer, samples: list[str]) -> torch.Tensor:
    """The cards' get_reward: one batch, truncated from the left and padded to 2048 tokens."""
    tokenizer.truncation_side = "left"
    enc = tokenizer(samples, truncation=True, max_length=CARD_MAX_LENGTH, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    out = out["scores"] if isinstance(out, dict) else torch.stack(out)
    return out.float()


def rm_7b_alpha(folder: Path, base: Path, keys: str = "card") -> Path:
    """keys "card": the card's class's whole state dict; "transformer": only transformer.* and v_head;
    "top": only the last block, the final norm and v_head (the rest stays the base's under strict=False)."""
    folder.mkdir(parents=True, exist_ok=True)
    rm = CardGPTRewardModel(str(base))
    _randomize(rm.transformer, 1)
    _randomize(rm.v_head, 2)
    state = rm.state_dict()
    if keys == "transformer":
        state = {k: v for k, v in state.items() if k.startswith("transformer.") or k == "v_head.weight"}
    elif keys == "top":
        top = f"transformer.layers.{LAYERS - 1}."
        state = {k: v for k, v in state.items() if k.startswith((top, "transformer.norm.")) or k == "v_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    config = {**json.loads((base / "config.json").read_text()), "architectures": ["LLMForSequenceRegression"],
              "_name_or_path": "meta-llama/Llama-2-7b-chat-hf"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def card_llama_rm_class():
    """The 34B card's class (a LlamaPreTrainedModel with `transformer` and `v_head`), as written there."""
    from transformers import LlamaModel, LlamaPreTrainedModel

    class LlamaForSequenceClassification(LlamaPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.transformer = LlamaModel(config)
            self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
            self.PAD_ID = 0
            self.post_init()

        def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None):
            transformer_outputs = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                                   output_hidden_states=True)
            hidden_states = transformer_outputs.hidden_states[-1]
            scores = []
            rewards = self.v_head(hidden_states).squeeze(-1)
            bs = int(input_ids.shape[0])
            for i in range(bs):
                c_inds = (input_ids[i] == self.PAD_ID).nonzero()
                c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
                scores.append(rewards[i, c_ind - 1])
            return {"scores": torch.stack(scores)}

    return LlamaForSequenceClassification


def yi_base(folder: Path) -> Path:
    tokenizer = stand_in_tokenizer(auto_bos=False, chatml=True)
    tokenizer.save_pretrained(folder)
    _config(len(tokenizer)).save_pretrained(folder)   # the repository has one (its weights are left out here)
    return folder


def rm_34b(folder: Path, yi: Path) -> Path:
    from transformers import AutoTokenizer

    cls = card_llama_rm_class()
    torch.manual_seed(3)
    rm = cls(_config(len(AutoTokenizer.from_pretrained(yi))))
    _randomize(rm, 3)
    rm.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    return folder


def files(folder: Path) -> dict:
    """A folder's files as name -> path, for hub_caches.put_hf."""
    return {p.name: p for p in folder.iterdir() if p.is_file()}
