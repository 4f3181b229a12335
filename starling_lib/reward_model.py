"""The reward model: a transformer body and a linear head that reads the answer's last token.

    rm, tokenizer = build_reward_model("tiny")                      # fresh head on a backbone
    rewards = rm.score([messages_a, messages_b], ["answer a", "answer b"])   # (2,) float32
    save_reward_model(rm, path);  rm = load_reward_model(path)    # what notebook 04 loads

Starling-RM-7B-alpha is Llama-2-7B-chat without its LM head, plus a linear layer that maps the
final hidden state of the last token to one number. Any causal LM works the same way here: we load
its body with `AutoModel` (no vocabulary-sized LM head, which would cost memory and compute for
logits nobody reads) and add `head = Linear(hidden, 1)`. A sequence-classification checkpoint
(`XForSequenceClassification` with one label, what TRL's RewardTrainer trains) has exactly this
shape, body + `score` Linear, so `RewardModel.from_sequence_classifier` adopts one as is.

What the model reads: the prompt and one answer in the OpenChat-3.5 format Starling-LM speaks,
    <s>GPT4 Correct User: {prompt}<|end_of_turn|>GPT4 Correct Assistant: {answer}<|end_of_turn|>
so the last token is always `<|end_of_turn|>`, a fixed place to read the reward from, after the
whole answer. Sequences are right-padded; the head reads the last non-pad position.

Truncation keeps the end: the head reads the last token, so a truncated sequence must still end
with the answer's end. Tokens are dropped from the LEFT of the prompt first (the oldest turns; the
BOS token stays), and only when the answer alone does not fit, from the left of the answer too,
while the prompt keeps at least a quarter of `max_length` so the model still sees what was asked.

Trainable parts: everything (full fine-tuning, as Starling-RM), only the top N transformer blocks
(+ the final norm and the head), only the head (N = 0), or LoRA adapters on every linear layer of
the body (through peft) with the head trained in full.

Saved format (a folder): the body as a transformers checkpoint (`config.json`, safetensors,
sharded when large), `reward_head.safetensors`, `reward_model.json` (backbone id, max length, how
to read the model) and the tokenizer. LoRA adapters are merged into the body on save, so the
folder is always a plain model.

Departures from Starling-RM (efrick2002/Starling, reward-model-training/models.py, dataset.py):
it formats with Llama-2's `[INST]` chat template; we use the OpenChat-3.5 format so the reward
model reads exactly what the policy of notebook 04 writes. It truncates the whole chat from the
left (BOS included); we keep BOS and a quarter of the budget for the prompt. Its head starts from
PyTorch's default Linear initialisation; ours from N(0, 1/(hidden+1)), as OpenAI's
lm-human-preferences, so initial rewards have unit scale whatever the width.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from starling_lib.data import END_OF_TURN, format_chat
from starling_lib.models import load_tokenizer, tiny_model_path, train_top_layers

REWARD_MODEL_FORMAT = 1
STAGE = "03_kwise_reward_training"   # the notebook's folder in a run: notebook 04 looks there
HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_model.json"


# --------------------------------------------------------------------------------------------
# text -> token ids, with truncation that keeps the answer's end


def truncate_keep_end(ids: Sequence[int], num_prompt: int, max_length: int, keep_first: int = 0) -> list[int]:
    """Cut `ids` (prompt tokens then answer tokens) to `max_length`, keeping the answer's end.

    num_prompt: how many of `ids` belong to the prompt.
    keep_first: leading tokens that always stay (1 for a BOS token).
    The prompt loses tokens from its left first; if the answer alone is too long it loses tokens
    from its left as well, and the prompt keeps its last `(max_length - keep_first) // 4` tokens.
    """
    return truncate_split(ids, num_prompt, max_length, keep_first)[0]


def truncate_split(ids: Sequence[int], num_prompt: int, max_length: int, keep_first: int = 0) -> tuple[list[int], int]:
    """`truncate_keep_end`, and how many of the kept tokens belong to the prompt (BOS included)."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids, num_prompt
    if max_length <= keep_first:
        raise ValueError(f"max_length={max_length} leaves no room after {keep_first} fixed token(s)")
    head, prompt, answer = ids[:keep_first], ids[keep_first:num_prompt], ids[num_prompt:]
    budget = max_length - keep_first
    prompt_keep = min(len(prompt), max(budget - len(answer), budget // 4))
    answer_keep = budget - prompt_keep
    return head + prompt[len(prompt) - prompt_keep:] + answer[len(answer) - answer_keep:], keep_first + prompt_keep


def chat_texts(messages: Sequence[dict] | str, answer: str) -> tuple[str, str]:
    """(prompt text, answer text) in the OpenChat-3.5 format; their concatenation is the full chat.

    messages: the conversation so far (ending with a user turn), or a plain string as one user turn.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = format_chat(messages, add_generation_prompt=True)
    # format_chat(messages + [assistant answer], add_generation_prompt=False) == prompt + this
    return prompt, f" {answer}{END_OF_TURN}"


def encode_chats(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int,
                 return_prompt_lengths: bool = False) -> list[list[int]] | tuple[list[list[int]], list[int]]:
    """Token ids of each prompt text + answer text, truncated by `truncate_keep_end`.

    The full text is tokenized in one piece (tokenizing the parts separately can differ at the
    seam for SentencePiece tokenizers); the offsets tell which tokens belong to the prompt.
    return_prompt_lengths: also return how many tokens of each kept sequence are its prompt's
    (what `pack_shared_prompts` shares between the answers of one prompt).
    """
    texts = [p + a for p, a in zip(prompts, answers, strict=True)]
    with quiet_transformers():  # "longer than model_max_length": we truncate right below
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out, prompt_lengths = [], []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
        num_prompt = sum(1 for start, _ in offsets if start < len(prompt))
        keep_first = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        kept, kept_prompt = truncate_split(ids, num_prompt, max_length, keep_first)
        out.append(kept)
        prompt_lengths.append(kept_prompt)
    return (out, prompt_lengths) if return_prompt_lengths else out


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, longest), padded on the right."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= capacity: items by decreasing size (ties in input
    order), each into the first bin with room. Every item must fit in an empty bin."""
    bins, room = [], []
    for j in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        b = next((b for b in range(len(bins)) if room[b] >= sizes[j]), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(j)
        room[b] -= sizes[j]
    return bins


def pack_shared_prompts(seqs: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pack_length: int,
                        pad_id: int) -> dict[str, torch.Tensor]:
    """Lay out (prompt + answer) sequences so each prompt is encoded once for all its answers, and
    pack them into rows of at most `pack_length` tokens instead of padding each to the longest.

    Sequences whose prompt tokens are identical (the K answers of one ranking, unless truncation
    cut the prompt differently for a long answer) form one segment: the prompt once, then each
    answer. When a prompt and all its answers pass `pack_length`, the answers are split among
    several segments, the prompt repeated in each. Segments fill rows first-fit by decreasing length.

        row:   [ prompt_1 | answer_1a | answer_1b | answer_1c ][ prompt_2 | answer_2a ] pad pad
        mask:  an answer token sees its own prompt and the earlier tokens of its own answer only
        positions: the prompt 0..P-1, every answer P..P+A-1, as if it were encoded alone

    So each answer's reward is what the padded layout computes (up to float rounding), with
    fewer tokens: on the bundled Nectar at 384 tokens, 1.44x fewer through the model than padding
    micro-batches of 4 rankings to their longest sequence (28.6% of those tokens were padding).
    Attention over a packed row is computed densely, masked pairs included: rows much longer than
    `max_length` trade the tokens saved for attention work (benchmarks/rm_epoch.py, --pack-length).

    Returns input_ids, position_ids (R, L); attention_mask (R, 1, L, L) bool, True where a token
    may attend; read (N, 2): (row, column) of the last token of each sequence, in input order.
    """
    if any(len(s) > pack_length for s in seqs):
        raise ValueError(f"pack_length={pack_length} is shorter than a sequence "
                         f"({max(len(s) for s in seqs)} tokens); use pack_length >= max_length")
    # 1. segments: (prompt ids, [(sequence index, answer ids), ...]); a prompt's answers go into
    #    as few segments of <= pack_length as first-fit decreasing finds
    groups: dict[tuple, list] = {}
    for i, (ids, n_prompt) in enumerate(zip(seqs, prompt_lengths, strict=True)):
        groups.setdefault(tuple(ids[:n_prompt]), []).append((i, list(ids[n_prompt:])))
    segments = [(prompt, [answers[j] for j in part])
                for prompt, answers in groups.items()
                for part in first_fit_decreasing([len(a) for _, a in answers], pack_length - len(prompt))]
    sizes = [len(p) + sum(len(a) for _, a in answers) for p, answers in segments]
    # 2. segments into rows, first-fit decreasing again
    rows = first_fit_decreasing(sizes, pack_length)
    # 3. token layout: segment id (-1 pad) and answer id (0 for prompt tokens) decide the mask
    width = max(sum(sizes[j] for j in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seg_id = torch.full((len(rows), width), -1, dtype=torch.long)
    ans_id = torch.zeros((len(rows), width), dtype=torch.long)
    read = torch.zeros((len(seqs), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for j in row:
            prompt, answers = segments[j]
            pieces = [(0, None, list(prompt))] + [(n + 1, i, a) for n, (i, a) in enumerate(answers)]
            for a_id, seq_index, ids in pieces:
                end = col + len(ids)
                input_ids[r, col:end] = torch.tensor(ids, dtype=torch.long)
                start_pos = 0 if a_id == 0 else len(prompt)
                position_ids[r, col:end] = torch.arange(start_pos, start_pos + len(ids))
                seg_id[r, col:end] = j
                ans_id[r, col:end] = a_id
                if seq_index is None:
                    prompt_end = end - 1
                else:
                    # An empty answer part (the prompt took the whole sequence) reads the prompt's end.
                    read[seq_index, 0], read[seq_index, 1] = r, end - 1 if ids else prompt_end
                col = end
    idx = torch.arange(width)
    causal = idx.unsqueeze(1) >= idx.unsqueeze(0)                                    # (L, L)
    same_segment = (seg_id.unsqueeze(2) == seg_id.unsqueeze(1)) & (seg_id.unsqueeze(2) >= 0)   # (R, L, L)
    visible = (ans_id.unsqueeze(1) == 0) | (ans_id.unsqueeze(2) == ans_id.unsqueeze(1))       # key is prompt, or same answer
    # Pad tokens see themselves only: no all-masked rows (their softmax would be NaN).
    mask = (same_segment & visible & causal) | torch.eye(width, dtype=torch.bool)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask.unsqueeze(1), "read": read}


# --------------------------------------------------------------------------------------------
# the model


class RewardModel(nn.Module):
    """A transformer body and a scalar head on the hidden state of the last non-pad token.

    backbone:  a transformers base model (`AutoModel`), maybe wrapped by peft; returns
               `last_hidden_state`.
    head:      Linear(hidden, 1) without bias (a bias shifts every reward alike; the losses
               cannot see it).
    tokenizer, max_length: what `score` uses to turn chats into tokens.
    backbone_name: the hub id or path the body came from ("tiny" for the offline model).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, tokenizer, max_length: int,
                 backbone_name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backbone_name = backbone_name
        # FSDP's auto-wrap policy looks for the blocks to shard here (e.g. ["MistralDecoderLayer"]).
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)

    @classmethod
    def from_sequence_classifier(cls, model: nn.Module, tokenizer, max_length: int, backbone_name: str = ""):
        """Adopt an `XForSequenceClassification` with one label: its body and its `score` layer."""
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"{type(model).__name__} has no one-output `score` Linear layer; "
                             "expected a sequence-classification model with num_labels=1")
        return cls(getattr(model, model.base_model_prefix), head, tokenizer, max_length, backbone_name)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                read: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (N,) for N right- or left-padded sequences (N, T), or for the packed layout of
        `pack_shared_prompts` (attention_mask (R, 1, L, L), position_ids (R, L), read (N, 2))."""
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
                  desc: str = "scoring") -> torch.Tensor:
        """Rewards (N,) float32 on CPU for token-id sequences (see `score_sequences`)."""
        return score_sequences(self, seqs, self.tokenizer.pad_token_id, batch_size, progress, desc)

    def score(self, prompts: Sequence[Sequence[dict] | str], answers: Sequence[str], batch_size: int = 16,
              progress: bool = False) -> torch.Tensor:
        """Rewards (N,) for N (prompt, answer) pairs; a prompt is a message list or a plain string."""
        texts = [chat_texts(p, a) for p, a in zip(prompts, answers, strict=True)]
        seqs = encode_chats(self.tokenizer, [t[0] for t in texts], [t[1] for t in texts], self.max_length)
        return self.score_ids(seqs, batch_size=batch_size, progress=progress)

    def score_texts(self, texts: Sequence[str], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Rewards for already-rendered chats (each ending with the answer's `<|end_of_turn|>`).

        Too-long texts lose tokens from the left (after BOS): there is no prompt/answer boundary to use.
        """
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        seqs = [truncate_keep_end(ids, 0, self.max_length, 1 if ids and ids[0] == bos else 0) for ids in enc]
        return self.score_ids(seqs, batch_size=batch_size, progress=progress)


@torch.no_grad()
def score_sequences(model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
                    progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Rewards (N,) float32 on CPU from `model(input_ids, attention_mask)` for token-id sequences.

    `model` is a RewardModel or one wrapped by accelerate (DDP, FSDP), so the trainer can evaluate
    without unwrapping. Sequences are scored in batches of similar length and returned in order.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Sorting by length puts similar lengths in one batch: far less padding to compute.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    rewards = torch.empty(len(seqs), dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        input_ids, attention_mask = pad_right([seqs[i] for i in idx], pad_id)
        rewards[idx] = model(input_ids.to(device), attention_mask.to(device)).float().cpu()
    model.train(was_training)
    return rewards


# --------------------------------------------------------------------------------------------
# building: backbone, freezing, LoRA


def resolve_backbone(name_or_path: str) -> str:
    """"tiny" -> the cached tiny model's folder; an existing folder as is; else a hub id "org/name".

    A path-like name that does not exist is an error here rather than a confusing hub lookup.
    """
    if name_or_path == "tiny":
        return str(tiny_model_path())
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


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report while we load a body without its LM head on purpose."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def build_reward_model(backbone: str = "tiny", *, max_length: int = 1024, unfrozen_layers: int = -1,
                       lora_r: int = 0, lora_alpha: int = 16, dtype: torch.dtype | str | None = None,
                       gradient_checkpointing: bool = False, seed: int = 0):
    """A fresh `(RewardModel, tokenizer)` on `backbone`: "tiny", a hub id or a local folder.

    A sequence-classification checkpoint keeps its own `score` head; any other checkpoint gets a
    new head. dtype None loads float32 (mixed precision, if any, is the trainer's business).
    The model is on CPU; the trainer (accelerate) moves it.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    path = resolve_backbone(backbone)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise OSError(f"cannot load backbone {backbone!r} ({path}): {e}") from e
    tokenizer = load_tokenizer(path)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)  # the new head's initialisation, without touching the caller's RNG
        if is_classifier:
            seqcls = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
            model = RewardModel.from_sequence_classifier(seqcls, tokenizer, max_length, backbone)
        else:
            body = AutoModel.from_pretrained(path, dtype=dtype)
            hidden = body.config.get_text_config().hidden_size
            head = nn.Linear(hidden, 1, bias=False, dtype=dtype)
            nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
            model = RewardModel(body, head, tokenizer, max_length, backbone)
    body = model.backbone
    body.config.pad_token_id = tokenizer.pad_token_id
    if lora_r > 0:
        if unfrozen_layers >= 0:
            raise ValueError("choose LoRA (lora_r > 0) or unfrozen_layers >= 0, not both")
        model.backbone = add_lora(body, lora_r, lora_alpha)
    else:
        train_top_layers(body, unfrozen_layers, final_norm=True)
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


# --------------------------------------------------------------------------------------------
# saving and loading


def reward_model_dir(run_dir: str | os.PathLike | None) -> Path:
    """Where notebook 03 saves its reward model in a run, and where notebook 04 finds it."""
    from starling_lib.runs import stage_dir
    return stage_dir(run_dir, STAGE) / "reward_model"


def _plain_backbone(model: RewardModel) -> nn.Module:
    body = model.backbone
    if hasattr(body, "merge_and_unload"):  # peft: merge a copy, the live model keeps its adapters
        body = copy.deepcopy(body).merge_and_unload()
    return body


def save_reward_model(model: RewardModel, path: str | os.PathLike, state_dict: dict | None = None,
                      extra: dict | None = None) -> Path:
    """Write the reward model folder (see the module docstring) and return its path.

    state_dict: the full `RewardModel` state dict when the live one is sharded (FSDP, ZeRO-3:
        pass `accelerator.get_state_dict(model)`); keys `backbone.*` and `head.weight`.
    extra: more JSON-able facts for `reward_model.json` (e.g. the training settings).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        body = _plain_backbone(model)
        body_state, head_weight = None, model.head.weight
    else:
        if hasattr(model.backbone, "merge_and_unload"):
            raise NotImplementedError("saving a LoRA model from a gathered state dict; save the unwrapped model")
        body = model.backbone
        body_state = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        head_weight = state_dict["head.weight"]
    body.save_pretrained(path, state_dict=body_state, safe_serialization=True)
    save_file({"weight": head_weight.detach().contiguous().cpu()}, str(path / HEAD_FILE))
    model.tokenizer.save_pretrained(path)
    info = {"format": REWARD_MODEL_FORMAT, "backbone": model.backbone_name, "max_length": model.max_length,
            "head": "linear on the last non-pad token", "chat_format": "openchat_3.5",
            "truncation": "prompt from the left, then the answer from the left", **(extra or {})}
    (path / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def load_reward_model(path: str | os.PathLike, device: torch.device | str | None = None,
                      dtype: torch.dtype | str | None = None) -> RewardModel:
    """Load a folder written by `save_reward_model`, in eval mode, on `device` (default: the best).

    dtype None: bf16 on a CUDA device that has it (a 7B reward model in 14 GB), else float32.
    """
    from safetensors.torch import load_file
    from transformers import AutoModel

    from starling_lib.models import default_device

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        hint = "" if path.exists() else " (the folder does not exist: has notebook 03 run in this run_dir?)"
        raise FileNotFoundError(f"{path} is not a saved reward model: no {CONFIG_FILE}{hint}")
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("format") != REWARD_MODEL_FORMAT:
        raise ValueError(f"{path}: reward model format {info.get('format')}, this code reads {REWARD_MODEL_FORMAT}")
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    with quiet_transformers():
        # device_map puts the weights straight on the device, not through CPU memory first
        body = AutoModel.from_pretrained(path, dtype=dtype, device_map=device)
    head_weight = load_file(str(path / HEAD_FILE))["weight"]
    head = nn.Linear(head_weight.shape[1], 1, bias=False, dtype=dtype)
    head.weight.data.copy_(head_weight)
    tokenizer = load_tokenizer(str(path))
    model = RewardModel(body, head.to(device), tokenizer, info["max_length"], info.get("backbone", ""))
    return model.eval()
