"""What every architecture's backend choice shares: the error for a backend that was asked for and
cannot run here.

Each architecture resolves its own choice (attention: `resolve_attention_backend` in transformer.py;
Mamba: `resolve_backend` in mamba/layers.py; TTT: `resolve_ttt_backend` in ttt/layer.py): `auto` takes
the fastest that is present, a named backend that cannot run raises BackendUnavailable, never falls
back, and the model's `backends()` says what ran (recorded in every run's summary).
"""
from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run on this machine or these inputs."""
