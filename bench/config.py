"""The one config path: conf/ read the way the Hydra app reads it, for the app and for every tool.

    compose(["arch=ttt_linear", "size=cpu-xs", "ctx=32k"])   the config `python -m bench.run` runs with
    model_config(cfg, vocab)                                  the sized model that config trains
    parse_ctx("2k") == 2048                                   the command line's vocabulary (CTX=, ARCH=, LRS=)

`make sizes` and `make throughput` resolve their models through compose() and model_config(), so a
profile, a task's budget (conf/budget/<task>_<profile>.yaml) or a free override reaches them as it
reaches a training run. Each default is written once: an architecture's options in its ArchSpec
(architectures/registry.py), stored as the config node arch/options/<name> that conf/arch/<name>.yaml
starts from; conf/config.yaml (match, ffn, tied embeddings), the profile (its ladder, its match), the
task's budget (its ladder, its contexts).
"""
from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

import architectures
from architectures.recipe import Recipe
from architectures.sizing import SizeSpec, Sized, size_model
from bench.results import REPO_ROOT

CONF = REPO_ROOT / "conf"
DEFAULT_CTX = "2k"  # a sweep's context when neither CTX nor the task's budget gives one


class UsageError(ValueError):
    """Bad input on a command line: reported as one line, exit status 2."""


# -- each architecture's options, from its ArchSpec ---------------------------------------------------------

