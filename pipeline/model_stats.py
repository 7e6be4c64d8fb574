"""Model size accounting: parameter count and multiply-accumulates, as torch's FlopCounterMode counts them."""
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs of one forward pass on `x` (FlopCounterMode counts a MAC as two FLOPs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2
