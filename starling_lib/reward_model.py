"""The reward model: a transformer body and a linear head that reads the answer's last token.

    rm, tokenizer = build_reward_model("tiny")                      # fresh head on a backbone
    rewards = rm.score([messages_a, messages_b], ["answer a", "answer b"])   # (2,) float32

Starling-RM-7B-alpha is Llama-2-7B-chat without its LM head, plus a linear layer that maps the
final hidden state of the last token to one number. Any causal LM works the same way here: we load
its body with `AutoModel` (no vocabulary-sized LM head, which would cost memory and compute for
logits nobody reads) and add `head = Linear(hidden, 1)`. A sequence-classification checkpoint
(`XForSequenceClassification` with one label, what TRL's RewardTrainer trains) has exactly this
shape, body + `score` Linear, so `RewardModel.from_sequence_classifier` adopts one as is.

What the model reads (the OpenChat-3.5 chat, truncated so that it keeps the answer's end, padded
on the right or packed with each prompt once) is laid out by `rm_layout`; the head reads the last
non-pad position, `<|end_of_turn|>` after the whole answer. Saving and loading: `rm_io`.

Trainable parts: everything (full fine-tuning, as Starling-RM), only the top N transformer blocks
(+ the final norm and the head), only the head (N = 0), or LoRA adapters on every linear layer of
the body (through peft) with the head trained in full.

Departure from Starling-RM (efrick2002/Starling, reward-model-training/models.py): its head starts
from PyTorch's default Linear initialisation; ours from N(0, 1/(hidden+1)), as OpenAI's
lm-human-preferences, so initial rewards have unit scale whatever the width.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from starling_lib import hub
from starling_lib.models import (PACKAGED_MODELS, apply_chat_format, decoder_layers, load_tokenizer,
                                 quiet_transformers, resolve_model, top_layers_from, train_top_layers, trunk_output)
from starling_lib.rm_layout import chat_texts, encode_chats, pack_shared_prompts, pad_right, truncate_keep_end


# --------------------------------------------------------------------------------------------
# the model


class RewardModel(nn.Module):
    """A transformer body and a scalar head on the hidden state of the last non-pad token.

    backbone:  a transformers base model (`AutoModel`), maybe wrapped by peft; returns
               `last_hidden_state`.
    head:      Linear(hidden, 1) without bias (a bias shifts every reward alike; the losses
               cannot see it).
    tokenizer, max_length: what `score` uses to turn chats into tokens (in the tokenizer's chat template).
    backbone_name: the hub id or path the body came from ("tiny" for the offline model).
    chat_format: how the tokenizer's template was chosen (models.CHAT_FORMATS), saved with the model.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, tokenizer, max_length: int,
                 backbone_name: str = "", chat_format: str = "auto"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backbone_name = backbone_name
        self.chat_format = chat_format
        self.trunk_split: int | None = None   # first trained block when the blocks below are frozen (build_reward_model)
        # FSDP's auto-wrap policy looks for the blocks to shard here (e.g. ["MistralDecoderLayer"]).
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)

    @classmethod
    def from_sequence_classifier(cls, model: nn.Module, tokenizer, max_length: int, backbone_name: str = "",
                                 chat_format: str = "auto"):
        """Adopt an `XForSequenceClassification` with one label: its body and its `score` layer."""
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"{type(model).__name__} has no one-output `score` Linear layer; "
                             "expected a sequence-classification model with num_labels=1")
        return cls(getattr(model, model.base_model_prefix), head, tokenizer, max_length, backbone_name, chat_format)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                read: torch.Tensor | None = None, trunk: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (N,) for N right- or left-padded sequences (N, T), or for the packed layout of
        `rm_layout.pack_shared_prompts` (attention_mask (R, 1, L, L), position_ids (R, L), read (N, 2)).

        trunk: (N, T, H) the frozen trunk's output for padded sequences (`models.trunk_output` at
        `self.trunk_split`): only the trainable top blocks run, with the same result.
        """
        if trunk is not None:
            if self.trunk_split is None:
                raise ValueError("this reward model trains its whole body: there is no frozen trunk to start from")
            if attention_mask.dim() != 2:
                raise ValueError("a cached trunk is for padded sequences, not the packed layout")
            with top_layers_from(self.backbone, self.trunk_split, trunk):
                return self.forward(input_ids, attention_mask)
        if attention_mask.dim() == 4:
            if read is None or position_ids is None:
                raise ValueError("a packed batch (4-D attention mask) needs position_ids and read")
            impl = getattr(self.backbone.config, "_attn_implementation", "sdpa")
            if impl == "eager":   # eager attention adds the mask to the scores
                attention_mask = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device
                                             ).masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
            elif impl != "sdpa":
                raise NotImplementedError(f"packing needs sdpa or eager attention, the backbone uses {impl!r}; "
                                          "set packing=False")
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state                 # (R, L, H)
            b_last_hidden = hidden[read[:, 0], read[:, 1]]                            # (N, H)
            return self._rewards(b_last_hidden)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state                     # (N, T, H)
        # Index of the last 1 in the mask: works for right and left padding alike.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask).argmax(-1)                                # (N,)
        b_last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
        return self._rewards(b_last_hidden)

    def _rewards(self, b_last_hidden: torch.Tensor) -> torch.Tensor:
        # A fresh tensor, not squeeze's view: FSDP2 warns that an in-place op on a view returned by
        # a wrapped module would skip its pre-backward hook.
        return self.head(b_last_hidden).squeeze(-1).clone()                          # (N,)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 16, progress: bool = False,
                  desc: str = "scoring", trunk_cache: TrunkCache | None = None) -> torch.Tensor:
        """Rewards (N,) float32 on CPU for token-id sequences (see `score_sequences`)."""
        return score_sequences(self, seqs, self.tokenizer.pad_token_id, batch_size, progress, desc, trunk_cache)

    def score(self, prompts: Sequence[Sequence[dict] | str], answers: Sequence[str], batch_size: int = 16,
              progress: bool = False, trunk_cache: TrunkCache | None = None) -> torch.Tensor:
        """Rewards (N,) for N (prompt, answer) pairs; a prompt is a message list or a plain string.

        trunk_cache: a `TrunkCache` of a model with this one's frozen trunk: answers it has seen
        run only the top blocks, new ones are added to it.
        """
        texts = [chat_texts(self.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
        prompt_texts = [t[0] for t in texts]
        seqs, prompt_lengths = encode_chats(self.tokenizer, prompt_texts, [t[1] for t in texts], self.max_length,
                                            return_prompt_lengths=True)
        if trunk_cache is None and len(set(prompt_texts)) < len(prompt_texts) and self.can_pack:
            # Several answers to one prompt (a policy's rollouts, an evaluation's samples): the
            # prompt is encoded once for all of them (rm_layout.pack_shared_prompts).
            return score_packed(self, seqs, prompt_lengths, self.tokenizer.pad_token_id, batch_size,
                                pack_length=2 * self.max_length, progress=progress)
        return self.score_ids(seqs, batch_size=batch_size, progress=progress, trunk_cache=trunk_cache)

    @property
    def can_pack(self) -> bool:
        """Whether the body's attention takes the packed layout's 4-D mask (sdpa or eager)."""
        return getattr(self.backbone.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")

    def score_texts(self, texts: Sequence[str], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Rewards for already-rendered chats (each ending with the answer's end-of-turn token).

        Too-long texts lose tokens from the left (after BOS): there is no prompt/answer boundary to use.
        """
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        seqs = [truncate_keep_end(ids, 0, self.max_length, 1 if ids and ids[0] == bos else 0) for ids in enc]
        return self.score_ids(seqs, batch_size=batch_size, progress=progress)


