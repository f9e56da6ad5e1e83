"""Tokenizers: byte-level by default (no download, bits per byte is exact), or any Hugging Face
tokenizer by name for users with network access or a local cache."""
from __future__ import annotations

import numpy as np
import torch


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus EOS = 256 between documents."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """(V,) number of UTF-8 bytes each token stands for (EOS stands for none)."""
        nb = torch.ones(self.vocab_size, dtype=torch.long)
        nb[self.eos_id] = 0
        return nb


class HFTokenizer:
    """Any `transformers.AutoTokenizer` by name (e.g. meta-llama/Llama-2-7b-hf, gpt2)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # offline, gated, or a typo: say which tokenizer failed
            raise RuntimeError(f"could not load Hugging Face tokenizer {name!r}: {e}") from e
        self.name = name
        self.vocab_size = len(self.tok)
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no EOS token to join documents with")
        self.eos_id = int(self.tok.eos_token_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def token_bytes(self) -> torch.Tensor:
        nb = torch.zeros(self.vocab_size, dtype=torch.long)
        for i in range(self.vocab_size):
            if i not in self.tok.all_special_ids:
                nb[i] = len(self.tok.decode([i]).encode("utf-8"))
        return nb


def build_tokenizer(spec: str):
    """'byte' or 'hf:<name>'."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        return HFTokenizer(spec[3:])
    raise ValueError(f"tokenizer must be 'byte' or 'hf:<name>', got {spec!r}")
