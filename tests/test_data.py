import pytest
import torch
from omegaconf import OmegaConf

from tasks.lm.data import Document, PackedWindows, load_corpus, pack, text_files
from tasks.lm.evaluate import evaluate_lm, position_buckets, unigram_bits_per_byte
from tasks.lm.tokenizers import ByteTokenizer, build_tokenizer
from bench.results import fold_last_position, read_summaries

CONF = OmegaConf.load


def shakespeare_cfg():
    return OmegaConf.load("conf/data/shakespeare.yaml")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "To be, or not to be — ça, 𝄞!\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(list(ids) + [tok.eos_id]) == text
    assert int(tok.token_bytes().sum()) == 256


def test_tokenizer_spec_is_checked():
    with pytest.raises(ValueError, match="tokenizer must be"):
        build_tokenizer("bpe")


def test_shakespeare_split_by_play_does_not_leak():
    corpus = load_corpus(shakespeare_cfg())
    assert len(corpus.train) + len(corpus.val) == 38
    assert {d.name for d in corpus.val} == {"hamlet", "twelfth-night", "henry-v"}
    assert not {d.name for d in corpus.train} & {d.name for d in corpus.val}
    # no validation line of dialogue longer than 60 characters occurs in the training text
    train_text = "\n".join(d.text for d in corpus.train)
    val_lines = {ln for d in corpus.val for ln in d.text.splitlines() if len(ln) > 60}
    assert val_lines and not [ln for ln in val_lines if ln in train_text][:1]


def test_unknown_validation_play_is_named():
    cfg = shakespeare_cfg()
    cfg.val_plays = ["hamlet", "the-bard-strikes-back"]
    with pytest.raises(ValueError, match="the-bard-strikes-back"):
        load_corpus(cfg)


def test_pycode_split_is_deterministic_and_disjoint():
    cfg = OmegaConf.load("conf/data/pycode.yaml")
    cfg.max_bytes = 2_000_000
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert [d.name for d in a.val] == [d.name for d in b.val] and a.val
    assert not {d.name for d in a.train} & {d.name for d in a.val}
    assert not any("/test/" in f"/{d.name}" for d in a.train + a.val)


def test_text_files_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        text_files([str(tmp_path / "no_such_file.txt")], 0.1)


def test_text_files_single_file_split(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abcdefghij" * 10)
    c = text_files([str(f)], 0.2)
    assert c.train[0].text + c.val[0].text == "abcdefghij" * 10
    assert len(c.val[0].text) == 20


def test_packing_and_windows_are_exact():
    tok = ByteTokenizer()
    stream = pack([Document("a", "hello"), Document("b", "world!")], tok)
    assert stream.tolist() == list(b"hello") + [256] + list(b"world!") + [256]
    w = PackedWindows(stream, ctx=4, split="training")
    assert w.n == 3  # 13 tokens -> windows of 5 overlapping by one
    x, y = w.batch([0, 2])
    assert x.shape == y.shape == (2, 4)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="fewer than one window"):
        PackedWindows(stream, ctx=64, split="validation")


def test_training_batches_are_a_function_of_the_step():
    w = PackedWindows(torch.arange(1001), ctx=10, split="training")
    first = [w.train_indices(s, 7, seed=3) for s in range(30)]
    again = [w.train_indices(s, 7, seed=3) for s in reversed(range(30))][::-1]
    assert first == again
    epoch = sum(first, [])[:100]
    assert sorted(epoch) == list(range(100))  # one epoch visits every window once
    assert first != [w.train_indices(s, 7, seed=4) for s in range(30)]


def test_position_buckets_cover_every_position():
    for ctx in (1, 7, 16, 2048, 3000):
        b = position_buckets(ctx)
        assert b[0][0] == 1 and b[-1][1] == ctx + 1
        assert all(x[1] == y[0] for x, y in zip(b, b[1:]))


def test_unigram_entropy():
    assert unigram_bits_per_byte(b"abab") == pytest.approx(1.0)
    assert unigram_bits_per_byte(b"aaaa") == pytest.approx(0.0)


def test_bpb_of_a_uniform_model_is_8_bits():
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 256)  # uniform over the 256 byte values

    tok = ByteTokenizer()
    w = PackedWindows(torch.from_numpy(tok.encode("x" * 200)).long(), ctx=16, split="validation")
    import contextlib

    out = evaluate_lm(Uniform(), w, tok.token_bytes(), 4, "cpu", contextlib.nullcontext)
    assert out["val_bpb"] == pytest.approx(8.0)
    assert out["val_loss"] == pytest.approx(torch.log(torch.tensor(256.0)).item())
    assert len(out["loss_by_position"]) == len(position_buckets(16))


@pytest.mark.parametrize("ctx", [1, 2, 3, 16, 20, 256, 32768])
def test_position_buckets_cover_every_position_once_in_log2_steps(ctx):
    buckets = position_buckets(ctx)
    assert buckets[0][0] == 1 and buckets[-1][1] == ctx + 1
    assert all(b[1] == n[0] for b, n in zip(buckets, buckets[1:]))  # contiguous: each position once
    assert all(b - a == a for a, b in buckets[:-1])  # [2^k, 2^(k+1))
    if ctx >= 3:  # the last position is not a bucket of its own (one token per window: a noisy point)
        assert buckets[-1][1] - buckets[-1][0] >= 2


