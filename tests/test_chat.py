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

    monkeypatch.setattr(model, "forward", eager_to_stop)   # model.generate calls forward; the fast engine does not
    assert chat.chat(model, tok, "Hi", config=chat.DecodingConfig(max_new_tokens=20, engine="hf")) == ""
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


CONVS = [[{"role": "user", "content": "Hi"}],
         [{"role": "user", "content": "Write a long poem about the sea and the sky, please."}],
         [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
          {"role": "user", "content": "How are you today?"}]]


def test_the_fast_engine_gives_generates_greedy_replies(tiny):
    model, tok = tiny
    prompts = [chat.render(tok, c) for c in CONVS]
    replies = {engine: chat.generate(model, tok, prompts, chat.DecodingConfig(max_new_tokens=16, engine=engine))
               for engine in ("fast", "hf")}
    assert replies["fast"] == replies["hf"] and all(replies["fast"])


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_a_batch_mixes_temperatures_each_row_as_if_alone(tiny, engine):
    """MT-Bench answers every category in one batch: a row at temperature 0 is the greedy reply, a
    sampled row is seeded. The fast engine draws a sampled row's random numbers as in an all-sampled
    batch of the same shape; model.generate runs once per temperature."""
    model, tok = tiny
    prompts = [chat.render(tok, c) for c in CONVS]
    cfg = chat.DecodingConfig(max_new_tokens=12, batch_size=3, seed=3, engine=engine)
    greedy = chat.generate(model, tok, prompts, cfg)
    mixed = chat.generate(model, tok, prompts, cfg, temperatures=[0.0, 1.0, 0.0])
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2] and mixed[1] != greedy[1]
    if engine == "fast":
        sampled = chat.generate(model, tok, prompts, cfg, temperatures=[1.0, 1.0, 1.0])
        assert mixed[1] == sampled[1]
    assert chat.generate(model, tok, prompts, cfg, temperatures=[0.0, 1.0, 0.0]) == mixed   # seeded
    with pytest.raises(ValueError, match="one >= 0 per prompt"):
        chat.generate(model, tok, prompts, cfg, temperatures=[0.0, 1.0])


def test_decoding_settings_are_checked():
    with pytest.raises(ValueError, match="engine must be one of auto, fast, hf, vllm, vllm-server"):
        chat.DecodingConfig(engine="sglang")
    with pytest.raises(ValueError, match="temperature >= 0"):
        chat.DecodingConfig(temperature=-1.0)
