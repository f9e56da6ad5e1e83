"""Zero-shot evaluation of finished runs through lm-evaluation-harness: `make eval`.

    python -m bench.harness --run RESULTS/runs/<sweep>[/<run>] [--tasks local|a,b] [--limit N] [--online]

`RunLM` (registered with lm-eval as `ttt-bench`) wraps any finished language-modeling run of any
architecture, loaded from its run folder (config.yaml + checkpoint.pt):

  loglikelihood          batched forward passes over context + continuation, truncated on the left to
                         the run's context; (sum of log-probabilities, continuation is the greedy one)
  loglikelihood_rolling  a model whose decode state has a fixed size (TTT, Mamba) reads the whole
                         document through that state, a context at a time; one whose state grows with
                         the length (attention's KV cache) reads disjoint windows of its context, each
                         predicting from the window before it (lm-eval's rolling windows, context_len 1)
  generate_until         greedy decoding through the model's decode cache: one prefill, then a token at
                         a time, stopped at the first stop sequence or max_gen_toks

The local tasks (tasks/harness/*.yaml, tag `ttt_local`) read JSON files generated from the suite's own
held-out text, so `make eval` runs offline; stock lm-eval tasks (hellaswag, lambada_openai, ...) need
--online (ONLINE=1) to download their data. Results go into each run's summary.json as
`eval_<task>_<metric>` (and `_stderr`), then summary.csv, RESULTS/eval.md and the run's W&B logger.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

TASK_DIR = Path(__file__).resolve().parent.parent / "tasks" / "harness"
LOCAL_TASKS = ("ttt_shakespeare_mc", "ttt_shakespeare_lastword", "ttt_shakespeare_rolling", "ttt_passkey")


class UsageError(ValueError):
    pass


def load_run(run_dir: Path, device: torch.device):
    """(model in eval mode, tokenizer, run config) of a finished run folder."""
    from omegaconf import OmegaConf

    from bench.config import model_config
    from bench.train import CHECKPOINT, load_checkpoint
    from tasks import build_task

    if not (run_dir / "config.yaml").exists() or not (run_dir / CHECKPOINT).exists():
        raise UsageError(f"{run_dir} is not a finished run folder (it needs config.yaml and {CHECKPOINT})")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    runner = cfg.task.get("runner", cfg.task.name)
    if runner not in ("lm", "longqa"):
        raise UsageError(f"{run_dir.name} trained a {runner} model (a classifier); lm-eval needs a language model")
    task = build_task(cfg, int(cfg.ctx))
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None:
        from tasks.lm.tokenizers import ByteTokenizer

        tokenizer = ByteTokenizer()  # longqa: bytes, plus symbols no text maps to
    model = task.build_model(model_config(cfg, task.vocab_size).cfg)
    state = load_checkpoint(run_dir / CHECKPOINT, torch.device("cpu"))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, cfg


def has_fixed_state(model, ctx: int) -> bool:
    """True when the decode state does not grow with the length (TTT, Mamba): such a model can read a
    document of any length through its state. Attention's KV cache grows: it reads windows of ctx."""
    import architectures

    count = architectures.get(model.cfg.arch).count
    return count(model.cfg, ctx).state_numbers == count(model.cfg, 2 * ctx).state_numbers


