import math

import pytest
import torch
from omegaconf import OmegaConf

from bench.train import (Plan, accumulate_gradients, activation_bytes, budget_tokens, lr_at, resolve_recompute,
                         run_tokens)


def test_lr_schedule_warmup_then_cosine():
    steps, peak, floor = 100, 1e-3, 1e-5
    lrs = [lr_at(s, steps, peak, floor, 0.1) for s in range(steps)]
    assert lrs[0] == pytest.approx(peak / 10)
    assert lrs[9] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # decays after warmup
    assert lrs[-1] == pytest.approx(floor, abs=2e-6)


def test_plan_resolves_batches():
    p = Plan.resolve(tokens=100_000, batch_tokens=8192, micro_batch=2, ctx=2048)
    assert (p.seqs_per_step, p.micro_batch, p.accum, p.tokens_per_step) == (4, 2, 2, 8192)
    assert p.steps == math.ceil(100_000 / 8192)
    long = Plan.resolve(tokens=100_000, batch_tokens=8192, micro_batch=8, ctx=32768)
    assert long.seqs_per_step == 1 and long.tokens_per_step == 32768
    with pytest.raises(ValueError):
        Plan.resolve(tokens=0, batch_tokens=1, micro_batch=1, ctx=1)


def test_budget_tokens_caps_the_tokens_by_the_compute_budget():
    assert budget_tokens(1_000_000, None, 5e6) == (1_000_000, "tokens")
    assert budget_tokens(1_000_000, 1e13, 5e6) == (1_000_000, "tokens")  # 2M would fit: the token budget binds
    assert budget_tokens(1_000_000, 1e12, 5e6) == (200_000, "compute")
    with pytest.raises(ValueError, match="compute must be positive"):
        budget_tokens(1_000, 0.0, 5e6)
    assert budget_tokens(1_000_000, 1e12, 5e6, min_tokens=300_000) == (300_000, "min_steps")  # the floor binds
    assert budget_tokens(1_000_000, 1e12, 5e6, min_tokens=100_000) == (200_000, "compute")
    assert budget_tokens(100_000, None, 5e6, min_tokens=300_000) == (300_000, "min_steps")


@pytest.mark.parametrize("size", ["cpu-xs", "cpu-s", "cpu-m"])
def test_long_contexts_train_every_architecture_past_the_step_floor(size):
    """conf/profile/cpu.yaml `long_context`: from 16k every run of the CPU profile trains at least min_steps
    optimizer steps (the compute budget buys 11-18 at 32k), the same tokens for every architecture and match
    rule; below 16k the rule does not apply, and where it would not bind nothing changes."""
    from bench.config import compose, long_context, model_config

    def plan(arch, ctx, match="flops", profile="cpu"):
        cfg = compose([f"arch={arch}", f"size={size}", f"ctx={ctx}", f"match={match}", f"profile={profile}"])
        tokens, why, _ = run_tokens(cfg, model_config(cfg, 257).reference.train_flops)
        return Plan.resolve(tokens, int(cfg.trainer.batch_tokens), int(cfg.trainer.micro_batch), ctx).steps, why

    floor = int(compose(["ctx=32k"]).long_context.min_steps)
    at_32k = {plan(a, 32768, m) for a in ("transformer", "ttt_linear", "mamba") for m in ("flops", "params")}
    assert at_32k == {(floor, "min_steps")}
    assert plan("transformer", 16384)[1] == "min_steps"
    for ctx in (2048, 8192):  # 142-188 steps: the floor would not bind, and it does not apply
        steps, why = plan("transformer", ctx)
        assert why != "min_steps" and steps > floor
        assert long_context(compose([f"size={size}", f"ctx={ctx}"])) is None
    assert plan("transformer", 32768, "params", "paper")[1] != "min_steps"  # the paper profile has no floor