def store_arch_options() -> None:
    """Every architecture's options at their defaults (ArchSpec.options) as the config node
    arch/options/<name>, which conf/arch/<name>.yaml puts first in its defaults list: the YAML writes only
    what differs, and every option is in the composed config (a run's config.yaml) and can be overridden
    (arch.mini_batch=32, ARGS=arch.backend=dual)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in architectures.names():
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in architectures.get(name).options.items()}
        store.store(group="arch/options", name=name, node=options)


store_arch_options()


# -- the command line's vocabulary -----------------------------------------------------------------------

def group_options(group: str) -> list[str]:
    """The names a config group offers: conf/<group>/*.yaml."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def parse_ctx(text) -> int:
    """'2k' -> 2048, '32K' -> 32768, '256' -> 256 (an int passes through)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", str(text))
    if not m or int(m.group(1)) <= 0:
        raise UsageError(f"CTX must be a positive integer or a multiple of 1024 written like 2k, 8k, 32k; got {text!r}")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_ctxs(text: str) -> list[int]:
    """'2k' -> [2048]; '64,128' -> [64, 128]: a sweep over several contexts (one run each)."""
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"CTX must be a positive integer or a multiple of 1024 written like 2k, 8k, 32k; got {text!r}")
    return list(dict.fromkeys(parse_ctx(t) for t in items))


def parse_choice(kind: str, text: str, options: list[str]) -> str:
    if text not in options:
        raise UsageError(f"unknown {kind} {text!r}; available: {', '.join(options)}")
    return text


def parse_list(kind: str, text: str, options: list[str]) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"{kind} is empty; available: {', '.join(options)}")
    for item in items:
        parse_choice(kind, item, options)
    return list(dict.fromkeys(items))


def parse_archs(text: str) -> list[str]:
    """Names, a comma list, `all` (the main architectures, without the Table 1 ablation rows) or `table1`
    (the paper's Table 1 ladder, rows 1-8 in order; architectures/ttt/__init__.py: TABLE1)."""
    import architectures
    from architectures.ttt import TABLE1

    known = [a for a in architectures.names() if (CONF / "arch" / f"{a}.yaml").exists()]
    ladder = [name for _, _, name in TABLE1]
    text = str(text).strip()
    if text == "all":
        return [a for a in known if a not in ladder[:-2]]  # rows 7 and 8 are ttt_linear_base and ttt_linear
    if text == "table1":
        return ladder
    return parse_list("ARCH", text, known)


def parse_lrs(text: str) -> list[str]:
    """LRS=1e-4,4.6e-4,2.15e-3: positive learning rates, as written."""
    out = []
    for item in (t.strip() for t in str(text).split(",") if t.strip()):
        try:
            ok = 0 < float(item) < float("inf")
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"LRS must be a comma list of positive learning rates like 1e-4,4.6e-4; got {item!r}")
        out.append(item)
    if not out:
        raise UsageError("LRS is empty")
    return list(dict.fromkeys(out))


def parse_seeds(text: str) -> list[str]:
    """SEEDS=0,1,2: training seeds (non-negative integers, each once), as the config's `seed` reads them."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items or not all(re.fullmatch(r"\d+", t) for t in items):
        raise UsageError(f"SEEDS must be a comma list of non-negative integers like 0,1,2; got {text!r}")
    return list(dict.fromkeys(str(int(t)) for t in items))


# -- what a sweep runs by default -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sweep_defaults(task: str, profile: str) -> tuple[tuple[str, ...], tuple[int, ...], dict | None]:
    """(ladder, sweep_ctx, long_context) of the config composed for the task under the profile (one composition
    for all three)."""
    cfg = compose([f"task={task}", f"profile={profile}"])
    rule = cfg.get("long_context")
    return (tuple(cfg.ladder), tuple(int(c) for c in cfg.get("sweep_ctx") or ()),
            None if rule is None else OmegaConf.to_container(rule))


def default_ladder(task: str, profile: str, ctx: int | None = None) -> list[str]:
    """The sizes a sweep runs at `ctx`: the composed config's `ladder` (the profile's, unless the task's budget
    under the profile, conf/budget/<task>_<profile>.yaml, names its own), or the profile's long-context ladder
    from its `from_ctx` on (conf/profile/cpu.yaml: cpu-xs alone from 16k)."""
    ladder, _, rule = _sweep_defaults(task, profile)
    rule = None if ctx is None else long_context_at(rule, ctx)
    return list(ladder if rule is None else rule["ladder"])


def long_context(cfg: DictConfig) -> DictConfig | None:
    """The profile's long-context rule where it applies to the run's context: a floor of `min_steps` optimizer
    steps for every architecture (bench/train.py: run_tokens). None below it, or where the profile has none
    (smoke, paper)."""
    return long_context_at(cfg.get("long_context"), int(cfg.ctx))


def long_context_at(rule, ctx: int):
    """`rule` (a profile's `long_context`, as a config or a plain dict) if it applies at `ctx` (ctx >= its
    from_ctx), else None: the one test the run, the sweep's ladder and the fingerprint share."""
    return rule if rule is not None and ctx >= int(rule["from_ctx"]) else None


def default_ctxs(task: str, profile: str) -> list[int]:
    """The contexts a sweep runs when CTX is not given: the task budget's `sweep_ctx` (a protocol's grid
    points, e.g. TASK=mqar_zoology), else 2k."""
    return list(_sweep_defaults(task, profile)[1]) or [parse_ctx(DEFAULT_CTX)]


# -- composing a run's config -----------------------------------------------------------------------------

def normalize(cfg: DictConfig) -> DictConfig:
    """What the app fixes before anything reads the config: `ctx` in tokens (`ctx=2k` -> 2048), so that
    a run's fingerprint, folder name and summary are the same however the context was written."""
    try:
        cfg.ctx = parse_ctx(cfg.ctx)
    except UsageError as e:
        raise UsageError(f"ctx={cfg.ctx}: {e}") from None
    return cfg


def compose_all(override_lists: Iterable[Sequence[str]]) -> list[DictConfig]:
    """The configs `python -m bench.run <overrides>` would run with, one per list of overrides (Hydra's
    compose API over conf/, the app's own defaults list: profile, task budget and all)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or an open compose context
        return [_compose_one(o) for o in override_lists]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return [_compose_one(o) for o in override_lists]


def _compose_one(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return normalize(hydra_compose(config_name="config", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as e:  # an unknown group option or key: the user's input
        raise UsageError(f"{' '.join(overrides)}: {str(e).splitlines()[0]}") from None


def compose(overrides: Sequence[str]) -> DictConfig:
    """The config `python -m bench.run <overrides>` would run with."""
    return compose_all([overrides])[0]


def arch_config(name: str) -> dict:
    """conf/arch/<name>.yaml as the app composes it (with the base configs it builds on, conf/arch/base/),
    as a plain dict of options: `name`, the architecture's options, and `native` (its recipe) where it has one."""
    return copy.deepcopy(_composed_arch(name))


@functools.lru_cache(maxsize=None)
def _composed_arch(name: str) -> dict:
    return OmegaConf.to_container(compose([f"arch={name}"]).arch, resolve=True)


# -- from a config to the model it trains --------------------------------------------------------------

def arch_options(cfg: DictConfig) -> dict:
    """conf/arch/<name>.yaml's options, with `cfg.arch_options[<name>]` over them (a task's per-architecture
    settings, as Zoology's sweeps give each mixer its own kwargs: conf/budget/mqar_zoology_*.yaml)."""
    options = OmegaConf.to_container(cfg.arch, resolve=True)
    extra = cfg.get("arch_options")
    extra = OmegaConf.to_container(extra, resolve=True) if extra else {}
    return with_current_names({**options, **(extra.get(str(options["name"])) or {})})


def with_current_names(options: dict) -> dict:
    """Options of a run config written before the renames (a run folder's config.yaml, for `make eval` or
    a resumed run) in today's spelling: attention's attn_backend and TTT's impl are `backend` (TTT:
    backend=torch with impl=X, or auto with impl=X as it ran on CPU, is X)."""
    options = dict(options)
    if "attn_backend" in options:
        options.setdefault("backend", options.pop("attn_backend"))
    if "impl" in options:
        impl = options.pop("impl")
        if impl != "auto" and options.get("backend", "auto") in ("auto", "torch"):
            options["backend"] = impl
    return options


def training_recipe(cfg: DictConfig) -> Recipe:
    """cfg.recipe (conf/recipe/: native, the arch's `native:` block; or shared) as a Recipe. Run configs
    older than the option trained with the shared recipe, and get it."""
    if cfg.get("recipe") is None:
        return Recipe()
    if cfg.recipe.get("name") == "native" and "native" not in cfg.arch:
        raise ValueError(f"recipe=native: conf/arch/{cfg.arch.name}.yaml has no `native:` recipe; add one "
                         f"(architectures/recipe.py) or use recipe=shared")
    return Recipe.from_dict(OmegaConf.to_container(cfg.recipe, resolve=True))


def model_config(cfg: DictConfig, vocab_size: int) -> Sized:
    """The architecture's options at the size, matched to the size's reference Transformer by
    `cfg.match` (params or flops; architectures/sizing.py), trained by the recipe `cfg.recipe`."""
    options = arch_options(cfg)
    name = options.pop("name")
    tied = bool(cfg.get("tie_embeddings", True))  # run configs older than the option: tied
    return size_model(str(name), options, SizeSpec.from_dict(cfg.size), int(cfg.ctx), vocab_size, str(cfg.match),
                      tie_embeddings=tied, recipe=training_recipe(cfg), ffn=bool(cfg.get("ffn", True)))