@register_model("ttt-bench")
class RunLM(LM):
    def __init__(self, run_dir: str | Path | None = None, model=None, tokenizer=None, max_length: int | None = None,
                 batch_size: int = 16, device: str = "auto"):
        """A run folder (run_dir), or a model and tokenizer directly (max_length: the context it trained at)."""
        super().__init__()
        from bench.train import autocast_for, pick_device

        self.device_ = pick_device(device)
        if run_dir is not None:
            model, tokenizer, cfg = load_run(Path(run_dir), self.device_)
            max_length = int(cfg.ctx)
        if model is None or tokenizer is None or not max_length:
            raise UsageError("RunLM needs run_dir, or model, tokenizer and max_length")
        self.model, self.tok, self.max_length = model.eval(), tokenizer, int(max_length)
        self.batch_size = int(batch_size)
        self.autocast, _ = autocast_for(self.device_, "auto")
        self.fixed_state = has_fixed_state(model, self.max_length)
        self.eos = int(tokenizer.eos_id)

    # --- tokens -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split where the whole text's tokens split: trailing
        spaces of the context move to the continuation (as lm-eval's Hugging Face model does), and the
        continuation is the whole text's tokens after the longest run of them that spells a prefix of the
        context, so a token merged across the boundary (BPE) is scored, once, as part of the continuation.
        An empty context is EOS."""
        spaces = len(context) - len(context.rstrip(" "))  # (ctx + cont == the whole text's tokens, always)
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eos], self.encode(continuation)
        whole = self.encode(context + continuation)
        cut = min(len(self.encode(context)), len(whole) - 1)
        while cut > 0 and not context.startswith(self.tok.decode(whole[:cut])):
            cut -= 1  # a token spans the boundary ("win" + "ter" -> "winter"): it goes to the continuation
        return (whole[:cut], whole[cut:]) if cut else ([self.eos], whole)

    # --- scoring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax (T_i, V) for each input, batched by length with right padding (causal models:
        padding after a sequence does not change its positions)."""
        width = max(len(x) for x in inputs)
        batch = torch.full((len(inputs), width), self.eos, dtype=torch.long)
        for i, x in enumerate(inputs):
            batch[i, :len(x)] = torch.tensor(x)
        with self.autocast():
            logits = self.model(batch.to(self.device_))  # (B, T, V)
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        return [logp[i, :len(x)] for i, x in enumerate(inputs)]

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) for token-id pairs, the input cut on
        the left to max_length."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            inputs, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("an empty continuation has no log-likelihood")
                if len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens exceeds the run's context "
                                     f"{self.max_length}")
                inputs.append((ctx + cont)[-(self.max_length + 1):][:-1])
                conts.append(cont)
            for i, logp, cont in zip(idx, self._logprobs(inputs), conts):
                tail = logp[-len(cont):]  # (n_cont, V): the positions that predict the continuation
                target = torch.tensor(cont)
                ll = float(tail.gather(1, target[:, None]).sum())
                out[i] = (ll, bool((tail.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(*r.args) for r in requests])

    @torch.no_grad()
    def rolling_through_state(self, tokens: list[int]) -> float:
        """log P(document) read through the decode state, max_length tokens per forward, EOS first."""
        state = self.model.new_state(1, len(tokens))
        inputs = torch.tensor([self.eos] + tokens[:-1]).view(1, -1)
        target = torch.tensor(tokens)
        total = 0.0
        for a in range(0, len(tokens), self.max_length):
            with self.autocast():
                logits = self.model(inputs[:, a:a + self.max_length].to(self.device_), state)  # (1, t, V)
            logp = F.log_softmax(logits[0].float(), dim=-1).cpu()
            total += float(logp.gather(1, target[a:a + self.max_length, None]).sum())
        return total

    def rolling_in_windows(self, tokens: list[int]) -> float:
        """log P(document) over disjoint windows of max_length predicted tokens, each window's input
        starting with the token before it (EOS for the first): what `evaluate_lm` scores."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = [make_disjoint_window(w) for w in
                   get_rolling_token_windows(tokens, self.eos, self.max_length, context_len=1)]
        return sum(ll for ll, _ in self.score(windows))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            tokens = self.encode(r.args[0])
            if not tokens:
                out.append(0.0)
                continue
            out.append(self.rolling_through_state(tokens) if self.fixed_state else self.rolling_in_windows(tokens))
        return out

    # --- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new: int, until: list[str]) -> str:
        """Greedy continuation of `prompt` through the decode cache, cut at the first stop sequence."""
        if not self.fixed_state:  # the KV cache holds max_length tokens: keep the prompt's end
            prompt = prompt[-max(1, self.max_length - max_new):]
        state = self.model.new_state(1, len(prompt) + max_new)
        with self.autocast():
            logits = self.model(torch.tensor([prompt], device=self.device_), state)[:, -1]  # (1, V)
        generated: list[int] = []
        for step in range(max_new):
            nxt = logits.float().argmax(-1, keepdim=True)  # (1, 1)
            generated.append(int(nxt))
            text = self.tok.decode(generated)
            if any(s and s in text for s in until):
                break
            if step + 1 < max_new:
                with self.autocast():
                    logits = self.model(nxt, state)[:, -1]
        text = self.tok.decode(generated)
        cut = min([text.index(s) for s in until if s and s in text], default=len(text))
        return text[:cut]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("ttt-bench decodes greedily; this task asks for sampling (do_sample/temperature)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.encode(context) if context else [self.eos]
            out.append(self.greedy(prompt, int(kwargs.get("max_gen_toks", 256)), until))
        return out


# --- make eval ----------------------------------------------------------------------------------------
def run_folders(path: Path) -> list[Path]:
    """A run folder, or every finished (status ok) run of a sweep folder or of RESULTS/runs."""
    import json

    if (path / "config.yaml").exists():
        return [path]
    runs = []
    for summary in sorted(path.glob("**/summary.json")):
        if json.loads(summary.read_text(encoding="utf-8")).get("status") == "ok":
            runs.append(summary.parent)
    if not runs:
        raise UsageError(f"no finished run under {path} (expected RESULTS/runs/<sweep>[/<run>])")
    return runs


def task_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for n in names or ["local"]:
        out += list(LOCAL_TASKS) if n == "local" else [n]
    return list(dict.fromkeys(out))


def metric_columns(results: dict) -> dict[str, float]:
    """lm-eval's results -> {eval_<task>_<metric>[_stderr]: value} (numbers only)."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _filter = key.split(",", 1)
            out[f"eval_{task}_{metric}"] = float(value)
    return out


def evaluate_run(run_dir: Path, tasks: list[str], limit, batch_size: int, device: str, task_manager) -> dict:
    import lm_eval

    lm = RunLM(run_dir, batch_size=batch_size, device=device)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit, task_manager=task_manager,
                                  log_samples=False, verbosity="ERROR", bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    cols = metric_columns(res["results"])
    cols["eval_wall_s"] = time.perf_counter() - t0
    cols["eval_limit"] = limit
    return cols


def record(run_dir: Path, cols: dict) -> None:
    """Merge the columns into summary.json and the run's W&B logger (an `-eval` run beside the training run)."""
    import json

    from omegaconf import OmegaConf

    from bench.results import atomic_write_json
    from bench.tracking import build_tracker

    path = run_dir / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    summary.update(cols)
    atomic_write_json(path, summary)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    tracker = build_tracker(cfg.logger, str(run_dir), f"{run_dir.name}-eval", str(cfg.sweep_id),
                            OmegaConf.to_container(cfg, resolve=True))
    tracker.summary(cols)
    tracker.finish()


def results_root(run_dir: Path) -> Path:
    """RESULTS for RESULTS/runs/<sweep>/<run>."""
    return run_dir.parent.parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder, a sweep folder (RESULTS/runs/<sweep>) or RESULTS/runs")
    p.add_argument("--tasks", default="local", help=f"comma list; 'local' = {', '.join(LOCAL_TASKS)}")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--online", action="store_true", help="let lm-eval download stock tasks' data")
    args = p.parse_args(argv)
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices about custom datasets and defaults
    if not args.online:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.limit is not None and not (args.limit > 0 and (args.limit < 1 or args.limit == int(args.limit))):
            raise UsageError(f"LIMIT must be a whole number of examples per task or a fraction in (0, 1); "
                             f"got {args.limit:g}")
        if args.batch_size <= 0:
            raise UsageError(f"--batch-size must be positive; got {args.batch_size}")
        runs = run_folders(Path(args.run).expanduser().resolve())
        tasks = task_names(args.tasks)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.tasks import TaskManager

    stock = [t for t in tasks if t not in LOCAL_TASKS]
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=bool(stock))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        print(f"error: unknown lm-eval task(s) {', '.join(unknown)}; local: {', '.join(LOCAL_TASKS)}", file=sys.stderr)
        return 2
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    failed = 0
    for i, run_dir in enumerate(runs, 1):
        print(f"[ttt-bench] eval {i}/{len(runs)} {run_dir.name}: {', '.join(tasks)}", flush=True)
        try:
            cols = evaluate_run(run_dir, tasks, limit, args.batch_size, args.device, manager)
        except Exception as e:  # one run's failure is reported; the others go on
            failed += 1
            print(f"[ttt-bench] eval of {run_dir.name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        record(run_dir, cols)
        shown = {k[5:]: v for k, v in cols.items() if k.startswith("eval_ttt") or (k.startswith("eval_")
                 and not k.endswith("_stderr") and k not in ("eval_wall_s", "eval_limit"))}
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items() if not k.endswith("_stderr"))
              + f"  ({cols['eval_wall_s']:.0f}s)", flush=True)
    from bench.report import report

    roots = {results_root(r) for r in runs}
    for root in roots:
        report(root)
        print(f"[ttt-bench] {root / 'summary.csv'} (eval_* columns), {root / 'eval.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
