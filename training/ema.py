"""Exponential moving averages of a network's weights, one update for all of them: the
training loop's EMAs (train.ema), a consistency model's target network (CD, CTM) and
cud-distill's own EMA of its student."""
from __future__ import annotations

import torch


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """The decay of the EMA update after optimizer step `step` (0-based). With warm-up it is
    min(decay, (1 + step) / (10 + step)): early EMAs follow the net instead of holding on to the
    random initial weights (after 1000 steps a plain 0.999 EMA is still 37% initial weights,
    which left short runs' samples speckled); from step 9000 on a 0.999 EMA is plain."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net for every parameter, in one fused update (a
    per-tensor loop is launch-bound on a GPU). Buffers are copied, not averaged: they are not
    trained by the optimizer (the U-Net's resampling filter and Fourier frequencies are
    constants), and an average evaluated with stale buffers would be a net that never was."""
    net = getattr(net, "module", net)  # DDP
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - decay)
    for be, bn in zip(ema.buffers(), net.buffers()):
        be.copy_(bn)
