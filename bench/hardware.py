"""Peak dense matrix-multiply rates of known accelerators, for model FLOPs utilisation (MFU).

MFU = training FLOPs per token (architectures/accounting.py: 3 x forward) x tokens/s / the device's
peak dense bf16 rate (without sparsity). Peaks are the vendors' datasheet numbers; a device not in the
table (and every CPU) gets no MFU rather than a guess.
"""
from __future__ import annotations

# substring of torch.cuda.get_device_name() -> peak dense bf16 FLOP/s (datasheets, no 2:4 sparsity)
BF16_PEAK = {
    "H200": 989e12,       # NVIDIA H200 SXM (same tensor cores as H100 SXM)
    "H100 PCIe": 756e12,  # NVIDIA H100 PCIe
    "H100": 989e12,       # NVIDIA H100 SXM5
    "A100": 312e12,       # NVIDIA A100 (SXM and PCIe)
    "L40S": 362e12,       # NVIDIA L40S
    "A10G": 70e12,        # NVIDIA A10G (AWS)
    "L4": 121e12,         # NVIDIA L4
}


def peak_flops(device_name: str) -> float | None:
    """The table's peak for a device name (the first, most specific key that occurs in it), else None."""
    for key, peak in BF16_PEAK.items():
        if key in device_name:
            return peak
    return None


def mfu(train_flops_per_token: float, tokens_per_s: float | None, device_name: str) -> float | None:
    peak = peak_flops(device_name)
    if peak is None or not tokens_per_s:
        return None
    return train_flops_per_token * tokens_per_s / peak
