"""Task runners. Each task turns a config into data, a model head, a loss and an evaluation:
lm/ (language modeling), longqa/ (passkey, needles, variable tracking, MQAR), classification/ (ListOps,
your files, HF datasets). Runners register by name (tasks/registry.py); `build_task(cfg, ctx)` builds
the one a run's config names."""
from tasks.registry import build_task, names, register  # noqa: F401
from tasks.classification import task as _classification  # noqa: F401,E402  (each registers its runner)
from tasks.lm import task as _lm  # noqa: F401,E402
from tasks.longqa import task as _longqa  # noqa: F401,E402
