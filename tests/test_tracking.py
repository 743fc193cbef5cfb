"""Layer and branch tracking (no xfuser, no process group): the layer name that the shared
strategies see is qualified by diffusers' cache_context branch, and unpatching restores the
model's own method."""

import contextlib

import torch

from compactfusion import CompactConfig
from compactfusion.integrations import tracking
from compactfusion.integrations.state import PipelineState


class Attn(torch.nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, x):
        self.seen.append(tracking.current_layer(tracking.active_state()))
        return x


class Model(torch.nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Attn(seen), Attn(seen)])
        self.entered = []

    @contextlib.contextmanager
    def cache_context(self, name):
        self.entered.append(name)
        yield

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_layers_and_branches_are_separate_sites():
    seen = []
    model = Model(seen)
    state = PipelineState(config=CompactConfig())
    tracking.install_layer_hooks(state, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)])
    tracking.install_step_hooks(state, model)
    tracking.install_branch_tracking(state, model)
    x = torch.zeros(1)
    model(x)  # not running: no names recorded beyond the default
    with tracking.running(state):
        with model.cache_context("cond"):
            model(x)
        with model.cache_context("uncond"):
            model(x)
        model(x)
    assert seen == ["attn", "attn", "blocks.0@cond", "blocks.1@cond", "blocks.0@uncond",
                    "blocks.1@uncond", "blocks.0", "blocks.1"]  # fmt: skip
    assert model.entered == ["cond", "uncond"]  # the model's own cache_context still runs
    assert state.step == 3 and state.branch is None
    tracking.remove_hooks(state)
    assert "cache_context" not in vars(model) and not state.hooks
    seen.clear()
    with tracking.running(state):
        model(x)
    assert seen == ["attn", "attn"] and state.step == 3


def test_ratio_after_warmup_skips_each_branchs_warmup_calls():
    cfg = CompactConfig(warmup_steps=1)
    state = PipelineState(config=cfg)
    # Two calls per step (cond, uncond): each branch's first call is raw (100 bytes), then 10.
    for step in range(3):
        for branch in ("cond", "uncond"):
            state.branch = branch
            state.begin_step()
            state.end_step()
            state.step_bytes[-1] = 100 if step == 0 else 10
            state.step_raw_bytes[-1] = 100
    state.branch = None
    assert state.stats()["ratio_after_warmup"] == 10.0
