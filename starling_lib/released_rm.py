"""The released Starling reward models, loaded as their model cards load them.

    rm = load_reward_model("berkeley-nest/Starling-RM-7B-alpha")     # rm_io hands a released folder here
    rm = load_reward_model("Nexusflow/Starling-RM-34B")              # base defaults to 01-ai/Yi-34B-Chat
    rm.score(["What is 2 + 2?"], ["4."])                              # a `RewardModel`, as notebook 03 trains

Both are the authors' `GPTRewardModel` idea: a Llama-architecture body (the chat model without its LM
head, kept as `transformer`) and `v_head = Linear(hidden, 1, bias=False)` on the hidden state of the
answer's last token. They ship in two layouts, which `released_layout` tells apart by their files:

  starling-rm-7b-alpha (berkeley-nest/Starling-RM-7B-alpha)
    weights    one torch state dict: the first file ending in ".pt" or "model.bin" (the card's rule),
               keys `transformer.*` (the body), `v_head.weight`, maybe `model.*` (the card's class
               also holds the causal LM as `model`, so its body is `model.model.*` too)
    base       meta-llama/Llama-2-7b-chat-hf: the card builds its class on it (config and tokenizer)
               and loads the state dict over it with strict=False, so body tensors the file lacks
               keep the base's values (then, and only then, the base's weights are loaded too)
    text       "<s>[INST] {prompt} </s> [/INST] {answer}</s>" (models.STARLING_RM_7B_TEMPLATE); the
               card's `tokenizer(text)` puts Llama-2's own BOS in front of it; pad = unk
  starling-rm-34b (Nexusflow/Starling-RM-34B)
    weights    a transformers checkpoint of the card's class (`LlamaForSequenceClassification` with
               `transformer = LlamaModel(config)` and `v_head`): config.json (model_type llama) and
               safetensors, sharded with model.safetensors.index.json; keys `transformer.*`, `v_head.weight`
    base       01-ai/Yi-34B-Chat, for the tokenizer only (the card's AutoTokenizer); pad id 0 (PAD_ID = 0)
    text       "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>"
               (models.STARLING_RM_34B_TEMPLATE)

Both cards read the reward at `c_ind - 1`, c_ind the first pad token (else the row's end): the last
token of the text, "</s>" or "<|im_end|>" after the answer, and tokenize at most 2048 tokens.
`base=` names another base (a hub id, `org/name@revision`, a ModelScope id or a folder, through
starling_lib/hub.py). Nothing is unpickled: safetensors, or `torch.load(weights_only=True)`, which
refuses a file holding Python objects besides tensors; no remote code runs (`trust_remote_code` off).

Sources: the 7B's model card (berkeley-nest/Starling-RM-7B-alpha, read whole in a copy of its
README), the 34B's (Nexusflow/Starling-RM-34B, read in excerpts), allenai/reward-bench's
rewardbench/models/starling.py (both cards' classes, copied), efrick2002/Starling's
reward-model-training code (the authors' later trainer: Yi-34B-Chat is its base).
Verified there: both classes, the body and head names (`transformer`, `v_head`, no bias), the 7B
card's file rule, base (meta-llama/Llama-2-7b-chat-hf, pad = unk), example text, 2048 tokens and
c_ind - 1 rule; the 34B's class, PAD_ID = 0 and the same rule; that the 34B repository is
safetensors with a llama config (a mirror of it lists config.json, model-000NN-of-00015.safetensors
and model.safetensors.index.json); that the 7B repository does hold a config.json (a mirror:
architectures "LLMForSequenceRegression", which is no transformers class, model_type llama,
Llama-2-7B's shape), which the card never reads: its config comes from the base.
Seen only in copies of the 34B card's code (allenai/reward-bench does not load its tokenizer; two
third-party scripts do): the tokenizer id 01-ai/Yi-34B-Chat and the example text.
Not verified (the files were not opened): the name of the 7B's weight file (the card's rule is
applied) and the key names inside either checkpoint (assumed: those the cards' strict=False and
from_pretrained loads need, `transformer.*` and `v_head.weight`); texts of more than one exchange
(the 34B: ChatML turns joined by a newline, as a third-party copy of the authors' converter does;
the 7B, ours: the card's unit repeated per exchange).

Departures from the cards' code:
  * reading: the last non-pad position (by the attention mask), which is `c_ind - 1` unless the text
    itself holds the pad token (id 0, "<unk>" written out), where the cards would read before it.
    The 7B card computes PAD_ID as `tokenizer(pad_token)["input_ids"][0]`, which with a tokenizer
    that puts BOS first, as Llama-2's does, is BOS's id, not unk's (so on the tests' stand-in; the
    real tokenizer was not run here): taken literally, with its text starting with BOS, the card
    reads `rewards[i, -1]`, the last padding position of its 2048-token row. We read the answer's
    last token, as the 34B card (PAD_ID = 0) and the authors' trainer (PAD_ID =
    tokenizer.pad_token_id) do, and as the rule `c_ind - 1` means; which position
    Starling-RM-7B-alpha was trained to read is not published.
  * truncation and padding: rm_layout's (BOS and a quarter of the budget kept for the prompt;
    batches padded to their longest) instead of truncating the whole text from the left and padding
    every row to 2048 tokens; the rewards of texts that fit are the same.
  * dtype: bf16 on a CUDA GPU that has it, float32 otherwise (as every saved reward model here);
    the 7B card loads float32.
  * a body that is not complete in the 34B checkpoint is an error; the card's from_pretrained would
    initialise the missing tensors at random.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from starling_lib import hub
from starling_lib.models import CHAT_FORMATS, apply_chat_format, load_tokenizer, quiet_transformers
from starling_lib.reward_model import RewardModel

TORCH_FILE, SAFETENSORS = "torch_file", "safetensors"   # how a layout's weights are stored
BODY_PREFIXES = ("transformer.", "model.model.")       # the card's class: transformer is model.model
HEAD_KEY = "v_head.weight"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ReleasedLayoutError(ValueError):
    """A folder that holds no released reward model in a layout this module loads, with what it holds."""


@dataclass(frozen=True)
class ReleasedLayout:
    """How one released reward model is stored and read (see the module docstring)."""

    name: str
    repo_id: str              # the released repository
    weights: str              # TORCH_FILE (one state dict, the card's ".pt"/"model.bin" rule) or SAFETENSORS
    base: str                 # default base: the tokenizer, and with config_from_base the config
    config_from_base: bool    # the card builds the body from the base's config (else the checkpoint's config.json)
    base_fills_missing: bool  # body tensors the checkpoint lacks keep the base's (the card's strict=False load)
    chat_format: str          # models.CHAT_FORMATS: the text the card feeds the model
    pad: str                  # "unk": pad with the tokenizer's unk (7B card); "id0": pad id 0 (34B card's PAD_ID)
    max_length: int = 2048    # tokens the card's get_reward keeps

    def __post_init__(self):
        if self.weights not in (TORCH_FILE, SAFETENSORS):
            raise ValueError(f"weights must be {TORCH_FILE!r} or {SAFETENSORS!r}; got {self.weights!r}")
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}; got {self.chat_format!r}")
        if self.pad not in ("unk", "id0"):
            raise ValueError(f"pad must be 'unk' or 'id0'; got {self.pad!r}")
        if self.base_fills_missing and not self.config_from_base:
            raise ValueError("base_fills_missing needs config_from_base: the base's weights fit its own config only")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2; got {self.max_length}")


STARLING_RM_7B = ReleasedLayout(
    name="starling-rm-7b-alpha", repo_id="berkeley-nest/Starling-RM-7B-alpha", weights=TORCH_FILE,
    base="meta-llama/Llama-2-7b-chat-hf", config_from_base=True, base_fills_missing=True,
    chat_format="starling_rm_7b", pad="unk")
STARLING_RM_34B = ReleasedLayout(
    name="starling-rm-34b", repo_id="Nexusflow/Starling-RM-34B", weights=SAFETENSORS,
    base="01-ai/Yi-34B-Chat", config_from_base=False, base_fills_missing=False,
    chat_format="starling_rm_34b", pad="id0")
SUPPORTED = ("supported: a folder written by save_reward_model (reward_model.json); "
             f"{STARLING_RM_7B.repo_id}'s layout (one torch state dict, a file ending in .pt or model.bin, keys "
             f"transformer.* and {HEAD_KEY}, over the base {STARLING_RM_7B.base}); "
             f"{STARLING_RM_34B.repo_id}'s layout (config.json and model.safetensors or {SAFETENSORS_INDEX} "
             f"with its shards, keys transformer.* and {HEAD_KEY}; tokenizer from {STARLING_RM_34B.base})")


# --------------------------------------------------------------------------------------------
# which layout a folder holds


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text()).get("weight_map", {}).values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ReleasedLayoutError(f"{folder}: {SAFETENSORS_INDEX} names shards that are not there: {missing}")
        return files
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def _torch_files(folder: Path) -> list[Path]:
    """The card's rule: files ending in ".pt" or "model.bin" (it takes the first os.listdir gives)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".pt", "model.bin")))
    if len(found) > 1:
        preferred = [p for p in found if p.name == "pytorch_model.bin"]
        if not preferred:
            raise ReleasedLayoutError(f"{folder}: several candidate weight files {[p.name for p in found]}; the "
                                      f"card would take whichever the file system lists first: keep one")
        found = preferred
    return found


