"""Test doubles of starling_lib.engines: an engine that records what the trainer asks of it, and a
reward that needs no model."""

from __future__ import annotations

import torch

from starling_lib.engines import GenerationEngine


class RecordingEngine(GenerationEngine):
    """Generates with `inner` (any engine) and records every call: `generations` (prompt count,
    settings, seed), `updates` (list of {name: tensor clone} per update_weights), `events`
    ("generate", "update", "sleep", "wake", "close" in order)."""

    name = "vllm"
    can_sleep = True

    def __init__(self, inner: GenerationEngine, name: str = "vllm"):
        super().__init__()
        self.inner, self.name = inner, name
        self.generations: list[tuple] = []
        self.updates: list[dict[str, torch.Tensor]] = []
        self.events: list[str] = []
        self.closed = False

    def generate(self, prompt_ids, settings, seed=None):
        self.events.append("generate")
        self.generations.append((len(prompt_ids), settings, seed))
        return self.inner.generate(prompt_ids, settings, seed)

    def update_weights(self, named_tensors):
        named = [(n, t.detach().clone()) for n, t in named_tensors]
        self.events.append("update")
        self.updates.append(dict(named))
        self.pushed = [n for n, _ in named]
        return self.pushed

    def sleep(self):
        self.events.append("sleep")

    def wake(self):
        self.events.append("wake")

    def close(self):
        self.events.append("close")
        self.closed = True


class LengthReward:
    """A reward model stand-in: the response's length in characters."""

    def score(self, prompts, responses, batch_size: int = 16, **kwargs) -> torch.Tensor:
        return torch.tensor([float(len(r)) for r in responses])
