"""Training on several processes: the process group, DDP or FSDP2, and sharded checkpoints.

    torchrun --standalone --nproc_per_node 2 -m bench.run arch=transformer size=cpu-xs
    make sweep ... NPROC=8                          (one node: torchrun over 8 GPUs)
    make sweep ... LAUNCHER=slurm NODES=2 GPUS_PER_NODE=8   (a SLURM job of 16 tasks per run)

`trainer.parallel`: none | ddp | fsdp | auto (none for one process; fsdp from FSDP_MIN_PARAMS parameters,
the paper's sizes; ddp below). FSDP2 follows torchtitan (torchtitan/models/llama3/infra/parallelize.py):
`fully_shard` on every block, then on the whole model (embedding, final norm and the tied head form the
root group); on CUDA with bf16 the blocks all-gather bf16 parameters and reduce-scatter fp32 gradients
(MixedPrecisionPolicy); on CPU everything stays fp32.

The data are the same whatever the world size: every rank builds the step's whole global batch (a pure
function of the step) and trains on its rank-th slice (bench/train.py, Plan.split). Rank 0 writes the
logs, metrics, summaries and W&B; every rank writes its shards of the checkpoint.

Sharded checkpoints (torch.distributed.checkpoint), one folder per save:

    RUN_DIR/checkpoint.dcp/step-00000040/   .metadata, __<rank>_0.distcp, meta.json (step, identity, ...)
    RUN_DIR/checkpoint.dcp/latest           "step-00000040", written atomically once the folder is whole

A kill at any point leaves `latest` naming a whole checkpoint. Keys are parameter names (no DDP/FSDP
prefixes), so any world size, and a one-process run, loads them.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from bench.results import atomic_write_text, remove_stale_temporaries

PARALLEL = ("none", "ddp", "fsdp", "auto")
FSDP_MIN_PARAMS = 100_000_000  # auto: shard the paper's sizes (125M and up); replicate the smaller CPU ladder
# rank 0 evaluates each run alone while the others wait at the next run's first collective
TIMEOUT = timedelta(hours=2)
SHARDED = "checkpoint.dcp"
LATEST = "latest"


# ---- the process group -------------------------------------------------------------------------------

def export_submitit_env() -> None:
    """In a submitit job of several tasks (SLURM, or the local executor), export what torchrun would set
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): each task is one rank."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def init(parallel: str, device_request: str) -> None:
    """Join the process group torchrun (or a submitit job) describes: gloo on CPU, nccl on CUDA. One
    process asking for ddp or fsdp gets a group of one. Idempotent: a multirun's runs share the group."""
    if dist.is_initialized():
        return
    export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and parallel not in ("ddp", "fsdp"):
        return
    cuda = torch.cuda.is_available() and not device_request.startswith("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=TIMEOUT)  # env://: RANK, WORLD_SIZE, MASTER_ADDR/PORT
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT)
    atexit.register(shutdown)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """cuda -> cuda:LOCAL_RANK (modulo the GPUs this task sees) under a process group; else unchanged."""
    if device.type != "cuda" or device.index is not None or not dist.is_initialized():
        return device
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def broadcast(obj):
    """Rank 0's `obj` on every rank (a picklable value); itself for one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def mean(value: float) -> float:
    """The mean of `value` over the ranks (each rank's loss over its equal slice: the step's loss)."""
    return value if world_size() == 1 else _all_sum([value])[0] / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (decisions every rank must take together)."""
    return bool(flag) if world_size() == 1 else _all_sum([float(bool(flag))])[0] > 0


# ---- wrapping the model ------------------------------------------------------------------------------

def resolve_mode(requested: str, n_params: int) -> str:
    """trainer.parallel -> none | ddp | fsdp for this world size and model."""
    requested = str(requested)
    if requested not in PARALLEL:
        raise ValueError(f"trainer.parallel must be one of {PARALLEL}; got {requested!r}")
    world = world_size()
    if requested == "auto":
        return "none" if world == 1 else ("fsdp" if n_params >= FSDP_MIN_PARAMS else "ddp")
    if requested == "none" and world > 1:
        raise ValueError(f"trainer.parallel=none with {world} processes would train {world} copies into one "
                         f"folder; use ddp, fsdp or auto")
    return requested