@pytest.mark.parametrize("size", ["cpu-xs", "cpu-s", "cpu-m", "cpu-l"])
def test_cpu_ladder_compute_budget_binds_only_at_long_context(size):
    """The CPU sizes keep their token budgets at 2k (cpu-xs up to 8k) and train on compute / reference FLOPs
    per token beyond, the same tokens for every architecture and match rule (the reference sets them)."""
    from bench.config import compose, model_config

    def tokens(arch, ctx, match):
        cfg = compose([f"arch={arch}", f"size={size}", f"ctx={ctx}", f"match={match}"])  # as a run composes it
        sized = model_config(cfg, 257)
        return budget_tokens(int(cfg.trainer.tokens), float(cfg.trainer.compute), sized.reference.train_flops)

    short = 8192 if size == "cpu-xs" else 2048
    assert tokens("transformer", short, "flops")[1] == "tokens"
    at_32k = {tokens(a, 32768, m) for a in ("transformer", "ttt_linear", "mamba") for m in ("flops", "params")}
    (n, rule), = at_32k  # one value for every architecture
    assert rule == "compute" and 8 * 32768 <= n < tokens("transformer", short, "flops")[0]


@pytest.mark.parametrize("arch", ["ttt_linear", "mamba", "transformer"])
def test_recomputed_blocks_give_the_same_loss_and_gradients(arch):
    import architectures
    import torch.nn.functional as F

    cfg = architectures.ModelConfig(arch, 257, 32, 2, 2, 64, 64, options={"mini_batch": 16} if "ttt" in arch else {})
    torch.manual_seed(0)
    model = architectures.build_model(cfg).double()
    idx = torch.randint(0, 257, (2, 49))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.recompute_blocks = recompute
        F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_micro_batches_accumulate_the_gradients_of_the_whole_slice():
    """bench.train.accumulate_gradients: a rank's 6 sequences in micro-batches of 4 and 2 (unequal, each weighted by
    its share) give the loss and gradients of one pass over all 6 (fp64; RoPE rotates in fp32, so gradients through
    it scaled by a micro-batch's share round differently: 2.5e-7 relative at most)."""
    import contextlib

    import architectures
    import torch.nn.functional as F

    class Task:
        @staticmethod
        def loss(model, x, y):
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    cfg = architectures.ModelConfig("transformer", 257, 32, 2, 2, 64, 64)
    torch.manual_seed(0)
    model = architectures.build_model(cfg).double()
    idx = torch.randint(0, 257, (6, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    results = []
    for micro, accum in ((6, 1), (4, 2)):
        model.zero_grad()
        loss = accumulate_gradients(Task, model, model, "none", x, y, micro, accum, torch.device("cpu"),
                                    contextlib.nullcontext)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (whole, g_whole), (split, g_split) = results
    assert math.isclose(whole, split, rel_tol=1e-12), (whole, split)
    for a, b in zip(g_whole, g_split):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_recompute_auto_turns_on_for_activations_over_40_percent_of_memory():
    import psutil
    import architectures

    total = psutil.virtual_memory().total
    cfg = architectures.ModelConfig("ttt_linear", 257, 64, 2, 2, 128, 64)
    model = architectures.build_model(cfg)
    cpu = torch.device("cpu")
    assert resolve_recompute("auto", model, 1, 1024, cpu) is False
    tokens = int(0.41 * total / activation_bytes(2, 64, 1)) + 1  # just past 40% of this machine's memory
    assert resolve_recompute("auto", model, 1, tokens, cpu) is True
    assert resolve_recompute("true", model, 1, 8, cpu) is True and resolve_recompute(False, model, 1, 8, cpu) is False
    with pytest.raises(ValueError, match="recompute_blocks"):
        resolve_recompute("sometimes", model, 1, 8, cpu)


class CopyTask:
    """Echo the current token: any working model and trainer learn it within a few dozen steps."""

    vocab_size = 16

    def batch(self, step, n):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 16, (n, 32), generator=g)
        return x, x.clone()

    @staticmethod
    def loss(model, x, y):
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def trainer_cfg(**kw):
    base = dict(lr=3e-3, tokens=32 * 8 * 60, batch_tokens=32 * 8, micro_batch=4, min_lr=1e-5, warmup_frac=0.1,
                betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0, log_every=10, ckpt_every=20,
                resume=True, quiet=True, compile=False)
    return OmegaConf.create({**base, **kw})


def test_training_learns_and_resumes(tmp_path):
    import contextlib

    from architectures import ModelConfig, build_model
    from bench.tracking import NullTracker
    from bench.train import CHECKPOINT, train

    torch.manual_seed(0)
    cfg = ModelConfig("transformer", 16, 32, 2, 2, 64, 32, options={"backend": "sdpa"})
    model = build_model(cfg)
    out = train(model, CopyTask(), trainer_cfg(), 32, tmp_path, NullTracker(), torch.device("cpu"),
                contextlib.nullcontext)
    assert out["steps"] == 60 and out["train_loss"] < 0.5 * math.log(16)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert (tmp_path / CHECKPOINT).exists()
    # a finished run that is started again resumes at its last step: nothing is retrained
    again = train(build_model(cfg), CopyTask(), trainer_cfg(), 32, tmp_path, NullTracker(), torch.device("cpu"),
                  contextlib.nullcontext)
    assert again["tokens_per_s"] is None and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_each_compiled_model_starts_with_a_fresh_compile_cache(caplog):
    """A sweep trains its sizes in one process: with a recompile limit of 1, a second width would fall
    back to eager (dynamo's recompile_limit warning) unless compile_for_training resets."""
    import logging

    import torch._dynamo

    from architectures import ModelConfig, build_model
    from bench.train import compile_for_training

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 1
    try:
        with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
            for d in (32, 48):
                model = build_model(ModelConfig("ttt_linear", 257, d, 1, 2, 64, 64)).train()
                compile_for_training(model, "hot_path")(torch.randint(0, 257, (1, 64))).sum().backward()
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()
    assert "recompile_limit" not in caplog.text


class ScheduledDevTask(CopyTask):
    """CopyTask with a dev split whose accuracy is the fraction of `reach` steps validated so far."""

    def __init__(self, reach: int):
        self.reach, self.calls = reach, []

    def validate(self, model, device, autocast):
        self.calls.append(len(self.calls))
        return {"dev_acc": min(1.0, len(self.calls) * 10 / self.reach), "dev_loss": 0.0}


def test_early_stop_ends_training_at_the_first_check_over_the_threshold(tmp_path):
    """trainer.early_stop: validated every 10 steps, the metric in that step's metrics row; the run stops at the
    first check >= threshold, reports the steps and tokens it trained, and a rerun does not train on."""
    import contextlib
    import json

    from architectures import ModelConfig, build_model
    from bench.tracking import NullTracker
    from bench.train import train

    cfg = ModelConfig("transformer", 16, 32, 1, 2, 64, 32)
    tc = trainer_cfg(early_stop={"metric": "dev_acc", "threshold": 0.99, "every": 10})
    task = ScheduledDevTask(reach=30)  # dev_acc 1/3, 2/3, 1.0 at steps 10, 20, 30
    out = train(build_model(cfg), task, tc, 32, tmp_path, NullTracker(), torch.device("cpu"), contextlib.nullcontext)
    assert (out["steps"], out["early_stop_step"], out["planned_steps"]) == (30, 30, 60)
    assert out["tokens"] == 30 * 32 * 8 and len(task.calls) == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], round(r["dev_acc"], 2)) for r in rows] == [(10, 0.33), (20, 0.67), (30, 1.0)]
    again = train(build_model(cfg), ScheduledDevTask(30), tc, 32, tmp_path, NullTracker(), torch.device("cpu"),
                  contextlib.nullcontext)
    assert (again["steps"], again["early_stop_step"], again["tokens_per_s"]) == (30, 30, None)
    # unset (the default) or never reached: the whole budget, as before
    for sub in "bcd":
        (tmp_path / sub).mkdir()
    out = train(build_model(cfg), ScheduledDevTask(10 ** 6), tc, 32, tmp_path / "b", NullTracker(), torch.device("cpu"),
                contextlib.nullcontext)
    assert (out["steps"], out["early_stop_step"]) == (60, None)
    out = train(build_model(cfg), CopyTask(), trainer_cfg(early_stop=None), 32, tmp_path / "c", NullTracker(),
                torch.device("cpu"), contextlib.nullcontext)
    assert (out["steps"], out["early_stop_step"]) == (60, None)
    with pytest.raises(ValueError, match="no validation split"):
        train(build_model(cfg), CopyTask(), tc, 32, tmp_path / "d", NullTracker(), torch.device("cpu"),
              contextlib.nullcontext)
