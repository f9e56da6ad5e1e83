"""The one backend contract every architecture follows.

An architecture names its backends, fastest first, each with a check that says why it cannot run here
(None when it can); the last is plain PyTorch, which always runs. `resolve` then applies one rule for all
of them, each under the one option name `backend` (attention: transformer.py; Mamba and Mamba-2:
mamba/layers.py; TTT: ttt/layer.py):
  auto     the first backend that runs here (and that auto may pick: `prefer`)
  a name   that backend, or BackendUnavailable with the reason: never a silent fall-back
  other    ValueError naming the choices
The model's `backends()` says what ran; every run's summary records it.
"""
from __future__ import annotations

import os
from typing import Callable

import torch


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run on this machine or these inputs."""


Check = Callable[[], "str | None"]  # None: runs here; else why not, as "needs ..."


def resolve(option: str, requested: str, checks: dict[str, Check],
            prefer: Callable[[str], bool] = lambda name: True) -> str:
    """The backend to run for `option=requested`. checks: every backend by name, fastest first, with its
    check. prefer(name) False: auto never picks it (it runs only when asked for, e.g. Triton's CPU
    interpreter)."""
    choices = ("auto", *checks)
    if requested not in choices:
        raise ValueError(f"{option} must be one of {choices}, got {requested!r}")
    if requested == "auto":
        return next(name for name, why in checks.items() if prefer(name) and why() is None)
    why = checks[requested]()
    if why is not None:
        others = ", ".join(f"{option}={c}" for c in choices if c != requested)
        raise BackendUnavailable(f"{option}={requested} {why}; use {others}")
    return requested


def runs() -> None:
    """The check of a backend that always runs (plain PyTorch)."""
    return None


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors, in Python (for tests; slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable() -> str | None:
    """The check of a Triton backend: triton installed, and CUDA (or the interpreter, TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs triton (pip install triton) and CUDA"
    if not (torch.cuda.is_available() or triton_interpreting()):
        return "needs triton and CUDA (or TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None