def released_layout(folder: str | Path) -> tuple[ReleasedLayout, list[Path]]:
    """(layout, weight files) of a released reward model's folder; ReleasedLayoutError when it holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    shards = _safetensors_files(folder)
    if shards:
        if not (folder / "config.json").is_file():
            raise ReleasedLayoutError(f"{folder}: safetensors weights but no config.json; {SUPPORTED}")
        return STARLING_RM_34B, shards
    files = _torch_files(folder)
    if files:
        return STARLING_RM_7B, files
    names = sorted(p.name for p in folder.iterdir())
    raise ReleasedLayoutError(f"{folder}: no reward model weights found (files: {names[:20]}"
                              f"{' ...' if len(names) > 20 else ''}); {SUPPORTED}")


# --------------------------------------------------------------------------------------------
# reading the weights, safely


def torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict, read with `weights_only=True` (and memory-mapped when the file allows):
    a file holding pickled Python objects besides tensors is refused, never run."""
    path = Path(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)   # the old, non-zip format
    except pickle.UnpicklingError as e:
        raise ReleasedLayoutError(f"{path}: refused: the file holds pickled Python objects besides tensors, and it "
                                  f"is read with torch.load(weights_only=True), which does not run them "
                                  f"({str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        what = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise ReleasedLayoutError(f"{path}: not a state dict of tensors (found {what}); {SUPPORTED}")
    return state


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's files: safetensors memory-mapped, torch files by `torch_state_dict`."""
    from safetensors import safe_open

    state = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                state.update({k: st.get_tensor(k) for k in st.keys()})
        else:
            state.update(torch_state_dict(f))
    return state


def _body_prefix(keys, source: Path) -> str:
    """The prefix of the body's keys (`transformer.`, else `model.model.`); errors name what was found."""
    if HEAD_KEY not in keys:
        raise ReleasedLayoutError(f"{source}: no {HEAD_KEY} (the reward head) among its {len(keys)} tensors "
                                  f"(e.g. {sorted(keys)[:6]}); {SUPPORTED}")
    prefix = next((p for p in BODY_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        raise ReleasedLayoutError(f"{source}: no body tensors under {' or '.join(BODY_PREFIXES)} "
                                  f"(e.g. {sorted(keys)[:6]}); {SUPPORTED}")
    return prefix


def split_state_dict(state: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(body state dict with the body's own key names, head weight (1, hidden)) of a GPTRewardModel state dict.

    Body keys are those under `transformer.` (or, without any, `model.model.`); `model.lm_head.weight`
    (the causal LM's head) and rotary `inv_freq` buffers are unused; other keys are ignored with a
    warning, as the card's strict=False load ignores them.
    """
    prefix = _body_prefix(state, source)
    body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("rotary_emb.inv_freq")}
    unused = {k for k in state if k.startswith(BODY_PREFIXES) or k == "model.lm_head.weight" or k.endswith("inv_freq")}
    other = sorted(set(state) - unused - {HEAD_KEY})
    if other:
        warnings.warn(f"{source}: ignored {len(other)} tensor(s) that are neither body nor head, as the card's "
                      f"strict=False load does: {other[:5]}{' ...' if len(other) > 5 else ''}", stacklevel=3)
    return body, state[HEAD_KEY]


# --------------------------------------------------------------------------------------------
# building the RewardModel


def _tokenizer(layout: ReleasedLayout, base: str):
    tokenizer = load_tokenizer(base)
    if layout.pad == "unk":
        if tokenizer.unk_token is None:
            raise ValueError(f"the tokenizer of {base!r} has no unk token, which {layout.repo_id}'s card pads with")
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return apply_chat_format(tokenizer, layout.chat_format)


def _body_class(config):
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise ReleasedLayoutError(f"no transformers body class for model_type {config.model_type!r}") from None


def _expected_body(config) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the body `config` describes (built on the meta device: no memory)."""
    from transformers import AutoModel

    with torch.device("meta"), quiet_transformers():
        return {k: v.shape for k, v in AutoModel.from_config(config).state_dict().items()}


def _missing(shapes: dict[str, tuple], config, source: Path, config_from: str) -> set[str]:
    """Names of the body tensors `shapes` (the checkpoint's, body key names) lacks; raises on a tensor of
    the wrong shape or one the body has no place for."""
    expected = _expected_body(config)
    wrong = [f"{k} {tuple(v)} vs {tuple(expected[k])}" for k, v in shapes.items()
             if k in expected and tuple(v) != tuple(expected[k])]
    unknown = sorted(set(shapes) - set(expected))
    if wrong or unknown:
        raise ReleasedLayoutError(f"{source}: the body does not fit the config of {config_from} "
                                  + (f"(shapes: {wrong[:3]}) " if wrong else "")
                                  + (f"(tensors it has no place for: {unknown[:3]}) " if unknown else "")
                                  + "- is the base the model it was trained from?")
    return set(expected) - set(shapes)


def _build_body(layout: ReleasedLayout, body_state: dict[str, torch.Tensor], config, missing: set[str], base: str,
                source: Path, device, dtype) -> nn.Module:
    """The body from the checkpoint's tensors; those it lacks from the base's weights where the card's
    strict=False load leaves them so (the 7B layout), else an error."""
    from transformers import AutoModel

    if missing and not layout.base_fills_missing:
        raise ReleasedLayoutError(f"{source}: the body lacks {len(missing)} tensor(s): {sorted(missing)[:5]}")
    with quiet_transformers():
        if not missing:   # the whole body is in the checkpoint: no base weights are read
            return _body_class(config).from_pretrained(None, config=config, state_dict=body_state, dtype=dtype,
                                                       device_map=device)
        warnings.warn(f"{source}: {len(missing)} body tensor(s) not in the file keep the base's values, as the card's "
                      f"strict=False load over {base} leaves them (e.g. {sorted(missing)[:3]})", stacklevel=3)
        weights, revision, errors = hub.pretrained_source(base)
        with errors:
            body = AutoModel.from_pretrained(weights, revision=revision, dtype=dtype, device_map=device)
    body.load_state_dict(body_state, strict=False)
    return body


def load_released_reward_model(folder: str | Path, device: torch.device, dtype: torch.dtype, base: str | None = None,
                               name: str = "") -> RewardModel:
    """A released Starling reward model's folder -> a `RewardModel` in eval mode (see the module docstring).

    device, dtype: where and in what the body and head go (rm_io.load_reward_model picks the defaults).
    base: the model its tokenizer (and for the 7B layout its config) come from; default: the card's.
    name: what the model is called (its hub id), kept as `backbone_name`.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    layout, files = released_layout(folder)
    base = base or layout.base
    tokenizer = _tokenizer(layout, base)   # first: a missing base fails before gigabytes are read
    source = files[0] if len(files) == 1 else folder
    body_state, head_weight = split_state_dict(read_state_dict(files), source)
    if layout.config_from_base:   # the card builds its class on the base
        config_source, revision, errors = hub.pretrained_source(base)
        with errors:
            config = AutoConfig.from_pretrained(config_source, revision=revision)
        config_from = base
    else:   # model_type picks the class; remote code never runs
        config, config_from = AutoConfig.from_pretrained(folder), f"{folder.name}/config.json"
    missing = _missing({k: v.shape for k, v in body_state.items()}, config, source, config_from)
    body = _build_body(layout, body_state, config, missing, base, source, device, dtype)
    hidden = body.config.get_text_config().hidden_size
    if tuple(head_weight.shape) != (1, hidden):
        raise ReleasedLayoutError(f"{folder}: {HEAD_KEY} has shape {tuple(head_weight.shape)}, expected (1, {hidden})")
    head = nn.Linear(hidden, 1, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        head.weight.copy_(head_weight)
    body.config.pad_token_id = tokenizer.pad_token_id
    model = RewardModel(body, head, tokenizer, layout.max_length, name or str(folder), layout.chat_format)
    return model.eval()
