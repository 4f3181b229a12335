"""starling_lib.models: the offline tiny model, its tokenizer and chat format, the on-disk cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from starling_lib import models
from starling_lib.data import END_OF_TURN, OPENCHAT_TEMPLATE, bundled_path
from starling_lib.models import (
    TinyConfig,
    count_parameters,
    default_device,
    load_model_and_tokenizer,
    tiny_model_path,
)

SINGLE_TURN = "<s>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"
MULTI_TURN = ("<s>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant: Hi<|end_of_turn|>"
              "GPT4 Correct User: How are you today?<|end_of_turn|>GPT4 Correct Assistant:")
CODE_MODE = "<s>Code User: Implement quicksort using C++<|end_of_turn|>Code Assistant:"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private STARLING_CACHE for the module (before conftest's `tiny`, which is built into it once)."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("starling_cache")
        mp.setenv("STARLING_CACHE", str(root))
        yield root


@pytest.fixture
def own_cache(tmp_path, monkeypatch, cache):
    """A fresh, empty cache for one test (the module cache stays as it was)."""
    root = tmp_path / "own_cache"
    monkeypatch.setenv("STARLING_CACHE", str(root))
    return root


# ---------------------------------------------------------------------------------------------
# the model


def test_tiny_is_a_small_mistral_built_offline(tiny, cache):
    model, tokenizer = tiny
    cfg = TinyConfig()
    assert model.config.model_type == "mistral"
    assert model.config.num_hidden_layers == cfg.num_hidden_layers == len(model.model.layers)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert model.config.vocab_size == len(tokenizer) == cfg.vocab_size
    assert model.dtype == torch.float32 and model.device.type == "cpu"  # CPU default
    assert not model.training
    assert 1_000_000 < count_parameters(model) < 20_000_000
    # built into the private cache, under tiny/<key>
    assert (cache / "tiny" / cfg.cache_key() / "model.safetensors").is_file()


def test_forward_pass_logits_shape(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["Hello there, how are you?", "Hi"], return_tensors="pt", padding=True)
    B, T = batch["input_ids"].shape
    assert B == 2 and T > 2
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (B, T, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_generate_few_tokens(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                           add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt")
    n = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=5, do_sample=False,
                         eos_token_id=None)  # no early stop: exactly 5 new tokens
    assert out.shape == (1, n + 5)
    assert torch.equal(out[0, :n], batch["input_ids"][0])
    assert ((out >= 0) & (out < len(tokenizer))).all()


def test_generation_stops_at_end_of_turn(tiny):
    model, tokenizer = tiny
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    batch = tokenizer("Hello", return_tensors="pt")
    n = batch["input_ids"].shape[1]
    # Push <|end_of_turn|> to the top: generate must stop right after it, from the saved config alone.
    out = model.generate(**batch, max_new_tokens=10, do_sample=False, sequence_bias={(eot,): 100.0})
    assert out[0, n:].tolist() == [eot]


def test_batched_generation_with_left_padding(tiny):
    model, tokenizer = tiny
    assert tokenizer.padding_side == "right"  # left padding is the generating code's choice, not ours
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(["Hello there, how are you?", "Hi"], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    assert batch["input_ids"][1, 0] == tokenizer.pad_token_id
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


# ---------------------------------------------------------------------------------------------
# tokenizer and chat format


def test_chat_template_single_turn(tiny):
    _, tokenizer = tiny
    assert tokenizer.chat_template == OPENCHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == SINGLE_TURN


def test_chat_template_multi_turn(tiny):
    _, tokenizer = tiny
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "How are you today?"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == MULTI_TURN


def test_chat_template_code_mode(tiny):
    _, tokenizer = tiny
    messages = [{"role": "user", "content": "Implement quicksort using C++"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, mode="code")
    assert text == CODE_MODE


def test_end_of_turn_is_one_token_and_the_eos(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(END_OF_TURN, add_special_tokens=False)
    assert len(ids) == 1
    assert tokenizer.eos_token == END_OF_TURN and ids[0] == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    # inside running text too (it is matched before the byte-level split)
    assert tokenizer.encode(f"Hi{END_OF_TURN}there", add_special_tokens=False).count(ids[0]) == 1
    for special in ["<s>", "</s>", "<unk>", "<pad>"]:
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1, special
    assert tokenizer.bos_token == "<s>"


def test_pad_token_is_set_and_distinct_from_eos(tiny):
    model, tokenizer = tiny
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_bos_appears_exactly_once(tiny):
    _, tokenizer = tiny
    bos = tokenizer.bos_token_id
    # Plain text gets no automatic BOS ...
    assert bos not in tokenizer("Hello")["input_ids"]
    # ... so tokenizing the rendered template does not double the template's {{ bos_token }},
    rendered = tokenizer(SINGLE_TURN)["input_ids"]
    assert rendered[0] == bos and rendered.count(bos) == 1
    # and neither does tokenizing through the template.
    direct = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True,
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    assert direct == rendered


@pytest.mark.parametrize("text", [
    "Hello world",
    "  leading spaces, trailing  \n",
    "\n\nHuman: What is 2+2?\n\nAssistant: ",
    "Tabs\tand\r\nCRLF , spaces before punctuation . don 't",
    "ünïcødé: 日本語のテキスト, Ελληνικά, emoji 🎉🚀, math ∑∫√",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
])
def test_tokenizer_round_trips_text(tiny, text):
    _, tokenizer = tiny
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_nectar_prompts(tiny):
    _, tokenizer = tiny
    with open(bundled_path("nectar_sample.jsonl"), encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for _, line in zip(range(20), f)]
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert tokenizer.decode(ids) == prompt
        assert len(ids) < len(prompt) / 2  # the BPE learnt merges: well under one token per 2 chars


# ---------------------------------------------------------------------------------------------
# cache


def test_build_is_deterministic_across_fresh_caches(tiny, cache, own_cache):
    first = cache / "tiny" / TinyConfig().cache_key()
    second = tiny_model_path()
    assert second.parent.parent == own_cache and second.name == first.name
    # identical vocabulary and merges
    assert json.loads((first / "tokenizer.json").read_text()) == json.loads((second / "tokenizer.json").read_text())
    # identical weights
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_build_is_deterministic_across_processes(tiny, cache, tmp_path):
    # Another interpreter (other hash seeds, fresh RNG): what one machine caches, another rebuilds equal.
    other = tmp_path / "other_process_cache"
    env = {**os.environ, "STARLING_CACHE": str(other), "PYTHONHASHSEED": "12345"}
    code = "from starling_lib.models import tiny_model_path; print(tiny_model_path())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    second = other / "tiny" / TinyConfig().cache_key()
    assert out.stdout.strip().splitlines()[-1] == str(second)
    first = cache / "tiny" / TinyConfig().cache_key()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_seed_changes_weights_not_tokenizer(tiny, cache, own_cache):
    first = cache / "tiny" / TinyConfig().cache_key()
    other = tiny_model_path(seed=1, num_hidden_layers=1)  # one layer: quick to build
    assert other.name != first.name
    assert (first / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()
    a, b = load_file(first / "model.safetensors"), load_file(other / "model.safetensors")
    key = "model.embed_tokens.weight"
    assert a[key].shape == b[key].shape and not torch.equal(a[key], b[key])


def test_second_call_hits_cache(tiny, cache, monkeypatch):
    path = tiny_model_path()
    assert path.parent == cache / "tiny"
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the tiny model was rebuilt although it is cached")

    monkeypatch.setattr(models, "_build_tiny", no_rebuild)
    assert tiny_model_path() == path
    model, tokenizer = load_model_and_tokenizer("tiny", device="cpu")
    assert model.config.vocab_size == len(tokenizer)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        p.name for p in path.parent.iterdir() if not p.name.startswith(".building"))


def test_interrupted_build_leaves_no_cache_entry(own_cache, monkeypatch):
    def interrupted(cfg, out_dir):
        (out_dir / "config.json").write_text("{}")  # half a model on disk ...
        raise KeyboardInterrupt                      # ... then the user hits Ctrl-C

    monkeypatch.setattr(models, "_build_tiny", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_model_path()
    assert list((own_cache / "tiny").iterdir()) == []  # neither a cache entry nor a temp folder


def test_overrides_change_architecture_and_cache_folder(tiny, cache):
    default_model, _ = tiny
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model, tokenizer = load_model_and_tokenizer("tiny", device="cpu", num_hidden_layers=2)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the caller's RNG
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert count_parameters(model) < count_parameters(default_model)
    path = tiny_model_path(num_hidden_layers=2)
    assert path != tiny_model_path() and path.parent == cache / "tiny"
    assert json.loads((path / "tiny_config.json").read_text())["num_hidden_layers"] == 2
    assert TinyConfig(num_hidden_layers=2).cache_key() == path.name


def test_bad_overrides_are_refused(cache):
    with pytest.raises(TypeError, match="num_layers"):
        tiny_model_path(num_layers=2)
    with pytest.raises(TypeError, match="only apply to the 'tiny' model"):
        load_model_and_tokenizer("/some/local/model", num_hidden_layers=2)


# ---------------------------------------------------------------------------------------------
# generic from_pretrained branch


def test_saved_local_path_loads_through_from_pretrained(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "saved"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Strip what a plain base-model checkpoint may lack, to exercise the loader's fallbacks.
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))

    loaded, loaded_tok = load_model_and_tokenizer(str(path), dtype=torch.bfloat16, device="cpu")
    assert type(loaded) is type(model) and loaded.dtype == torch.bfloat16
    assert loaded_tok.chat_template == OPENCHAT_TEMPLATE  # installed because the checkpoint had none
    assert loaded_tok.pad_token == loaded_tok.eos_token == END_OF_TURN  # pad fell back to eos
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert loaded_tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                          add_generation_prompt=True) == SINGLE_TURN
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name

    as_float, _ = load_model_and_tokenizer(str(path), dtype="float32", device="cpu")
    assert as_float.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# helpers


def test_count_parameters_trainable_only():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 16 + 10 parameters
    assert count_parameters(layer) == 26
    layer[0].requires_grad_(False)
    assert count_parameters(layer, trainable_only=True) == 10
    assert count_parameters(layer) == 26


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert default_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert default_device() == torch.device("cuda", 1)