@torch.no_grad()
def score_sequences(model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
                    progress: bool = False, desc: str = "scoring", trunk_cache=None) -> torch.Tensor:
    """Rewards (N,) float32 on CPU from `model(input_ids, attention_mask)` for token-id sequences.

    `model` is a RewardModel or one wrapped by accelerate (DDP, FSDP), so the trainer can evaluate
    without unwrapping. Sequences are scored in batches of similar length and returned in order.
    trunk_cache: a `TrunkCache` of a model with the same frozen trunk (checked); the top blocks then
        start from its frozen-trunk outputs.
    """
    from tqdm.auto import tqdm

    if trunk_cache is not None:
        trunk_cache.check(getattr(model, "module", model))   # DDP keeps the model in .module
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Sorting by length puts similar lengths in one batch: far less padding to compute.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    rewards = torch.empty(len(seqs), dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        input_ids, attention_mask = pad_right([seqs[i] for i in idx], pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        trunk = trunk_cache.trunk(input_ids, attention_mask) if trunk_cache is not None else None
        rewards[idx] = model(input_ids, attention_mask, trunk=trunk).float().cpu()
    model.train(was_training)
    return rewards


@torch.no_grad()
def score_packed(model: nn.Module, seqs: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_id: int,
                 batch_size: int = 16, pack_length: int = 0, progress: bool = False,
                 desc: str = "scoring") -> torch.Tensor:
    """Rewards (N,) float32 on CPU for token-id sequences whose first `prompt_lengths` tokens are
    their prompt's, with each prompt encoded once per batch for all its answers
    (`rm_layout.pack_shared_prompts`): the rewards `score_sequences` gives, to float rounding,
    from fewer tokens.

    Batches hold about `batch_size` sequences; one prompt's answers stay in one batch. A row holds
    at most the batch's largest prompt-and-answers segment (no more than `pack_length`, when it is
    set, and no less than the longest sequence): attention over a packed row is computed densely,
    so rows much longer than a segment would trade the tokens saved for attention work.
    """
    from tqdm.auto import tqdm

    groups: dict[tuple, list[int]] = {}   # prompt tokens -> its sequences
    for i, (ids, n_prompt) in enumerate(zip(seqs, prompt_lengths, strict=True)):
        groups.setdefault(tuple(ids[:n_prompt]), []).append(i)
    batches = []   # (sequences, largest segment: a prompt's tokens plus all its answers')
    batch, largest = [], 0
    for prompt, members in groups.items():
        if batch and len(batch) + len(members) > batch_size:
            batches.append((batch, largest))
            batch, largest = [], 0
        batch = batch + members
        largest = max(largest, len(prompt) + sum(len(seqs[i]) - len(prompt) for i in members))
    batches += [(batch, largest)] if batch else []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rewards = torch.empty(len(seqs), dtype=torch.float32)
    for idx, segment in tqdm(batches, desc=desc, disable=not progress, leave=False):
        row = max(min(segment, pack_length) if pack_length else segment, max(len(seqs[i]) for i in idx))
        packed = pack_shared_prompts([seqs[i] for i in idx], [prompt_lengths[i] for i in idx], row, pad_id)
        rewards[idx] = model(packed["input_ids"].to(device), packed["attention_mask"].to(device),
                             position_ids=packed["position_ids"].to(device), read=packed["read"].to(device)
                             ).float().cpu()
    model.train(was_training)
    return rewards


# --------------------------------------------------------------------------------------------
# the frozen trunk's outputs, kept


def trunk_signature(model: RewardModel) -> tuple:
    """What identifies a reward model's frozen trunk: where it ends, how many frozen tensors it
    has and the sum of their weights (float64). Models with one signature compute one trunk output."""
    if model.trunk_split is None:
        raise ValueError("this reward model trains its whole body: there is no frozen trunk to cache "
                         "(cache_trunk needs unfrozen_layers >= 0 and no LoRA)")
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    return model.trunk_split, len(frozen), round(sum(float(p.detach().double().sum()) for p in frozen), 6)


class TrunkCache:
    """The frozen trunk's output for each answer sequence, computed the first time it is seen.

    With only the top blocks trained (unfrozen_layers >= 0), what the blocks below them make of a
    sequence never changes, so a sequence seen again (the next epoch, every held-out evaluation)
    only runs the top blocks. One (length, hidden) tensor is kept per distinct sequence, on the
    device, in the body's dtype: for 2,500 answers of 128 tokens at SmolLM2's width (576), 0.7 GB
    in float32.

    One cache serves every model built on the same body with the same trained blocks (a second
    loss, TRL's baseline, the reloaded model): `check(model)` compares their trunks' signatures
    (`trunk_signature`) and refuses a model whose trunk differs.
    """

    def __init__(self, model: RewardModel, pad_id: int):
        self.signature = trunk_signature(model)
        self.model, self.pad_id, self.store = model, pad_id, {}
        self._checked = {id(model)}

    def __len__(self) -> int:
        return len(self.store)

    def check(self, model: RewardModel) -> None:
        """Raise ValueError unless `model`'s frozen trunk is the one this cache was filled with."""
        if id(model) in self._checked:
            return
        theirs = trunk_signature(model)
        if theirs != self.signature:
            raise ValueError(f"this trunk cache holds another trunk's outputs (split, frozen tensors, weight sum "
                             f"{self.signature}) than the model's {theirs}: build a new TrunkCache for it")
        self._checked.add(id(model))

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T, H) for right-padded sequences (N, T); zeros on the padding (never attended to)."""
        lengths = attention_mask.sum(-1).tolist()
        keys = [tuple(ids[:n].tolist()) for ids, n in zip(input_ids, lengths)]
        missing = sorted({i for i, key in enumerate(keys) if key not in self.store})
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            hidden = trunk_output(self.model.backbone, self.model.trunk_split, input_ids=input_ids[rows],
                                  attention_mask=attention_mask[rows])              # (M, T, H)
            for j, i in enumerate(missing):
                self.store[keys[i]] = hidden[j, :lengths[i]].clone()
        out = self.store[keys[0]].new_zeros(len(keys), input_ids.shape[1], self.store[keys[0]].shape[-1])
        for i, key in enumerate(keys):
            out[i, :lengths[i]] = self.store[key]
        return out


# --------------------------------------------------------------------------------------------
# building: backbone, freezing, LoRA


def resolve_backbone(name_or_path: str) -> str:
    """"tiny" or a packaged model's short name -> its cached folder (models.resolve_model); an
    existing folder as is; else a hub id "org/name".

    A path-like name that does not exist is an error here rather than a confusing hub lookup.
    """
    if name_or_path == "tiny" or name_or_path in PACKAGED_MODELS:
        return resolve_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"backbone folder {path} has no config.json; is it a transformers checkpoint?")
        return str(path)
    parts = name_or_path.split("/")
    if name_or_path.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise FileNotFoundError(f"backbone {name_or_path!r}: no such folder (and not a hub id like 'org/name')")
    return name_or_path


def add_lora(backbone: nn.Module, r: int, alpha: int, dropout: float = 0.0) -> nn.Module:
    """Wrap the body with LoRA adapters (rank r) on every linear layer; the base weights freeze."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", bias="none")
    return get_peft_model(backbone, config)


