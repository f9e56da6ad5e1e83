"""The lm-eval bridge (bench/harness.py): its numbers equal the model's own, for every kind of decode
state, and `make eval` runs the local tasks offline on a finished sweep."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tasks.lm.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
CTX = 64
TEXT = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n") * 3


def tiny(arch: str):
    from architectures import ModelConfig, build_model

    torch.manual_seed(0)
    options = {"backend": "sdpa"} if arch == "transformer" else {}
    if arch.startswith("ttt"):
        options = {"backend": "dual"}  # was misspelt "ttt_impl" and silently ignored until options were checked
    model = build_model(ModelConfig(arch, 257, 32, 2, 2, 64, CTX, options=options)).eval()
    for p in model.parameters():  # trained-looking weights: sharper distributions than the init
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def bridge(arch: str, batch_size: int = 4):
    from bench.harness import RunLM

    return RunLM(model=tiny(arch), tokenizer=ByteTokenizer(), max_length=CTX, batch_size=batch_size)


def req(*args):
    return SimpleNamespace(args=args)


ARCHS = ["transformer", "ttt_linear", "mamba"]


@pytest.mark.parametrize("arch", ARCHS)
def test_loglikelihood_equals_a_direct_forward(arch):
    lm = bridge(arch)
    pairs = [(TEXT[:40], TEXT[40:52]), (TEXT[:7], " is"), (TEXT[100:190], TEXT[190:230]), ("", "Now"),
             (TEXT[:200], TEXT[200:210])]  # the last is longer than the context: cut on the left
    got = lm.loglikelihood([req(c, k) for c, k in pairs])
    for (context, cont), (ll, greedy) in zip(pairs, got):
        c_ids, k_ids = lm.encode_pair(context, cont)
        full = (c_ids + k_ids)[-(CTX + 1):]
        with torch.no_grad():
            logp = F.log_softmax(lm.model(torch.tensor([full[:-1]]))[0].float(), -1)  # (T, V)
        tail = logp[-len(k_ids):]
        want = float(tail.gather(1, torch.tensor(k_ids)[:, None]).sum())
        assert ll == pytest.approx(want, abs=1e-4, rel=1e-5)
        assert greedy == bool((tail.argmax(-1) == torch.tensor(k_ids)).all())


def test_rolling_in_windows_equals_the_lm_evaluation():
    """The Transformer (a KV cache that grows) reads a long document in disjoint context windows: exactly
    the windows `evaluate_lm` scores, so the total log-likelihood is its loss x tokens."""
    from tasks.lm.data import PackedWindows
    from tasks.lm.evaluate import evaluate_lm

    lm = bridge("transformer")
    assert not lm.fixed_state
    tokens = lm.encode(TEXT)[: 4 * CTX]
    ll = lm.loglikelihood_rolling([req(ByteTokenizer().decode(tokens))])[0]
    windows = PackedWindows(torch.tensor([256] + tokens), CTX, "validation")
    ev = evaluate_lm(lm.model, windows, ByteTokenizer().token_bytes(), 2, torch.device("cpu"),
                     __import__("contextlib").nullcontext)
    assert -ll == pytest.approx(ev["val_loss"] * 4 * CTX, rel=1e-5)


@pytest.mark.parametrize("arch", ["ttt_linear", "mamba"])
def test_rolling_through_the_state_equals_one_forward_over_the_document(arch):
    """A fixed-size state reads a document of 3.4 contexts a context at a time and gets what one forward
    over the whole document gives."""
    lm = bridge(arch)
    assert lm.fixed_state
    tokens = lm.encode(TEXT)[: int(3.4 * CTX)]
    ll = lm.loglikelihood_rolling([req(ByteTokenizer().decode(tokens))])[0]
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([[256] + tokens[:-1]]))[0].float(), -1)
    want = float(logp.gather(1, torch.tensor(tokens)[:, None]).sum())
    assert ll == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_until_equals_generate(arch):
    lm = bridge(arch)
    prompt = TEXT[:50]
    ids = torch.tensor([lm.encode(prompt)])
    text = ByteTokenizer().decode(lm.model.generate(ids, 12, temperature=0)[0, ids.shape[1]:].tolist())
    assert lm.generate_until([req(prompt, {"until": [], "max_gen_toks": 12})]) == [text]
    stop = text[3:5]  # a stop sequence the greedy text contains: the output ends before it
    got = lm.generate_until([req(prompt, {"until": [stop], "max_gen_toks": 12})])[0]
    assert got == text[:text.index(stop)]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([req(prompt, {"do_sample": True})])


def test_context_continuation_split_byte_and_bpe(tmp_path):
    """ctx + cont are always the whole text's tokens; trailing spaces of the context move to the
    continuation; with a BPE tokenizer a merge across the boundary goes to the continuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bench.harness import RunLM
    from tasks.lm.tokenizers import HFTokenizer

    lm = bridge("transformer")
    c, k = lm.encode_pair("The pass key is ", "12345")
    assert bytes(c) == b"The pass key is" and bytes(k) == b" 12345"

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = HFTokenizer(str(tmp_path))
    hf = RunLM(model=lm.model, tokenizer=tok, max_length=CTX)
    merged = 0
    for context, cont in [("Now is the win", "ter of our"), ("Made glorious ", "summer"), ("", "Now is"),
                          ("In the deep bo", "som of the ocean")]:
        c, k = hf.encode_pair(context, cont)
        whole = list(tok.encode(context + cont))
        assert (c + k == whole) if context else (c == [tok.eos_id] and k == whole)
        assert context.startswith(tok.decode(c)) if context else True
        assert tok.decode(k).endswith(cont)  # the continuation's text, plus any token spanning the boundary
        merged += len(tok.decode(k)) > len(cont) + (context != context.rstrip(" "))
    assert merged, "no case exercised a token merged across the boundary"


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    results = tmp_path_factory.mktemp("eval")
    res = subprocess.run([sys.executable, "-m", "bench.sweep", "--arch", "transformer,ttt_linear", "--ctx", "128",
                          "--profile", "smoke", "--sizes", "smoke-xs", "--results", str(results), "--",
                          "logger=none", "trainer.quiet=true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return results


@pytest.mark.slow  # a smoke sweep, then make eval in a subprocess (~30 s); the bridge's math is tested above
def test_make_eval_runs_the_local_tasks_offline(smoke_sweep):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "bench.harness", "--run", str(smoke_sweep / "runs"), "--limit", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = ["eval_ttt_shakespeare_mc_acc", "eval_ttt_shakespeare_mc_acc_norm", "eval_ttt_shakespeare_lastword_acc",
               "eval_ttt_shakespeare_lastword_perplexity", "eval_ttt_shakespeare_rolling_bits_per_byte",
               "eval_ttt_passkey_exact_match"]
    for summary in smoke_sweep.glob("runs/*/*/summary.json"):
        s = json.loads(summary.read_text())
        for m in metrics:
            assert m in s and math.isfinite(s[m]), (summary, m)
        assert 0 <= s["eval_ttt_shakespeare_mc_acc"] <= 1
        # the rolling task scores held-out text as the LM evaluation does: a few steps in, near its val_bpb
        assert abs(s["eval_ttt_shakespeare_rolling_bits_per_byte"] - s["val_bpb"]) < 0.5
    with open(smoke_sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["eval_ttt_shakespeare_mc_acc"] != "" for r in rows)
    assert "shakespeare_mc_acc" in (smoke_sweep / "eval.md").read_text()


@pytest.mark.slow  # needs the smoke sweep above
def test_make_eval_refuses_what_it_cannot_do(smoke_sweep, tmp_path, capsys):
    from bench.harness import main

    assert main(["--run", str(tmp_path)]) == 2
    assert "no finished run under" in capsys.readouterr().err
    assert main(["--run", str(smoke_sweep / "runs"), "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["-3", "0", "2.5"])
def test_make_eval_refuses_a_limit_that_is_no_count_or_fraction(tmp_path, capsys, limit):
    """LIMIT=-3 reached lm-eval and failed each run with islice's message; now one line before any run."""
    from bench.harness import main

    assert main(["--run", str(tmp_path), "--limit", limit]) == 2
    assert capsys.readouterr().err.startswith("error: LIMIT must be a whole number of examples per task or a fraction")
