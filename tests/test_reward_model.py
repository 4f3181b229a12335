"""starling_lib.reward_model, rm_layout and rm_io: truncation, packing, the last-token head, freezing,
LoRA, save/load."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from starling_lib.data import END_OF_TURN, format_chat
from starling_lib.models import quiet_transformers
from starling_lib.reward_model import RewardModel, build_reward_model, resolve_backbone
from starling_lib.rm_io import CONFIG_FILE, load_reward_model, reward_model_dir, save_reward_model
from starling_lib.rm_layout import chat_texts, encode_chats, pack_shared_prompts, pad_right, truncate_keep_end

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny_rm():
    return build_reward_model("tiny", max_length=64)


# ---------------------------------------------------------------------------------------------
# text -> ids


def test_truncate_keeps_everything_that_fits():
    assert truncate_keep_end([1, 2, 3], num_prompt=2, max_length=3, keep_first=1) == [1, 2, 3]


def test_truncate_cuts_the_prompt_from_the_left_and_keeps_bos():
    # BOS=0, prompt 11..16, answer 21, 22; budget 6 - 1 = 5 -> answer 2, prompt's last 3
    ids = [0, 11, 12, 13, 14, 15, 16, 21, 22]
    assert truncate_keep_end(ids, num_prompt=7, max_length=6, keep_first=1) == [0, 14, 15, 16, 21, 22]


def test_truncate_cuts_a_long_answer_from_the_left_but_keeps_a_quarter_for_the_prompt():
    # BOS, prompt 11..13, answer 21..30; budget 8: the prompt keeps 8 // 4 = 2, the answer its last 6
    ids = [0, 11, 12, 13] + list(range(21, 31))
    assert truncate_keep_end(ids, num_prompt=4, max_length=9, keep_first=1) == [0, 12, 13, 25, 26, 27, 28, 29, 30]


def test_truncate_refuses_a_length_with_no_room():
    with pytest.raises(ValueError, match="no room"):
        truncate_keep_end([0, 1, 2], num_prompt=2, max_length=1, keep_first=1)


def test_chat_texts_concatenate_to_the_full_openchat_conversation(tiny_rm):
    _, tok = tiny_rm   # the tiny tokenizer's template is OpenChat-3.5's
    prompt, answer = chat_texts(tok, MESSAGES, "Paris.")
    assert prompt + answer == format_chat(MESSAGES + [{"role": "assistant", "content": "Paris."}],
                                          add_generation_prompt=False)
    assert prompt.endswith("GPT4 Correct Assistant:") and answer == f" Paris.{END_OF_TURN}"
    assert chat_texts(tok, "What is the capital of France?", "Paris.") == (prompt, answer)  # a string is one user turn


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_texts_follow_the_tokenizer_template_and_end_on_its_end_token(tiny_rm):
    _, tok = tiny_rm
    chatml = copy.deepcopy(tok)
    chatml.chat_template = CHATML
    prompt, answer = chat_texts(chatml, MESSAGES, "Paris.")
    assert prompt.endswith("<|im_start|>assistant\n") and answer == "Paris.<|im_end|>"   # no trailing newline
    odd = copy.deepcopy(tok)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(ValueError, match="cannot be told apart"):
        chat_texts(odd, MESSAGES, "Paris.")


def test_the_chat_format_is_saved_and_used_again_on_load(tmp_path):
    from starling_lib.data import OPENCHAT_TEMPLATE
    rm, tok = build_reward_model("tiny", max_length=64)
    tok.chat_template = CHATML                          # as a ChatML body's own template would be
    path = save_reward_model(rm, tmp_path / "chatml")
    assert json.loads((path / "reward_model.json").read_text())["chat_format"] == "auto"
    again = load_reward_model(path, device="cpu")
    assert again.tokenizer.chat_template == CHATML
    assert torch.allclose(again.score([MESSAGES], ["Paris."]), rm.score([MESSAGES], ["Paris."]), atol=1e-5)
    forced, _ = build_reward_model("tiny", max_length=64, chat_format="openchat_3.5")
    info = json.loads((save_reward_model(forced, tmp_path / "openchat") / "reward_model.json").read_text())
    assert info["chat_format"] == "openchat_3.5"
    old = tmp_path / "openchat"
    (old / "reward_model.json").write_text(json.dumps({k: v for k, v in info.items() if k != "chat_format"}))
    assert load_reward_model(old, device="cpu").tokenizer.chat_template == OPENCHAT_TEMPLATE   # older folders


def test_encode_chats_tokenizes_whole_and_truncates_keeping_the_answer_end(tiny_rm):
    _, tok = tiny_rm
    long_prompt = [{"role": "user", "content": "tell me a story " * 40}]
    texts = [chat_texts(tok, MESSAGES, "Paris."), chat_texts(tok, long_prompt, "Once upon a time.")]
    short, cut = encode_chats(tok, [t[0] for t in texts], [t[1] for t in texts], max_length=32)
    whole = encode_chats(tok, [texts[0][0]], [texts[0][1]], max_length=1000)[0]
    assert tok.decode(whole) == "".join(texts[0])                       # fits: unchanged, one BOS
    assert len(whole) > 32 and short == whole[:1] + whole[len(whole) - 31:]  # prompt cut after BOS
    assert len(cut) == 32 and cut[0] == tok.bos_token_id
    assert tok.decode(cut).endswith(f"GPT4 Correct Assistant: Once upon a time.{END_OF_TURN}")
    assert "tell me a story" in tok.decode(cut)                         # the prompt's end survives


def test_pad_right():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------
# the model


class EchoBody(nn.Module):
    """Hidden state = the token id, so the reward shows which position the head read."""

    def forward(self, input_ids, attention_mask, use_cache=False):
        return SimpleNamespace(last_hidden_state=input_ids.float().unsqueeze(-1))


def test_head_reads_the_last_non_pad_token_for_right_and_left_padding():
    head = nn.Linear(1, 1, bias=False)
    head.weight.data.fill_(1.0)
    rm = RewardModel(EchoBody(), head, tokenizer=None, max_length=8)
    right = rm(torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    left = rm(torch.tensor([[0, 5, 6, 7], [0, 0, 8, 9]]), torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]))
    assert right.tolist() == [7.0, 9.0] and left.tolist() == [7.0, 9.0]


def test_rewards_do_not_depend_on_batch_padding(tiny_rm):
    rm, _ = tiny_rm
    answers = ["Paris.", "The capital of France is Paris, a city on the Seine with many museums."]
    together = rm.score([MESSAGES] * 2, answers, batch_size=2)
    alone = torch.cat([rm.score([MESSAGES], [a], batch_size=1) for a in answers])
    assert torch.allclose(together, alone, atol=1e-5)
    assert together[0] != together[1]


def test_tiny_backbone_drops_the_lm_head_and_adds_a_scalar_head(tiny_rm):
    rm, tok = tiny_rm
    assert type(rm.backbone).__name__ == "MistralModel"           # the body only
    assert rm.head.weight.shape == (1, rm.backbone.config.hidden_size)
    assert rm.backbone.config.pad_token_id == tok.pad_token_id
    assert all(p.requires_grad for p in rm.parameters())          # full fine-tuning by default


def test_unfrozen_layers_trains_only_the_top_blocks_the_final_norm_and_the_head():
    rm, _ = build_reward_model("tiny", unfrozen_layers=1)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "backbone.norm.weight" in trainable
    assert any(n.startswith("backbone.layers.3.") for n in trainable)
    assert not any(n.startswith(("backbone.layers.0.", "backbone.layers.2.", "backbone.embed")) for n in trainable)
    head_only, _ = build_reward_model("tiny", unfrozen_layers=0)
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {"head.weight"}
    with pytest.raises(ValueError, match="top 5 layers: the model has 4"):
        build_reward_model("tiny", unfrozen_layers=5)


def test_lora_trains_adapters_and_head_and_saves_a_merged_plain_model(tmp_path):
    rm, _ = build_reward_model("tiny", lora_r=4, max_length=64)
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert "head.weight" in trainable and all("lora_" in n for n in trainable if n != "head.weight")
    with torch.no_grad():  # make the adapters non-zero so merging matters
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    before = rm.score([MESSAGES], ["Paris."])
    loaded = load_reward_model(save_reward_model(rm, tmp_path / "rm"), device="cpu")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(loaded.score([MESSAGES], ["Paris."]), before, atol=1e-5)
    assert torch.allclose(rm.score([MESSAGES], ["Paris."]), before)  # the live model kept its adapters


def test_a_sequence_classifier_is_adopted_with_its_score_head(tiny_rm):
    from transformers import AutoModelForSequenceClassification

    from starling_lib.models import tiny_model_path

    _, tok = tiny_rm
    with quiet_transformers():
        seqcls = AutoModelForSequenceClassification.from_pretrained(tiny_model_path(), num_labels=1)
    seqcls.config.pad_token_id = tok.pad_token_id
    rm = RewardModel.from_sequence_classifier(seqcls, tok, max_length=64)
    assert rm.head is seqcls.score
    ids, mask = pad_right([[1, 50, 60, 70], [1, 80]], tok.pad_token_id)
    assert torch.allclose(rm(ids, mask), seqcls(input_ids=ids, attention_mask=mask).logits.squeeze(-1), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# saving, loading, errors


def test_save_and_load_round_trip(tiny_rm, tmp_path):
    rm, tok = tiny_rm
    path = save_reward_model(rm, tmp_path / "rm", extra={"note": "test"})
    info = json.loads((path / CONFIG_FILE).read_text())
    assert info["backbone"] == "tiny" and info["max_length"] == 64 and info["note"] == "test"
    assert {"model.safetensors", "reward_head.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    loaded = load_reward_model(path, device="cpu")
    assert not loaded.training and loaded.max_length == 64
    answers = ["Paris.", "London."]
    assert torch.allclose(loaded.score([MESSAGES] * 2, answers), rm.score([MESSAGES] * 2, answers), atol=1e-6)
    texts = ["".join(chat_texts(tok, MESSAGES, a)) for a in answers]
    assert torch.allclose(loaded.score_texts(texts), rm.score([MESSAGES] * 2, answers), atol=1e-6)


def test_reward_model_dir_is_the_notebook_03_stage(tmp_path):
    assert reward_model_dir(tmp_path) == tmp_path / "03_kwise_reward_training" / "reward_model"


def test_clear_errors_for_missing_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved reward model.*does not exist"):
        load_reward_model(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_backbone(str(tmp_path / "no_backbone"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_backbone(str(tmp_path / "empty"))
    assert resolve_backbone("meta-llama/Llama-2-7b-chat-hf") == "meta-llama/Llama-2-7b-chat-hf"  # a hub id


# ---------------------------------------------------------------------------------------------
# packing: each prompt once for its answers, rows packed tight


def test_pack_shared_prompts_by_hand():
    # two answers of prompt [1, 2, 3], one of prompt [5, 6]
    seqs, prompt_lengths = [[1, 2, 3, 10, 11], [1, 2, 3, 20], [5, 6, 30, 31]], [3, 3, 2]
    pk = pack_shared_prompts(seqs, prompt_lengths, pack_length=9, pad_id=0)
    # segment [1 2 3 | 10 11 | 20] (6 tokens) fills row 0; [5 6 | 30 31] does not fit beside it
    assert pk["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20], [5, 6, 30, 31, 0, 0]]
    assert pk["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    assert pk["read"].tolist() == [[0, 4], [0, 5], [1, 3]]
    m = pk["attention_mask"][:, 0].int()
    assert m[0, 5].tolist() == [1, 1, 1, 0, 0, 1]      # answer "20" sees its prompt and itself, not "10 11"
    assert m[0, 4].tolist() == [1, 1, 1, 1, 1, 0]      # "11" sees the prompt and "10"
    assert m[1, 4].tolist() == [0, 0, 0, 0, 1, 0]      # a pad token sees only itself
    # a segment longer than a row is split, the prompt repeated
    pk = pack_shared_prompts(seqs[:2], prompt_lengths[:2], pack_length=5, pad_id=0)
    assert sorted(pk["input_ids"].tolist()) == [[1, 2, 3, 10, 11], [1, 2, 3, 20, 0]]
    with pytest.raises(ValueError, match="pack_length=4 is shorter"):
        pack_shared_prompts(seqs, prompt_lengths, pack_length=4, pad_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rewards_equal_padded_rewards(attn):
    model, tok = build_reward_model("tiny", max_length=48)
    model.backbone.config._attn_implementation = attn
    prompts = [MESSAGES, [{"role": "user", "content": "Write a long story about a dragon " * 8}]]
    answers = [["Paris.", "It is Paris, the largest city of France.", "Lyon."],
               ["Once upon a time " * 10, "No.", "A dragon lived in a cave and slept."]]
    texts = [chat_texts(tok, p, a) for p, row in zip(prompts, answers) for a in row]
    seqs, prompt_lengths = encode_chats(tok, [t[0] for t in texts], [t[1] for t in texts], 48, return_prompt_lengths=True)
    assert len(set(prompt_lengths[3:])) > 1            # the long prompt is cut differently per answer
    with torch.no_grad():
        padded = model(*pad_right(seqs, tok.pad_token_id))
        pk = pack_shared_prompts(seqs, prompt_lengths, 96, tok.pad_token_id)
        packed = model(pk["input_ids"], pk["attention_mask"], pk["position_ids"], pk["read"])
    assert torch.allclose(packed, padded, atol=1e-5)


def test_score_encodes_a_repeated_prompt_once_with_the_padded_rewards():
    """A policy's rollouts and an evaluation's samples answer one prompt several times: score()
    packs them (each prompt once per batch) and returns, in input order, the padded layout's rewards."""
    model, tok = build_reward_model("tiny", max_length=48)
    story = [{"role": "user", "content": "Write a long story about a dragon " * 8}]
    prompts = [MESSAGES, story, MESSAGES, story, MESSAGES, "a plain prompt"]
    answers = ["Paris.", "Once upon a time " * 10, "It is Paris.", "No.", "Lyon.", "Yes."]
    texts = [chat_texts(tok, p, a) for p, a in zip(prompts, answers)]
    seqs = encode_chats(tok, [t[0] for t in texts], [t[1] for t in texts], 48)
    tokens_in = []
    hook = model.backbone.register_forward_pre_hook(lambda m, args, kw: tokens_in.append(kw["input_ids"].numel()),
                                                    with_kwargs=True)
    packed = model.score(prompts, answers, batch_size=4)
    hook.remove()
    assert torch.allclose(packed, model.score_ids(seqs, batch_size=1), atol=1e-5)
    assert sum(tokens_in) < sum(len(s) for s in seqs)   # fewer tokens than the sequences hold


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the top block's input needs no grad: expected
def test_gradient_checkpointing_does_not_backprop_through_frozen_layers():
    model, tok = build_reward_model("tiny", max_length=32, unfrozen_layers=1, gradient_checkpointing=True)
    blocks = model.backbone.layers
    reached = []
    for i, block in enumerate(blocks):
        block.register_full_backward_pre_hook(lambda m, g, i=i: reached.append(i))
    ids, mask = pad_right(encode_chats(tok, *zip(chat_texts(tok, MESSAGES, "Paris.")), 32), tok.pad_token_id)
    model.train()
    model(ids, mask).sum().backward()
    assert set(reached) == {len(blocks) - 1}
    assert blocks[-1].mlp.down_proj.weight.grad is not None


