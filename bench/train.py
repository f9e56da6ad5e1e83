"""The training loop every task and architecture shares.

Recipe (the paper's, App. C of arXiv 2407.04620): AdamW (0.9, 0.95), weight decay 0.1, gradient
clip 1.0, linear warmup over the first 10% of steps then cosine decay to min_lr; bf16 autocast on
CUDA, fp32 on CPU. Which parameters are decayed, and any lr multipliers, follow the model's training
recipe (recipe=native|shared; architectures/recipe.py). Batches are a pure function of the step, and
the checkpoint holds model, optimizer, step and the training curve position, so a killed run resumes
where it stopped.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from architectures.recipe import param_groups
from architectures.shell import CompilesHotPath, FollowsTrainProgress
from bench import distributed
from bench.config import long_context
from bench.faults import crash_point
from bench.results import append_jsonl, atomic_write_bytes, atomic_write_text

CHECKPOINT = "checkpoint.pt"


@dataclass
class Plan:
    """What the trainer will do, resolved from the token budget and the context."""

    steps: int
    seqs_per_step: int
    micro_batch: int
    accum: int
    tokens_per_step: int

    @classmethod
    def resolve(cls, tokens: int, batch_tokens: int, micro_batch: int, ctx: int) -> "Plan":
        if tokens <= 0 or batch_tokens <= 0 or micro_batch <= 0:
            raise ValueError("trainer tokens, batch_tokens and micro_batch must be positive")
        seqs = max(1, batch_tokens // ctx)  # at least one full sequence per step
        micro = min(micro_batch, seqs)
        accum = math.ceil(seqs / micro)
        seqs = micro * accum
        steps = max(1, math.ceil(tokens / (seqs * ctx)))
        return cls(steps, seqs, micro, accum, seqs * ctx)

    def split(self, world: int) -> tuple[int, int, int]:
        """(sequences, micro-batch, accumulation steps) of one of `world` ranks: the step's global batch is
        cut into `world` equal slices, so the data do not depend on the world size; a rank accumulates its
        slice in micro-batches of at most micro_batch (the last one may be shorter). split(1) is the plan."""
        if self.seqs_per_step % world:
            raise ValueError(f"a step's {self.seqs_per_step} sequences do not split over {world} processes; "
                             f"make trainer.batch_tokens / ctx a multiple of {world}")
        seqs = self.seqs_per_step // world
        micro = min(self.micro_batch, seqs)
        return seqs, micro, math.ceil(seqs / micro)


def budget_tokens(tokens: int, compute, ref_train_flops_per_token: float, min_tokens: int = 0) -> tuple[int, str]:
    """The training tokens of a run and the rule that set them: the size's token budget, capped by its
    compute budget (training FLOPs) divided by the training FLOPs per token of the size's reference
    Transformer at the run's context, and raised to `min_tokens` (the long-context step floor) where the
    cap falls below it. Every architecture of a size gets the same tokens (the reference sets them, whatever
    the match rule), and a longer context gets fewer tokens for the same compute, down to the floor."""
    if compute is None:
        out, rule = int(tokens), "tokens"
    else:
        compute = float(compute)  # YAML may give 1.5e13 as a string
        if compute <= 0 or ref_train_flops_per_token <= 0:
            raise ValueError(f"trainer.compute must be positive (or null); got {compute}")
        capped = int(compute / ref_train_flops_per_token)
        out, rule = (capped, "compute") if capped < tokens else (int(tokens), "tokens")
    return (int(min_tokens), "min_steps") if min_tokens > out else (out, rule)


def run_tokens(cfg, ref_train_flops_per_token: float) -> tuple[int, str, int | None]:
    """(tokens, rule, min_steps) of a run's composed config: budget_tokens of its trainer at its context, with
    the profile's long-context floor of min_steps optimizer steps where it applies (bench/config.py:
    long_context; None where it does not), counted in the plan's tokens per step."""
    rule, tcfg, ctx = long_context(cfg), cfg.trainer, int(cfg.ctx)
    min_steps = None if rule is None else int(rule.min_steps)
    step = Plan.resolve(1, int(tcfg.batch_tokens), int(tcfg.micro_batch), ctx).tokens_per_step
    tokens, why = budget_tokens(int(tcfg.tokens), tcfg.get("compute"), ref_train_flops_per_token,
                                (min_steps or 0) * step)
    return tokens, why, min_steps


