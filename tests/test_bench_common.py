"""benchmarks/common.py's TrainingPhases: each phase's time lands in its own clock, tokens are counted once."""

import time

import torch

from benchmarks.common import TrainingPhases

PAUSE = 0.05


class SlowBackward(torch.autograd.Function):
    """Identity whose backward pauses: time that must land in backward_s."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(PAUSE)
        return grad


class SlowForward(torch.nn.Module):
    """Embedding -> pause -> linear: nested modules, so the outer call alone must be clocked."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)

    def forward(self, ids):
        time.sleep(PAUSE)
        return self.head(SlowBackward.apply(self.embed(ids))).sum()


class SlowSGD(torch.optim.SGD):
    def step(self, closure=None):
        time.sleep(PAUSE)
        return super().step(closure)


def train(model, optimizer, steps):
    for _ in range(steps):
        model(torch.randint(0, 10, (2, 5))).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_each_phase_is_clocked_apart_and_tokens_counted_once():
    model = SlowForward()
    optimizer = SlowSGD(model.parameters(), lr=0.1)
    t0 = time.perf_counter()
    with TrainingPhases() as phases:
        train(model, optimizer, steps=3)
    wall = time.perf_counter() - t0
    assert phases.tokens == 3 * 2 * 5                      # what the embedding read, not every module's input
    for clock in (phases.forward_s, phases.backward_s, phases.optimizer_s):
        assert 3 * PAUSE <= clock < 3 * PAUSE + 0.1        # each pause in its own phase, once
    row = phases.split(wall)
    assert row["rest_s"] == wall - phases.forward_s - phases.backward_s - phases.optimizer_s >= 0
    assert row["us_per_token_fwd_bwd"] == 1e6 * (phases.forward_s + phases.backward_s) / 30


def test_leaves_nothing_behind():
    backward = torch.autograd.backward
    model = SlowForward()
    optimizer = SlowSGD(model.parameters(), lr=0.1)
    with TrainingPhases() as phases:
        train(model, optimizer, steps=1)
    seen = (phases.tokens, phases.forward_s, phases.backward_s, phases.optimizer_s)
    train(model, optimizer, steps=1)                      # outside: nothing counted
    assert (phases.tokens, phases.forward_s, phases.backward_s, phases.optimizer_s) == seen
    assert torch.autograd.backward is backward
