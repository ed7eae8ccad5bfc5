"""Rotary position embeddings (spec §11): frequencies, Llama-3 scaling, and their application."""
from __future__ import annotations

import math

import torch


def inverse_frequencies(dim: int, base: float, use_llama3_scaling: bool = False,
                        scaling_factor: float = 8.0) -> torch.Tensor:
    """`1 / base^(2i/dim)` for i < dim/2, optionally rescaled the Llama-3.1 way."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if use_llama3_scaling:
        inv_freq = _llama3_scale(inv_freq, scaling_factor)
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, factor: float, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, original_max_pos: int = 8192) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated
    # (Llama 3.1 report; same constants as Megatron's and HF's defaults).
    low_wavelen = original_max_pos / low_freq_factor
    high_wavelen = original_max_pos / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False,
                   interpolation_factor: float | None = None, dtype=torch.float32):
    """cos/sin tables for the given positions: `[b, s]` ids -> two `[s, b, 1, d]` tensors."""
    pos = position_ids.t().to(torch.float32)  # [s, b]
    if interpolation_factor is not None:
        pos = pos / interpolation_factor
    freqs = pos[..., None] * inv_freq.to(pos.device)  # [s, b, d/2]
    if interleaved:
        emb = torch.repeat_interleave(freqs, 2, dim=-1)  # [s, b, d] pairs (f0, f0, f1, f1, ...)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # [s, b, d] halves (f0..fn, f0..fn)
    return emb.cos()[:, :, None, :].to(dtype), emb.sin()[:, :, None, :].to(dtype)


def _rotate_half(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack((-odd, even), dim=-1).flatten(-2)
    x1, x2 = t.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate the first `d = cos.shape[-1]` channels of `t` `[s, b, heads, head_dim]`."""
    d = cos.shape[-1]
    if d == t.shape[-1]:
        return t * cos + _rotate_half(t, interleaved) * sin
    rot, rest = t[..., :d], t[..., d:]  # rotary_percent < 1: remaining channels pass through
    return torch.cat((rot * cos + _rotate_half(rot, interleaved) * sin, rest), dim=-1)