def lr_at(step: int, steps: int, peak: float, min_lr: float, warmup_frac: float) -> float:
    """Linear warmup from 0 over warmup_frac of the steps, then cosine from peak to min_lr."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={requested} but CUDA is not available")
    return torch.device(requested)


def autocast_for(device: torch.device, precision: str):
    """(context factory, name): bf16 autocast on CUDA for precision=auto, fp32 on CPU."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16"
    return contextlib.nullcontext, "fp32"


def make_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups under its training recipe (architectures/recipe.py): the
    recipe's no-decay parameters get weight decay 0 and its lr multipliers a group of their own (the
    shared recipe: one group, every parameter decayed, as the TTT paper's JAX code does). Fused (one kernel
    updates every parameter) where every parameter is a floating-point tensor on CPU or CUDA: on 2 CPU cores
    a step of cpu-m's 1.8M parameters takes 1.3 ms fused, 4.2 ms with foreach, 5.4 ms a parameter at a time."""
    lm = getattr(model, "lm", model)  # a classifier's language model holds the config
    groups = param_groups(model, lm.cfg.recipe, float(tcfg.weight_decay))
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=float(tcfg.lr), betas=tuple(tcfg.betas),
                             weight_decay=float(tcfg.weight_decay), eps=float(tcfg.eps), fused=fused or None)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """What ran, for the run's summary: "adamw (fused)", "adamw (foreach)" or "adamw"."""
    kind = "fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach") else ""
    return f"{type(optimizer).__name__.lower()} ({kind})" if kind else type(optimizer).__name__.lower()


COMPILE_MODES = ("none", "hot_path", "model")


def compile_for_training(model, mode: str):
    """none: eager. model: torch.compile(model). hot_path: modules that know their hot path compile
    just that (TTT layers: the per-mini-batch step; a whole-model graph would unroll their loop),
    others run eager."""
    if mode in ("False", "false"):
        mode = "none"
    if mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode != "none":
        # A fresh compile cache per model: a sweep trains its sizes one after another in one process, and
        # every size's shapes counted against dynamo's recompile limit (8 per function), so from the third
        # size on the hot path silently ran eagerly (seen at cpu-m in TTT's and Mamba's sweeps).
        torch._dynamo.reset()
    if mode == "model":
        return torch.compile(model)
    if mode == "hot_path":
        for m in model.modules():
            if isinstance(m, CompilesHotPath):
                m.compile_hot_path()
    return model


ACTIVATION_FLOATS_PER_WIDTH = 48  # fp32 numbers a block keeps per token per unit of width (measured: TTT and
                                  # Mamba blocks keep 30-70 d-wide tensors for backward, the scan's states too)
RECOMPUTE_MEMORY_FRACTION = 0.4   # recompute_blocks=auto: on when the estimate exceeds this share of memory


def activation_bytes(n_layers: int, d_model: int, tokens: int) -> int:
    """A rough estimate of the activations one forward keeps for backward: 4 bytes x 48 x d per token
    and layer (a 32k sequence at cpu-m's FLOP-matched TTT width, 4 x 576: 14.5 GB)."""
    return 4 * ACTIVATION_FLOATS_PER_WIDTH * d_model * n_layers * tokens