FSDP2_PACKED_SCRIPT = """
import copy, warnings, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from starling_lib.models import decoder_layers
from starling_lib.reward_model import build_reward_model
from starling_lib.rm_layout import chat_texts, encode_chats, pack_shared_prompts
dist.init_process_group("gloo", rank=0, world_size=1)
rm, tok = build_reward_model("tiny", max_length=64)
texts = [chat_texts(tok, p, a) for p, answers in [("Say hi", ["hi", "hello there", "no"]),
                                             ("Count to three", ["1 2 3", "one two three four"])] for a in answers]
seqs, prompt_lengths = encode_chats(tok, [t[0] for t in texts], [t[1] for t in texts], 64, return_prompt_lengths=True)
b = pack_shared_prompts(seqs, prompt_lengths, 64, tok.pad_token_id)
assert b["input_ids"].shape[0] < len(seqs)   # packed: fewer rows than sequences
args = (b["input_ids"], b["attention_mask"], b["position_ids"], b["read"])
ref = rm(*args)
ref.sum().backward()
sharded = copy.deepcopy(rm)
sharded.zero_grad(set_to_none=True)
for block in decoder_layers(sharded.backbone):   # as accelerate's TRANSFORMER_BASED_WRAP shards it
    fully_shard(block)
fully_shard(sharded)
with warnings.catch_warnings():
    warnings.simplefilter("error")   # e.g. FSDP2's warning about a returned view
    out = sharded(*args)
out.sum().backward()
assert torch.allclose(out, ref, atol=1e-5), (out, ref)
g, g_ref = sharded.head.weight.grad.full_tensor(), rm.head.weight.grad
assert torch.allclose(g, g_ref, atol=1e-5), (g, g_ref)
print("OK")
dist.destroy_process_group()
"""


def test_packed_layout_under_fsdp2_matches_the_unsharded_model(run_distributed_script):
    """FSDP (configs/accelerate/fsdp.yaml) shards each block: the 4-D packed mask and position ids
    must pass through its hooks. One gloo process, so sharded and unsharded compute the same."""
    out = run_distributed_script(FSDP2_PACKED_SCRIPT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
