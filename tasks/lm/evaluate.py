"""Language-model evaluation: loss, perplexity, bits per byte, and loss by token position."""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F


def position_buckets(ctx: int) -> list[tuple[int, int]]:
    """Log2-spaced buckets [start, end) of 1-based token positions: [1, 2), [2, 4), ..., [2^k, ctx + 1), the last
    one holding position ctx (a bucket of position ctx alone, at a power-of-two ctx, would be one token per
    window: a noisy last point on the plot)."""
    edges, e = [1], 2
    while e < ctx:
        edges.append(e)
        e *= 2
    edges.append(ctx + 1)
    return list(zip(edges[:-1], edges[1:]))


def unigram_bits_per_byte(text_bytes: bytes) -> float:
    """Entropy (bits) of the byte distribution of the text: what a model with no context achieves."""
    counts = torch.bincount(torch.frombuffer(bytearray(text_bytes), dtype=torch.uint8).long(), minlength=256)
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log2()).sum())


def _sem(values: list[float]) -> float | None:
    """Standard error of the mean of values (sample standard deviation / sqrt(n)); None below two values."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


@torch.no_grad()
def evaluate_lm(model, windows, token_bytes: torch.Tensor, batch_size: int, device, autocast) -> dict:
    """Mean next-token loss over every window of `windows` (a PackedWindows), and its by-position profile.

    val_bpb = sum of losses (nats) / ln 2 / number of UTF-8 bytes the target tokens stand for.
    val_loss_sem, val_bpb_sem: the standard error of the mean over windows (sample std / sqrt(windows); None with
    one window): how far the numbers move with the text evaluated (at 32k the CPU profile's 65,536 tokens are 2
    windows).
    val_window_loss: each window's mean loss (nats per token), in window order, and val_windows_hash the windows'
    tokens: two runs with the same hash evaluated the same text, so the difference of their losses can be taken
    window by window, where each window's own difficulty cancels (bench/gaps.py: make sweep's comparisons, make
    paper's gaps).
    """
    was_training = model.training
    model.eval()
    ctx = windows.ctx
    pos_sum = torch.zeros(ctx, dtype=torch.float64)
    window_nats, window_bytes = [], []
    for start in range(0, windows.n, batch_size):
        idx = list(range(start, min(start + batch_size, windows.n)))
        x, y = windows.batch(idx)
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)  # (B, T)
        pos_sum += nll.double().sum(0).cpu()
        window_nats += nll.double().sum(1).cpu().tolist()
        window_bytes += token_bytes[y.cpu()].sum(1).tolist()
    model.train(was_training)
    n_windows, total_nats, total_bytes = len(window_nats), float(pos_sum.sum()), sum(window_bytes)
    loss = total_nats / (n_windows * ctx)
    by_pos = pos_sum / n_windows  # (T,) mean loss at each position
    buckets = [{"start": a, "end": b - 1, "loss": float(by_pos[a - 1:b - 1].mean())} for a, b in position_buckets(ctx)]
    window_loss = [nats / ctx for nats in window_nats]  # (windows,) nats per token
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": total_nats / math.log(2) / max(total_bytes, 1),
        "val_loss_sem": _sem(window_loss),
        "val_bpb_sem": _sem([nats / math.log(2) / max(b, 1) for nats, b in zip(window_nats, window_bytes)]),
        "val_tokens": n_windows * ctx,
        "val_window_loss": window_loss,
        "val_windows_hash": windows.fingerprint(),
        "loss_by_position": buckets,
    }