def resolve_recompute(mode, model, micro_batch: int, ctx: int, device: torch.device) -> bool:
    """trainer.recompute_blocks: true | false | auto (on when the estimated activations of a micro-batch
    exceed 40% of the machine's memory, or of the GPU's)."""
    mode = str(mode).lower()
    if mode in ("true", "false"):
        return mode == "true"
    if mode != "auto":
        raise ValueError(f"trainer.recompute_blocks must be auto, true or false; got {mode!r}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    cfg = model.cfg
    return activation_bytes(cfg.n_layers, cfg.d_model, micro_batch * ctx) > RECOMPUTE_MEMORY_FRACTION * total


class Diverged(FloatingPointError):
    """A non-finite loss or gradient norm: the run stops before the optimizer applies it."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: int | None):
        self.step, self.loss, self.grad_norm, self.last_checkpoint = step, loss, grad_norm, last_checkpoint
        kept = (f"the last good checkpoint (step {last_checkpoint}) is kept" if last_checkpoint is not None
                else "no checkpoint was written before it")
        super().__init__(f"diverged at step {step}: loss {loss}, gradient norm {grad_norm}; {kept}. "
                         f"Lower trainer.lr or raise trainer.warmup_frac")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or belongs to another run: the message names the file and the fix."""


CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, model, optimizer, step: int, extra: dict) -> None:
    """Serialise, then write atomically (temporary file, fsync, rename): a kill at any moment leaves the
    previous checkpoint whole."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, **extra}, buf)
    atomic_write_bytes(path, buf.getvalue(), crash_at="checkpoint")


def _fix(path: Path) -> str:
    return f"delete {path} to train this run from step 0, or start a new sweep with FRESH=1 (make sweep ... FRESH=1)"


def check_identity(path: Path, state: dict, identity: dict | None) -> None:
    for key, want in (identity or {}).items():
        have = state.get(key)
        if have is not None and have != want:
            raise CheckpointError(f"checkpoint {path} belongs to another run ({key} {have!r}, this run "
                                  f"{want!r}); {_fix(path)}")


def load_checkpoint(path: Path, device: torch.device, identity: dict | None = None) -> dict:
    """torch.load(weights_only=True); an unreadable file or one written by another run (`identity`:
    architecture, size, context and config fingerprint) raises CheckpointError naming the file and the fix."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zip, pickle and EOF errors alike
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); {_fix(path)}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= state.keys():
        raise CheckpointError(f"checkpoint {path} is not a ttt-bench training checkpoint; {_fix(path)}")
    check_identity(path, state, identity)
    return state


def load_sharded_checkpoint(path: Path, model, optimizer, identity: dict | None) -> dict:
    """A sharded checkpoint folder (bench/distributed.py) into model and optimizer; returns its meta.json
    (step, train_wall_s, identity). Errors as load_checkpoint's."""
    try:
        meta = distributed.read_meta(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); {_fix(path)}") from None
    check_identity(path, meta, identity)
    try:
        distributed.load_sharded(path, model, optimizer)
    except Exception as e:  # missing shards, other shapes
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                              f"{_fix(path.parent)}") from None
    return meta


def restore(run_dir: Path, model, optimizer, device: torch.device, identity: dict, mode: str) -> dict | None:
    """Load the run's newest checkpoint into model and optimizer; its state (step, train_wall_s), or None
    without one. checkpoint.pt is written by one process (parallel=none), checkpoint.dcp/ by several;
    either loads under any parallel mode and world size."""
    pt, sharded = run_dir / CHECKPOINT, distributed.latest_sharded(run_dir)
    if sharded is not None and (not pt.exists() or distributed.saved_at(run_dir) >= pt.stat().st_mtime):
        return load_sharded_checkpoint(sharded, model, optimizer, identity)
    if not pt.exists():
        return None
    if mode == "none":
        state = load_checkpoint(pt, device, identity)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return state
    state = load_checkpoint(pt, torch.device("cpu"), identity)
    distributed.load_full(model, optimizer, state)
    return state


@dataclass(frozen=True)
class EarlyStop:
    """trainer.early_stop: every `every` steps the task's `validate` (a held-out dev split, never the
    reported test examples) gives `metric`; training stops once it reaches `threshold` (Zoology stops at
    0.99 validation accuracy). The lr schedule keeps the full budget's length, as Zoology's does."""

    metric: str
    threshold: float
    every: int

    @classmethod
    def from_config(cls, spec) -> "EarlyStop | None":
        if spec is None:
            return None
        out = cls(str(spec["metric"]), float(spec["threshold"]), int(spec["every"]))
        if out.every <= 0:
            raise ValueError(f"trainer.early_stop.every must be a positive number of steps, got {out.every}")
        return out

    def check(self, task, model, device, autocast) -> tuple[dict, bool]:
        """(the task's validation metrics, whether to stop), the same on every rank (rank 0's decision)."""
        if not hasattr(task, "validate"):
            raise ValueError(f"trainer.early_stop: task {getattr(task, 'name', task)!r} has no validation split")
        metrics = task.validate(model, device, autocast)
        if self.metric not in metrics:
            raise ValueError(f"trainer.early_stop.metric {self.metric!r}: the task's validation gives "
                             f"{', '.join(metrics)}")
        return metrics, bool(distributed.broadcast(metrics[self.metric] >= self.threshold))


def resume_metrics(metrics_path: Path, step: int) -> None:
    """Cut metrics.jsonl back to the checkpoint's step: rows logged after it are trained again."""
    if not metrics_path.exists():
        return
    keep = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(line)
    atomic_write_text(metrics_path, "".join(f"{line}\n" for line in keep))


