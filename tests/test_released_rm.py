"""The released Starling reward models through `rm_io.load_reward_model` (starling_lib/released_rm.py),
on tiny stand-ins in their repositories' layouts (tests/released_rm_fakes.py), by hub id from a local
Hugging Face cache (offline) and from local folders.

Each is checked against the model card's own class over the same files, fed the card's text the
card's way (`tokenizer(text)`, padded to 2048, the reward at c_ind - 1): same rewards, same token ids.
"""

import json

import pytest
import torch
from hub_caches import hf_cache  # noqa: F401  (a fixture)
from hub_caches import put_hf
from released_rm_fakes import (CardGPTRewardModel, card_llama_rm_class, card_rewards, card_text_7b, card_text_34b, files,
                               llama2_base, rm_7b_alpha, rm_34b, yi_base)

from starling_lib.models import STARLING_RM_7B_TEMPLATE, apply_chat_format
from starling_lib.released_rm import STARLING_RM_7B, ReleasedLayout, ReleasedLayoutError, released_layout
from starling_lib.rm_io import load_reward_model
from starling_lib.rm_layout import chat_texts, encode_chats

PROMPTS = ["Hello?", "What is the capital of France?", "Name a prime number."]
ANSWERS = ["Hi, how can I help you?", "Paris.", "Seven, which has no divisors but 1 and itself."]


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    base = llama2_base(root / "llama2")
    yi = yi_base(root / "yi")
    return {"base": base, "rm7": rm_7b_alpha(root / "rm7", base),
            "rm7_transformer": rm_7b_alpha(root / "rm7t", base, "transformer"),
            "rm7_top": rm_7b_alpha(root / "rm7top", base, "top"), "yi": yi, "rm34": rm_34b(root / "rm34", yi)}


def _card_7b(fakes, rm_folder):
    ref = CardGPTRewardModel(str(fakes["base"]))
    ref.load_state_dict(torch.load(rm_folder / "pytorch_model.bin", weights_only=True), strict=False)
    return ref.eval()


