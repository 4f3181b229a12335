"""starling_lib.chat: the model card's prompt strings, batched generation, stopping, scoring."""

import pytest
import torch

from starling_lib import chat
from starling_lib.data import END_OF_TURN

# The Starling-LM-7B-alpha model card's three examples, plus the <s> its tokenizer adds.
SINGLE_TURN = "<s>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"
MULTI_TURN = ("<s>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant: Hi<|end_of_turn|>"
              "GPT4 Correct User: How are you today?<|end_of_turn|>GPT4 Correct Assistant:")
CODE_MODE = "<s>Code User: Implement quicksort using C++<|end_of_turn|>Code Assistant:"


def test_render_gives_the_model_card_strings(tiny):
    _, tok = tiny
    assert chat.render(tok, [{"role": "user", "content": "Hello"}]) == SINGLE_TURN
    assert chat.render(tok, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                             {"role": "user", "content": "How are you today?"}]) == MULTI_TURN
    assert chat.render(tok, [{"role": "user", "content": "Implement quicksort using C++"}], mode="code") == CODE_MODE
    with pytest.raises(ValueError, match="mode"):
        chat.render(tok, [{"role": "user", "content": "x"}], mode="chatml")


def test_model_card_examples_table(tiny):
    model, tok = tiny
    table = chat.model_card_examples(model, tok, chat.DecodingConfig(max_new_tokens=4))
    assert table["prompt"].tolist() == [SINGLE_TURN, MULTI_TURN, CODE_MODE]
    assert table["reply"].map(lambda r: isinstance(r, str)).all()


def test_rendered_prompt_tokenizes_with_one_bos(tiny):
    _, tok = tiny
    ids = chat._encode(tok, SINGLE_TURN)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.convert_tokens_to_ids(END_OF_TURN) in ids


def test_stop_tokens_include_end_of_turn(tiny):
    _, tok = tiny
    assert tok.convert_tokens_to_ids(END_OF_TURN) in chat.stop_token_ids(tok)


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Write a long poem about the sea and the sky, please."}],
             [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
              {"role": "user", "content": "How are you today?"}]]
    cfg = chat.DecodingConfig(max_new_tokens=10, batch_size=3)
    batched = chat.chat_batch(model, tok, convs, config=cfg)
    single = [chat.chat(model, tok, c, config=cfg) for c in convs]
    assert batched == single
    assert all(isinstance(r, str) and r for r in batched)
    assert chat.chat(model, tok, "Hi", config=cfg) == single[0]  # a string is one user message


def test_generation_stops_at_end_of_turn(tiny, monkeypatch):
    model, tok = tiny
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    forward, seen = model.forward, []

    def eager_to_stop(*args, **kwargs):  # the model's own logits, with <|end_of_turn|> made certain
        out = forward(*args, **kwargs)
        seen.append(1)
        out.logits[..., eot] += 1e4
        return out

    monkeypatch.setattr(model, "forward", eager_to_stop)
    assert chat.chat(model, tok, "Hi", config=chat.DecodingConfig(max_new_tokens=20)) == ""
    assert len(seen) == 1  # stopped after the first token, not at max_new_tokens


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = chat.chat(model, tok, "Hi", config=chat.DecodingConfig(max_new_tokens=12, temperature=1.0, seed=1))
    b = chat.chat(model, tok, "Hi", config=chat.DecodingConfig(max_new_tokens=12, temperature=1.0, seed=1))
    c = chat.chat(model, tok, "Hi", config=chat.DecodingConfig(max_new_tokens=12, temperature=1.0, seed=2))
    assert a == b != c


def test_continuation_logprobs_match_full_sequence_scoring(tiny):
    model, tok = tiny
    prefix = chat.render(tok, [{"role": "user", "content": "Rate this."}]) + " Rating: [["
    conts = [f"{r}]]" for r in range(1, 11)]
    fast = chat.continuation_logprobs(model, tok, prefix, conts)
    prefix_ids = chat._encode(tok, prefix)
    for j, c in enumerate(conts):
        ids = chat._continuation_ids(tok, prefix, prefix_ids, c)
        with torch.no_grad():
            logp = model(torch.tensor([prefix_ids + ids])).logits[0].log_softmax(-1)
        naive = sum(logp[len(prefix_ids) - 1 + t, ids[t]].item() for t in range(len(ids)))
        assert fast[j].item() == pytest.approx(naive, abs=1e-4)


def test_continuation_too_long_for_the_model_is_an_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="does not fit"):
        chat.continuation_logprobs(model, tok, "word " * 3000, ["1"])