def build_reward_model(backbone: str = "tiny", *, max_length: int = 1024, unfrozen_layers: int = -1,
                       lora_r: int = 0, lora_alpha: int = 16, dtype: torch.dtype | str | None = None,
                       gradient_checkpointing: bool = False, seed: int = 0, chat_format: str = "auto"):
    """A fresh `(RewardModel, tokenizer)` on `backbone`: "tiny", a packaged model ("smollm2-135m"),
    a hub id or a local folder. chat_format: how chats are rendered (models.CHAT_FORMATS; saved with
    the model and used again when it is loaded).

    A sequence-classification checkpoint keeps its own `score` head; any other checkpoint gets a
    new head. dtype None loads float32 (mixed precision, if any, is the trainer's business).
    The model is on CPU; the trainer (accelerate) moves it.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    path = resolve_backbone(backbone)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    source, revision, hub_errors = hub.pretrained_source(path)   # a hub id may name a revision: org/name@rev
    try:
        with hub_errors:
            config = AutoConfig.from_pretrained(source, revision=revision)
    except OSError as e:
        raise OSError(f"cannot load backbone {backbone!r} ({path}): {e}") from e
    tokenizer = apply_chat_format(load_tokenizer(path), chat_format)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)  # the new head's initialisation, without touching the caller's RNG
        if is_classifier:
            seqcls = AutoModelForSequenceClassification.from_pretrained(source, revision=revision, num_labels=1,
                                                                        dtype=dtype)
            model = RewardModel.from_sequence_classifier(seqcls, tokenizer, max_length, backbone)
        else:
            body = AutoModel.from_pretrained(source, revision=revision, dtype=dtype)
            hidden = body.config.get_text_config().hidden_size
            head = nn.Linear(hidden, 1, bias=False, dtype=dtype)
            nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
            model = RewardModel(body, head, tokenizer, max_length, backbone)
    model.chat_format = chat_format
    body = model.backbone
    body.config.pad_token_id = tokenizer.pad_token_id
    if lora_r > 0:
        if unfrozen_layers >= 0:
            raise ValueError("choose LoRA (lora_r > 0) or unfrozen_layers >= 0, not both")
        model.backbone = add_lora(body, lora_r, lora_alpha)
    else:
        train_top_layers(body, unfrozen_layers, final_norm=True)
        if unfrozen_layers >= 0:
            model.trunk_split = len(decoder_layers(body)) - unfrozen_layers
    if gradient_checkpointing:
        enable = getattr(body, "activation_checkpointing_enable", None)   # transformers >= 5.23's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Enabling also makes the embeddings' output require grad (for reentrant checkpointing).
        # Non-reentrant checkpointing does not need it, and with frozen bottom layers it would run
        # the backward through every frozen layer (8x the work for 4 of 32 trainable).
        body.disable_input_require_grads()
    return model, tokenizer