def test_starling_rm_7b_alpha_by_hub_id_scores_as_its_card(fakes, hf_cache):
    put_hf(hf_cache, "meta-llama/Llama-2-7b-chat-hf", files(fakes["base"]), "model")
    commit = put_hf(hf_cache, "berkeley-nest/Starling-RM-7B-alpha", files(fakes["rm7"]), "model")
    rm = load_reward_model(f"berkeley-nest/Starling-RM-7B-alpha@{commit}", device="cpu")
    assert not rm.training and rm.chat_format == "starling_rm_7b" and rm.max_length == 2048
    assert rm.backbone_name == f"berkeley-nest/Starling-RM-7B-alpha@{commit}"
    assert rm.tokenizer.pad_token == "<unk>" and rm.tokenizer.pad_token_id == 0
    card = [card_text_7b(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    ref = _card_7b(fakes, fakes["rm7"])
    torch.testing.assert_close(rm.score(PROMPTS, ANSWERS), card_rewards(ref, ref.tokenizer, card), atol=1e-5, rtol=1e-4)
    # The text: the card's, after the BOS Llama-2's tokenizer puts in front; the ids: the card's call's.
    texts = [chat_texts(rm.tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS)]
    assert [p + a for p, a in texts] == ["<s>" + c for c in card]
    assert texts[0] == ("<s><s>[INST] Hello? </s> [/INST]", " Hi, how can I help you?</s>")
    ids = encode_chats(rm.tokenizer, [p for p, _ in texts], [a for _, a in texts], rm.max_length)
    assert ids == ref.tokenizer(card)["input_ids"] and ids[0][:2] == [1, 1]
    assert ids[0][-1] == rm.tokenizer.convert_tokens_to_ids("</s>")   # the reward is read on the answer's </s>


def test_the_card_class_whole_or_only_its_transformer(fakes):
    # Only transformer.* and v_head.weight (the file as the card's strict=False load needs it), from folders.
    rm = load_reward_model(fakes["rm7_transformer"], device="cpu", base=str(fakes["base"]))
    ref = _card_7b(fakes, fakes["rm7_transformer"])
    card = [card_text_7b(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    torch.testing.assert_close(rm.score(PROMPTS, ANSWERS), card_rewards(ref, ref.tokenizer, card), atol=1e-5, rtol=1e-4)
    whole = load_reward_model(fakes["rm7"], device="cpu", base=str(fakes["base"]))
    torch.testing.assert_close(whole.score(PROMPTS, ANSWERS), rm.score(PROMPTS, ANSWERS))   # same weights either way


def test_a_partial_state_dict_keeps_the_base_weights_as_the_card_strict_false(fakes):
    with pytest.warns(UserWarning, match=r"body tensor\(s\) not in the file keep the base's values"):
        rm = load_reward_model(fakes["rm7_top"], device="cpu", base=str(fakes["base"]))
    ref = _card_7b(fakes, fakes["rm7_top"])
    card = [card_text_7b(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    torch.testing.assert_close(rm.score(PROMPTS, ANSWERS), card_rewards(ref, ref.tokenizer, card), atol=1e-5, rtol=1e-4)


def test_starling_rm_34b_by_hub_id_scores_as_its_card(fakes, hf_cache):
    put_hf(hf_cache, "01-ai/Yi-34B-Chat", files(fakes["yi"]), "model")
    put_hf(hf_cache, "Nexusflow/Starling-RM-34B", files(fakes["rm34"]), "model")
    assert released_layout(fakes["rm34"])[0].name == "starling-rm-34b"
    rm = load_reward_model("Nexusflow/Starling-RM-34B", device="cpu")
    assert rm.chat_format == "starling_rm_34b" and rm.tokenizer.pad_token_id == 0
    ref = card_llama_rm_class().from_pretrained(fakes["rm34"]).eval()
    card = [card_text_34b(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    torch.testing.assert_close(rm.score(PROMPTS, ANSWERS), card_rewards(ref, rm.tokenizer, card), atol=1e-5, rtol=1e-4)
    texts = [chat_texts(rm.tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS)]
    assert [p + a for p, a in texts] == card   # Yi's tokenizer adds nothing by itself
    assert texts[0] == ("<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n", "Hi, how can I help you?<|im_end|>")
    ids = encode_chats(rm.tokenizer, [p for p, _ in texts], [a for _, a in texts], rm.max_length)
    assert ids == rm.tokenizer(card)["input_ids"] and ids[0][-1] == rm.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_multi_turn_chats(fakes):
    rm7 = load_reward_model(fakes["rm7"], device="cpu", base=str(fakes["base"]))
    rm34 = load_reward_model(fakes["rm34"], device="cpu", base=str(fakes["yi"]))
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}]
    assert "".join(chat_texts(rm7.tokenizer, chat, "4")) == \
        "<s><s>[INST] Hi </s> [/INST] Hello!</s><s>[INST] 2+2? </s> [/INST] 4</s>"
    assert "".join(chat_texts(rm34.tokenizer, chat, "4")) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>")
    with pytest.raises(Exception, match="user and assistant turns only, not system"):
        chat_texts(rm7.tokenizer, [{"role": "system", "content": "Be brief."}] + chat, "4")
    # A saved copy keeps its format: the template is set again, with the tokenizer's own BOS in front.
    assert apply_chat_format(rm7.tokenizer, "starling_rm_7b").chat_template.endswith(STARLING_RM_7B_TEMPLATE)


def test_a_pickled_object_in_a_bin_is_refused_not_run(fakes, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))   # unpickling would create the file

    folder = tmp_path / "rm"
    folder.mkdir()
    state = torch.load(fakes["rm7"] / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ReleasedLayoutError, match=r"refused: the file holds pickled Python objects.*weights_only=True"):
        load_reward_model(folder, device="cpu", base=str(fakes["base"]))
    assert not marker.exists()


def test_unknown_layouts_say_what_was_found_and_what_is_supported(fakes, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hi")
    with pytest.raises(ReleasedLayoutError, match=r"not a saved reward model \(no reward_model.json\) nor a released one.*"
                                                  r"no reward model weights found \(files: \['README.md'\]\).*supported:.*"
                                                  r"Starling-RM-7B-alpha's layout.*Starling-RM-34B's layout"):
        load_reward_model(tmp_path / "notes", device="cpu")
    # a plain causal LM: safetensors and a config, but no v_head
    with pytest.raises(ReleasedLayoutError, match=r"no v_head.weight \(the reward head\).*e.g. \['lm_head.weight'"):
        load_reward_model(fakes["base"], device="cpu", base=str(fakes["yi"]))
    # a torch file of something else
    (tmp_path / "other").mkdir()
    torch.save({"module": {"w": torch.zeros(2)}}, tmp_path / "other" / "model.pt")
    with pytest.raises(ReleasedLayoutError, match=r"not a state dict of tensors \(found \['module'\]\)"):
        load_reward_model(tmp_path / "other", device="cpu", base=str(fakes["base"]))
    torch.save({"w": torch.zeros(2), "v_head.weight": torch.zeros(1, 4)}, tmp_path / "other" / "model.pt")
    with pytest.raises(ReleasedLayoutError, match=r"no body tensors under transformer. or model.model."):
        load_reward_model(tmp_path / "other", device="cpu", base=str(fakes["base"]))
    # the wrong base: its config does not fit the body
    with pytest.raises(ReleasedLayoutError, match=r"the body does not fit the config of .*yi \(shapes: \['embed_tokens"):
        load_reward_model(fakes["rm7"], device="cpu", base=str(fakes["yi"]))   # two more tokens in its vocabulary
    wide = tmp_path / "wide"
    wide.mkdir()
    for name, path in files(fakes["base"]).items():
        (wide / name).write_bytes(path.read_bytes())
    config = json.loads((fakes["base"] / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ReleasedLayoutError, match=r"the body does not fit the config of .*wide \(shapes: .*is the base"):
        load_reward_model(fakes["rm7"], device="cpu", base=str(wide))
    # a missing path is neither a folder nor a hub id
    with pytest.raises(FileNotFoundError, match="not a saved reward model.*does not exist"):
        load_reward_model(tmp_path / "nothing")


def test_layouts_are_validated():
    with pytest.raises(ValueError, match="chat_format must be one of"):
        ReleasedLayout("x", "a/b", "torch_file", "c/d", True, True, "llama3", "unk")
    with pytest.raises(ValueError, match="weights must be"):
        ReleasedLayout("x", "a/b", "gguf", "c/d", True, True, "starling_rm_7b", "unk")
    with pytest.raises(ValueError, match="base_fills_missing needs config_from_base"):
        ReleasedLayout("x", "a/b", "safetensors", "c/d", False, True, "starling_rm_34b", "id0")
    assert STARLING_RM_7B.base == "meta-llama/Llama-2-7b-chat-hf"


def test_a_released_model_saved_and_loaded_again(fakes, tmp_path):
    from starling_lib.rm_io import save_reward_model

    rm = load_reward_model(fakes["rm34"], device="cpu", base=str(fakes["yi"]))
    path = save_reward_model(rm, tmp_path / "saved")
    again = load_reward_model(path, device="cpu")
    assert again.chat_format == "starling_rm_34b"
    torch.testing.assert_close(again.score(PROMPTS, ANSWERS), rm.score(PROMPTS, ANSWERS))
    with pytest.raises(ValueError, match="base= is for released reward models"):
        load_reward_model(path, device="cpu", base=str(fakes["yi"]))


def test_a_tokenizer_that_appends_tokens_itself_is_refused_for_a_card_format():
    from released_rm_fakes import stand_in_tokenizer
    from tokenizers import processors

    tokenizer = stand_in_tokenizer(auto_bos=False, chatml=False)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 2)])
    with pytest.raises(NotImplementedError, match="adds tokens after the text by itself"):
        apply_chat_format(tokenizer, "starling_rm_34b")
