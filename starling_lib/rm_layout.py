"""What the reward model reads: chats as token ids, truncated, padded or packed into rows.

Pure functions over text and token ids, no model: `reward_model` scores what they lay out and
`rm_train` batches with them.

    prompt, answer = chat_texts(tokenizer, messages, "Paris.")    # the model's chat format, in two parts
    seqs = encode_chats(tokenizer, [prompt], [answer], max_length) # token ids, the answer's end kept
    input_ids, attention_mask = pad_right(seqs, pad_id)           # (N, T) each
    packed = pack_shared_prompts(seqs, prompt_lengths, pack_length, pad_id)   # each prompt once

The chat format is the tokenizer's chat template (models.CHAT_FORMATS): for the tiny model and
Openchat/Starling-LM OpenChat-3.5's, the one Starling-LM speaks,
    <s>GPT4 Correct User: {prompt}<|end_of_turn|>GPT4 Correct Assistant: {answer}<|end_of_turn|>
for SmolLM2 ChatML (`<|im_start|>assistant\n{answer}<|im_end|>`). Either way the last token is the
turn's end token, a fixed place to read the reward from, after the whole answer.

Truncation keeps the end: the head reads the last token, so a truncated sequence must still end
with the answer's end. Tokens are dropped from the LEFT of the prompt first (the oldest turns; the
BOS token stays), and only when the answer alone does not fit, from the left of the answer too,
while the prompt keeps at least a quarter of `max_length` so the model still sees what was asked.

Packing: the K answers of a ranking share their prompt, so `pack_shared_prompts` lays out the
prompt once followed by each answer, with an attention mask and position ids under which every
answer's reward is the one it gets encoded alone, and packs such segments tight into rows.

Departures from Starling-RM (efrick2002/Starling, reward-model-training/dataset.py): it formats
with Llama-2's `[INST]` chat template, its Llama-2-7b-chat body's own; we use the body's own
template too ("auto"), and the tiny body's is OpenChat-3.5's, so there the reward model reads
exactly what the policy of notebook 04 writes. It truncates the whole chat from the left (BOS
included); we keep BOS and a quarter of the budget for the prompt. It pads every (prompt + answer)
of a forward pass to the longest; packing (ours) encodes each prompt once and wastes less on
padding, with the same rewards up to float rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch



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


def chat_texts(tokenizer, messages: Sequence[dict] | str, answer: str) -> tuple[str, str]:
    """(prompt text, answer text) in the tokenizer's chat format; their concatenation is the whole
    conversation with `answer` as a finished assistant turn (OpenChat-3.5: " answer<|end_of_turn|>";
    ChatML: "answer<|im_end|>"), so the reward is read on the turn's end token.

    messages: the conversation so far (ending with a user turn), or a plain string as one user turn.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = list(messages)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not render a finished answer as the "
                         f"open assistant turn plus the answer, so prompt and answer cannot be told apart: "
                         f"{prompt[-60:]!r} vs {full[len(prompt) - 60:len(prompt)]!r}")
    return prompt, full[len(prompt):].rstrip("\n")


def encode_chats(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int,
                 return_prompt_lengths: bool = False) -> list[list[int]] | tuple[list[list[int]], list[int]]:
    """Token ids of each prompt text + answer text, truncated by `truncate_keep_end`.

    The full text is tokenized in one piece (tokenizing the parts separately can differ at the
    seam for SentencePiece tokenizers); the offsets tell which tokens belong to the prompt.
    return_prompt_lengths: also return how many tokens of each kept sequence are its prompt's
    (what `pack_shared_prompts` shares between the answers of one prompt).
    """
    texts = [p + a for p, a in zip(prompts, answers, strict=True)]
    # verbose=False: no "longer than model_max_length" warning, we truncate right below
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    out, prompt_lengths = [], []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
        num_prompt = sum(1 for start, _ in offsets if start < len(prompt))
        keep_first = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        kept, kept_prompt = truncate_split(ids, num_prompt, max_length, keep_first)
        out.append(kept)
        prompt_lengths.append(kept_prompt)
    return (out, prompt_lengths) if return_prompt_lengths else out


# --------------------------------------------------------------------------------------------
# token ids -> batches: padded, or packed with each prompt once


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
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)          # (R, L)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)              # (R, L)
    seg_id = torch.full((len(rows), width), -1, dtype=torch.long)                 # (R, L)
    ans_id = torch.zeros((len(rows), width), dtype=torch.long)                    # (R, L)
    read = torch.zeros((len(seqs), 2), dtype=torch.long)                          # (N, 2)
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
