import pytest
import torch
from omegaconf import OmegaConf

from tasks.lm.data import Document, PackedWindows, load_corpus, pack, text_files
from tasks.lm.evaluate import evaluate_lm, position_buckets, unigram_bits_per_byte
from tasks.lm.tokenizers import ByteTokenizer, build_tokenizer

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
