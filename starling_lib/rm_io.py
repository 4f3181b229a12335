"""The saved reward model: one folder, written by notebook 03 / rm_train, read by notebooks 04 and 05.

    save_reward_model(rm, path)                         # a RewardModel -> the folder
    rm = load_reward_model(reward_model_dir(run_dir))   # the folder -> a RewardModel, eval mode
    rm = load_reward_model("berkeley-nest/Starling-RM-7B-alpha")   # a released one (released_rm)

The folder: the body as a transformers checkpoint (`config.json`, safetensors, sharded when
large), `reward_head.safetensors` (the head's weight), `reward_model.json` (format version,
backbone id, max length, how the model reads text, and what the trainer adds, such as its
settings) and the tokenizer. LoRA adapters are merged into the body on save, so the folder is
always a plain model, loadable without peft.

Departure from Starling-RM: the released Starling-RM-7B-alpha is one state dict of the authors'
own reward-model class (body and head together, loaded by re-creating that class over its base);
ours keeps the body a plain transformers checkpoint, so it loads with `AutoModel` like any other,
and the head in a file of its own. The released models need no conversion: `load_reward_model`
also takes a hub id or folder of Starling-RM-7B-alpha or Starling-RM-34B and loads it as its
model card does (starling_lib/released_rm.py), into the same `RewardModel`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from starling_lib import hub
from starling_lib.models import apply_chat_format, default_device, load_tokenizer, quiet_transformers
from starling_lib.released_rm import ReleasedLayoutError, load_released_reward_model
from starling_lib.reward_model import RewardModel
from starling_lib.runs import RM_STAGE, stage_dir

REWARD_MODEL_FORMAT = 1
HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_model.json"


def reward_model_dir(run_dir: str | os.PathLike | None) -> Path:
    """Where notebook 03 saves its reward model in a run, and where notebook 04 finds it."""
    return stage_dir(run_dir, RM_STAGE) / "reward_model"


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
            "head": "linear on the last non-pad token", "chat_format": model.chat_format,
            "truncation": "prompt from the left, then the answer from the left", **(extra or {})}
    (path / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def load_reward_model(id_or_path: str | os.PathLike, device: torch.device | str | None = None,
                      dtype: torch.dtype | str | None = None, base: str | None = None) -> RewardModel:
    """Load a reward model, in eval mode, on `device` (default: the best).

    id_or_path: a folder written by `save_reward_model`, or a released Starling reward model's hub id
        (`org/name`, `org/name@revision`, `modelscope:org/name`; fetched through starling_lib/hub.py)
        or local folder: berkeley-nest/Starling-RM-7B-alpha, Nexusflow/Starling-RM-34B
        (starling_lib/released_rm.py says what is read and how).
    dtype None: bf16 on a CUDA device that has it (a 7B reward model in 14 GB), else float32.
    base: for a released model, the model its tokenizer (and the 7B's config) come from; default the
        one its card names (meta-llama/Llama-2-7b-chat-hf, 01-ai/Yi-34B-Chat).
    """
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = Path(id_or_path)
    spec = None if path.exists() else hub.parse(str(id_or_path))
    if spec is not None:
        path = hub.snapshot(spec, "model")
    elif not path.exists():
        raise FileNotFoundError(f"{path} is not a saved reward model: no {CONFIG_FILE} (the folder does not exist: "
                                f"has notebook 03 run in this run_dir?), nor a hub id")
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if not (path / CONFIG_FILE).exists():
        try:
            return load_released_reward_model(path, device, dtype, base=base, name=str(id_or_path))
        except ReleasedLayoutError as e:
            raise ReleasedLayoutError(f"not a saved reward model (no {CONFIG_FILE}) nor a released one: {e}") from e
    if base is not None:
        raise ValueError(f"base= is for released reward models; {path} is a saved one, whose body is its own")
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("format") != REWARD_MODEL_FORMAT:
        raise ValueError(f"{path}: reward model format {info.get('format')}, this code reads {REWARD_MODEL_FORMAT}")
    with quiet_transformers():
        # device_map puts the weights straight on the device, not through CPU memory first
        body = AutoModel.from_pretrained(path, dtype=dtype, device_map=device)
    head_weight = load_file(str(path / HEAD_FILE))["weight"]
    head = nn.Linear(head_weight.shape[1], 1, bias=False, dtype=dtype)
    head.weight.data.copy_(head_weight)
    # "auto": the saved tokenizer's own template is the one it was trained with. Folders saved before
    # the format was recorded by name say "openchat_3.5" and were always fed that format.
    chat_format = info.get("chat_format", "openchat_3.5")
    tokenizer = apply_chat_format(load_tokenizer(str(path)), chat_format)
    model = RewardModel(body, head.to(device), tokenizer, info["max_length"], info.get("backbone", ""), chat_format)
    return model.eval()