def set_lr(optimizer, lr: float) -> None:
    """The step's learning rate on every parameter group, times the recipe's multiplier (make_optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def accumulate_gradients(task, step_model, wrapped, parallel: str, x_rank: torch.Tensor, y_rank: torch.Tensor,
                         micro: int, accum: int, device: torch.device, autocast) -> float:
    """Forward and backward of this rank's slice x_rank, y_rank (seqs, ctx) in `accum` micro-batches of at most
    `micro` sequences, each loss weighted by its share of the slice (the gradients sum to the slice's mean), the
    ranks' gradients synchronised on the last; returns the step's loss, the mean over the global batch."""
    seqs, loss_sum = len(x_rank), 0.0
    for m in range(accum):
        sl = slice(m * micro, (m + 1) * micro)
        x, y = x_rank[sl].to(device), y_rank[sl].to(device)  # (<= micro, ctx)
        with distributed.grad_sync(wrapped, parallel, last=m == accum - 1):
            with autocast():  # weight len(x)/seqs: 1/accum for equal micro-batches
                loss = task.loss(step_model, x, y) / (seqs / len(x))
            loss.backward()
        loss_sum += float(loss.detach())
    return distributed.mean(loss_sum)


def clip_gradients(model, parallel: str, max_norm: float) -> float:
    """Clip the gradients' global norm to max_norm; returns the norm before clipping (FSDP: over every shard)."""
    if parallel == "fsdp":
        return distributed.clip_grad_norm(model, max_norm)
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def train(model, task, tcfg, ctx: int, run_dir: Path, tracker, device: torch.device, autocast,
          desc: str = "train", governor=None, identity: dict | None = None, parallel: str = "none",
          precision: str = "fp32") -> dict:
    """Train `model` on `task` for the token budget in `tcfg`; returns what the summary needs.
    governor: a bench.threads.ThreadGovernor that refits the CPU threads between steps (None: fixed).
    identity: what the checkpoint records and a resumed one must match (architecture, size, ctx, config).

    Early stopping (trainer.early_stop, EarlyStop): the task's dev split every `every` steps, logged with
    that step's row of metrics.jsonl; the run ends at the first check that reaches the threshold, and its
    checkpoint remembers it (a resumed run does not train on).

    Checkpoints: every `ckpt_every` steps and every `ckpt_every_s` seconds (0: off), and at the end;
    a run started again resumes from its checkpoint with metrics.jsonl cut back to that step, so an
    interrupted run ends with the same weights and curve as an uninterrupted one (bit-exact on CPU
    with a fixed thread count). A non-finite loss or gradient norm raises Diverged before the update.

    parallel: none | ddp | fsdp (bench/distributed.py; the process group is already joined). Each rank
    trains on its slice of every step's global batch and accumulates over it (Plan.split); rank 0 writes
    metrics.jsonl; the checkpoint is sharded (checkpoint.dcp/). precision: bf16 makes FSDP gather bf16."""
    model.to(device)
    plan = Plan.resolve(int(tcfg.tokens), int(tcfg.batch_tokens), int(tcfg.micro_batch), ctx)
    seqs, micro, accum = plan.split(distributed.world_size())  # this rank's share of a step
    first, main = distributed.rank() * seqs, distributed.is_main()  # its slice starts at `first`
    wrapped = distributed.wrap(model, parallel, device, precision)  # fsdp shards `model` in place
    optimizer = make_optimizer(model, tcfg)
    ckpt_path = run_dir / CHECKPOINT
    identity = dict(identity or {})
    start_step, prior_wall, last_ckpt, stopped_at = 0, 0.0, None, None
    early_stop = EarlyStop.from_config(tcfg.get("early_stop"))
    state = restore(run_dir, model, optimizer, device, identity, parallel) if bool(tcfg.resume) else None
    if state is not None:
        start_step, prior_wall = int(state["step"]), float(state.get("train_wall_s", 0.0))
        last_ckpt = start_step
        stopped_at = state.get("early_stop_step")  # it stopped there: nothing left to train
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        resume_metrics(metrics_path, start_step)
    ckpt_steps, ckpt_seconds = int(tcfg.get("ckpt_every", 0) or 0), float(tcfg.get("ckpt_every_s", 0) or 0)
    lm = getattr(model, "lm", model)  # a classifier's language model holds the blocks
    lm.recompute_blocks = resolve_recompute(tcfg.get("recompute_blocks", "auto"), lm, micro, ctx, device)
    step_model = compile_for_training(wrapped, str(tcfg.compile))
    model.train()
    # modules that schedule something by training progress (TTT-MLP's inner base lr warmup)
    scheduled = [m for m in model.modules() if isinstance(m, FollowsTrainProgress)]
    warmup_steps = max(1, int(float(tcfg.warmup_frac) * plan.steps))
    t0 = time.perf_counter()
    tokens_since, t_since, t_ckpt = 0, t0, t0

    def checkpoint(step: int) -> None:
        extra = {"train_wall_s": prior_wall + time.perf_counter() - t0, **identity}
        if stopped_at is not None:
            extra["early_stop_step"] = stopped_at
        if parallel == "none":
            save_checkpoint(ckpt_path, model, optimizer, step, extra)
            distributed.remove_sharded(run_dir)
        else:
            distributed.save_sharded(run_dir, model, optimizer, step, extra)

    loss_val = float("nan")
    bar = tqdm(total=plan.steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
               disable=bool(tcfg.get("quiet", False)) or not main)
    for step in range(start_step, plan.steps if stopped_at is None else start_step):
        if governor is not None:
            governor.update()
        lr = lr_at(step, plan.steps, float(tcfg.lr), float(tcfg.min_lr), float(tcfg.warmup_frac))
        set_lr(optimizer, lr)
        for m in scheduled:
            m.set_train_progress(step, warmup_steps)
        x_all, y_all = task.batch(step, plan.seqs_per_step)  # (seqs_per_step, ctx) each: the global batch
        loss_sum = accumulate_gradients(task, step_model, wrapped, parallel, x_all[first:first + seqs],
                                        y_all[first:first + seqs], micro, accum, device, autocast)
        grad_norm = clip_gradients(model, parallel, float(tcfg.grad_clip))
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            bar.close()
            raise Diverged(step, loss_sum, grad_norm, last_ckpt)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = loss_sum
        tokens_since += plan.tokens_per_step
        done = step + 1
        validated, stop = {}, False
        if early_stop is not None and (done % early_stop.every == 0 or done == plan.steps):
            validated, stop = early_stop.check(task, model, device, autocast)
            if stop:
                stopped_at = done
        if done % int(tcfg.log_every) == 0 or done == plan.steps or validated:
            now = time.perf_counter()
            tps = tokens_since / max(now - t_since, 1e-9)
            row = {"step": done, "tokens": done * plan.tokens_per_step, "loss": loss_val, "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": tps, "elapsed_s": prior_wall + now - t0, **validated}
            if main:
                append_jsonl(metrics_path, row)
            tracker.log(row, step=done)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}")
            tokens_since, t_since = 0, now
        if done < plan.steps and ((ckpt_steps and done % ckpt_steps == 0)
                                  or (ckpt_seconds and distributed.any_rank(
                                      time.perf_counter() - t_ckpt >= ckpt_seconds))):
            checkpoint(done)
            last_ckpt, t_ckpt = done, time.perf_counter()
        bar.update(1)
        crash_point("step")
        if stop:
            if main:
                bar.write(f"[ttt-bench] early stop at step {done}: {early_stop.metric} "
                          f"{validated[early_stop.metric]:.4f} >= {early_stop.threshold}")
            break
    bar.close()
    wall = prior_wall + time.perf_counter() - t0
    end = plan.steps if stopped_at is None else int(stopped_at)
    trained_steps = end - start_step
    if trained_steps or not (ckpt_path.exists() or distributed.latest_sharded(run_dir)):
        checkpoint(end)
    return {
        "steps": end,
        "planned_steps": plan.steps,
        "early_stop_step": stopped_at,
        "tokens": end * plan.tokens_per_step,
        "batch_seqs": plan.seqs_per_step,
        "micro_batch": plan.micro_batch,
        "parallel": parallel,
        "optimizer": optimizer_name(optimizer),
        "world_size": distributed.world_size(),
        "recompute_blocks": lm.recompute_blocks,
        "train_loss": loss_val,
        "train_wall_s": wall,
        # throughput of the steps this process ran (a resumed run does not count earlier steps)
        "tokens_per_s": trained_steps * plan.tokens_per_step / max(time.perf_counter() - t0, 1e-9)
        if trained_steps else None,
    }