def wrap(model: torch.nn.Module, mode: str, device: torch.device, precision: str) -> torch.nn.Module:
    """The module the training step calls: `model` itself (none), a DDP wrapper, or `model` sharded in
    place with FSDP2 (its parameters become DTensors; build the optimizer after this)."""
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        return _fully_shard(model, device, bf16=device.type == "cuda" and precision == "bf16")
    raise ValueError(f"unknown parallel mode {mode!r}")


def _fully_shard(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    blocks = getattr(model, "lm", model).blocks  # a classifier's language model holds the blocks
    for i, block in enumerate(blocks):
        # the last block's parameters are gathered again at once for backward: keep them (torchtitan)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def grad_sync(wrapped: torch.nn.Module, mode: str, last: bool):
    """Gradient accumulation: reduce gradients across ranks on the last micro-batch of a step only."""
    if mode == "ddp" and not last:
        return wrapped.no_sync()
    if mode == "fsdp":
        wrapped.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over the whole model; under FSDP the norm of the sharded gradients
    is a DTensor that is summed over the ranks first."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def unsharded(model: torch.nn.Module, mode: str, build) -> torch.nn.Module | None:
    """On rank 0, a one-process module with the trained weights (for evaluation); None on the others.
    fsdp: every rank takes part in gathering the full state, rank 0 loads it into `build()`."""
    if mode != "fsdp":
        return model if is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    with torch.random.fork_rng(devices=[]):  # building draws an init that is overwritten at once
        plain = build()
    plain.load_state_dict(full)
    return plain


# ---- sharded checkpoints -----------------------------------------------------------------------------

def latest_sharded(run_dir: Path) -> Path | None:
    """The folder of the run's last whole sharded checkpoint, or None."""
    pointer = Path(run_dir) / SHARDED / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "meta.json").exists() else None


def saved_at(run_dir: Path) -> float:
    """When the last sharded checkpoint was completed (its pointer's mtime); 0 when there is none."""
    pointer = Path(run_dir) / SHARDED / LATEST
    return pointer.stat().st_mtime if pointer.exists() else 0.0


def save_sharded(run_dir: Path, model, optimizer, step: int, meta: dict) -> None:
    """Every rank writes its shards; rank 0 then writes meta.json and moves `latest` onto the new folder,
    and removes the older folders and a one-process checkpoint.pt (one checkpoint per run folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(run_dir) / SHARDED
    path = root / f"step-{step:08d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)  # returns once every rank wrote
    if not is_main():
        return
    atomic_write_text(path / "meta.json", json.dumps({"step": step, "world_size": world_size(), **meta}))
    atomic_write_text(root / LATEST, path.name)
    for old in root.glob("step-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(root)  # a pointer write a kill cut short
    (Path(run_dir) / "checkpoint.pt").unlink(missing_ok=True)


def remove_sharded(run_dir: Path) -> None:
    """After a one-process checkpoint.pt is written: the sharded one it replaces."""
    if (Path(run_dir) / SHARDED).exists():
        shutil.rmtree(Path(run_dir) / SHARDED, ignore_errors=True)


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def load_sharded(path: Path, model, optimizer) -> None:
    """Load a sharded checkpoint into `model` and `optimizer`, whatever world size saved it and whatever
    this one is (one process without a process group too): DCP reshards by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # this rank's shapes, filled in place
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # one process, no group: DCP says it loads in one process, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full(model, optimizer, state: dict) -> None:
    """A one-process checkpoint.pt (full tensors, the optimizer's state keyed by parameter index) into a
    DDP or FSDP model and its optimizer: the index keys become parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]  # state_dict()'s numbering
    osd = state["optimizer"]
    optim_sd = {"state": {names[i]: s for i, s in osd["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