def _buckets(per_position: torch.Tensor, edges: list[tuple[int, int]]) -> list[dict]:
    return [{"start": a, "end": b - 1, "loss": float(per_position[a - 1:b - 1].mean())} for a, b in edges]


def test_old_summaries_last_position_bucket_is_folded_as_evaluate_lm_buckets_now(tmp_path):
    import json

    ctx = 16
    per_position = torch.rand(ctx, dtype=torch.float64) * 5
    old_edges = [(1, 2), (2, 4), (4, 8), (8, 16), (16, 17)]  # before: position 16 alone
    new = _buckets(per_position, position_buckets(ctx))
    folded = fold_last_position(_buckets(per_position, old_edges))
    assert [(b["start"], b["end"]) for b in folded] == [(b["start"], b["end"]) for b in new]
    assert [b["loss"] for b in folded] == pytest.approx([b["loss"] for b in new], rel=1e-12)
    assert fold_last_position(new) == new  # today's buckets unchanged
    run = tmp_path / "runs" / "s" / "r"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"loss_by_position": _buckets(per_position, old_edges)}))
    assert read_summaries(tmp_path)[0]["loss_by_position"] == folded  # every report and plot reads them so


def test_validation_loss_and_bpb_carry_their_standard_error_over_windows():
    """evaluate_lm: val_loss_sem and val_bpb_sem are the standard error of the per-window means (sample std /
    sqrt(windows)), 0 for a model whose every window scores alike, None for one window."""
    import contextlib
    import math

    import torch.nn.functional as F

    class Repeat(torch.nn.Module):  # predicts that the next byte repeats this one
        def forward(self, x):
            return F.one_hot(x, 256).float() * 4.0

    tok = ByteTokenizer()
    text = "x" * 64 + "xy" * 32 + "é" * 40  # windows of runs, of alternation, of two-byte characters
    w = PackedWindows(torch.from_numpy(tok.encode(text)).long(), ctx=16, split="validation")
    out = evaluate_lm(Repeat(), w, tok.token_bytes(), 3, "cpu", contextlib.nullcontext)
    per_window_nats, per_window_bytes = [], []
    for i in range(w.n):
        x, y = w.batch([i])
        per_window_nats.append(float(F.cross_entropy(Repeat()(x)[0], y[0], reduction="sum")))
        per_window_bytes.append(int(tok.token_bytes()[y[0]].sum()))

    def sem(values):
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))

    assert w.n >= 4
    assert out["val_loss_sem"] == pytest.approx(sem([n / 16 for n in per_window_nats]), rel=1e-9)
    assert out["val_bpb_sem"] == pytest.approx(
        sem([n / math.log(2) / b for n, b in zip(per_window_nats, per_window_bytes)]), rel=1e-9)
    assert out["val_loss_sem"] > 0.1  # the windows differ
    assert out["val_window_loss"] == pytest.approx([n / 16 for n in per_window_nats], rel=1e-12)
    assert sum(out["val_window_loss"]) / w.n == pytest.approx(out["val_loss"], rel=1e-12)
    flat = evaluate_lm(Repeat(), PackedWindows(torch.from_numpy(tok.encode("x" * 100)).long(), ctx=16,
                                               split="validation"), tok.token_bytes(), 4, "cpu", contextlib.nullcontext)
    assert flat["val_loss_sem"] == pytest.approx(0.0, abs=1e-12) and flat["val_bpb_sem"] == pytest.approx(0.0, abs=1e-12)
    one = PackedWindows(torch.from_numpy(tok.encode("x" * 20)).long(), ctx=16, split="validation")
    single = evaluate_lm(Repeat(), one, tok.token_bytes(), 4, "cpu", contextlib.nullcontext)
    assert one.n == 1 and single["val_loss_sem"] is None and single["val_bpb_sem"] is None


def test_the_windows_hash_names_the_text_evaluated():
    """val_windows_hash: equal for the same tokens in the same windows (runs whose per-window losses pair up),
    different when the text, the context or the number of windows evaluated differs."""
    tok = ByteTokenizer()
    stream = torch.from_numpy(tok.encode("the quick brown fox " * 20)).long()
    w = PackedWindows(stream, ctx=16, split="validation")
    assert w.fingerprint() == PackedWindows(stream.clone(), ctx=16, split="validation").fingerprint()
    other = stream.clone()
    other[5] += 1
    assert PackedWindows(other, ctx=16, split="validation").fingerprint() != w.fingerprint()
    assert PackedWindows(stream, ctx=32, split="validation").fingerprint() != w.fingerprint()
    fewer = PackedWindows(stream, ctx=16, split="validation")
    fewer.n -= 1  # as LMTask cuts the validation windows to eval_tokens
    assert fewer.fingerprint() != w.fingerprint()
