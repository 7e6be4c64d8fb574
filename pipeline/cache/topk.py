"""The top-k encoding of a teacher's output distribution (store format 2): encode from logits, rebuild at T.

Per view the store keeps the k most probable classes, their log-probabilities at T = 1
(``log_softmax(z)``, fp16), and, for each cached temperature T, the log of the exact mass
the other C - k classes hold at T (fp32). Both are computed from the full logits in log
space: a log-probability is <= 0 and near 0 where the mass is, so fp16 rounding moves a
probability p by at most 2^-11 * |log p| of itself (0.05% at p = 1/e, 0.3% at p = 1e-3),
whatever the logit scale; the leftover is the log of a sum taken over log-probabilities, so
it never underflows or cancels (``1 - sum(p_i)`` does, for a confident teacher).

Rebuild at T. Inside the top-k, p_i(T) is proportional to exp(z_i / T), and so to
exp(lp_i / T) (lp_i = z_i - logsumexp(z)), hence

    log q_i = lp_i / T - logsumexp_j(lp_j / T) + log(1 - L_T)        (top-k classes)
    q_c     = L_T / (C - k)                                          (each other class)

which sums to 1, keeps the exact leftover L_T, and spreads it uniformly. It is never the
teacher renormalised over its top-k (which would put zero mass on the other classes while
the student is normalised over all C). With k = C, L_T = 0 (log -inf) and q is the exact
softmax at T. The training loss, ``verify`` and the precision benchmark rebuild through
``rebuild_log_probs``; ``inspect`` uses its top-k part, ``topk_log_mass``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# log of the smallest positive float32: keeps "zero" teacher mass finite so that
# p * log p stays 0 instead of 0 * -inf = NaN.
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)
FP16_MIN = torch.finfo(torch.float16).min


@dataclass
class TopkEncoding:
    """A batch of encoded views, in the dtypes the store keeps."""

    logprob: torch.Tensor  # [B, k] float16, log_softmax(logits) of the top-k classes, descending
    index: torch.Tensor  # [B, k] int64 class indices
    log_leftover: torch.Tensor  # [B, T] float32, log of the other classes' mass at each temperature


def encode_topk(logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> TopkEncoding:
    """Encode full logits [B, C] (any float dtype, any device) as the store keeps them."""
    index = logits.float().topk(k, dim=-1).indices  # ranked on the logits themselves: no ties made by rounding
    logprob = torch.log_softmax(logits.double(), dim=-1).gather(-1, index)
    # Clamped so that a class more than 65504 nats down stays finite in fp16.
    return TopkEncoding(logprob=logprob.clamp_min(FP16_MIN).half(), index=index,
                        log_leftover=leftover_log_mass(logits, index, temperatures))


def leftover_log_mass(logits: torch.Tensor, index: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """[B, T] float32: log of the softmax(logits / T) mass outside ``index`` [B, k]; -inf when k = C.

    In float64: the normaliser's float32 rounding (~1e-6 nats at logits ~10) would be a 0.3% error of
    a top-k mass of 3e-4 when the leftover is close to 1 (a flat teacher over 21843 classes).
    """
    logits = logits.double()
    columns = [torch.logsumexp(torch.log_softmax(logits / t, dim=-1).scatter(-1, index, -math.inf), dim=-1)
               for t in temperatures]
    return torch.stack(columns, dim=-1).float()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_log_mass(logprob: torch.Tensor, log_leftover: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q_i [..., k] of the top-k classes at ``temperature``; ``log_leftover`` [...] is L_T at that temperature."""
    scaled = logprob.to(log_leftover.dtype) / temperature
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True) + _log1mexp(log_leftover)[..., None]


def rebuild_log_probs(logprob: torch.Tensor, index: torch.Tensor, log_leftover: torch.Tensor, num_classes: int,
                      temperature: float) -> torch.Tensor:
    """The teacher's log-distribution [B, C] at ``temperature`` from its top-k encoding.

    ``logprob`` and ``index`` are [B, k]; ``log_leftover`` [B] is the stored value at this
    temperature. Float32 (float64 if ``log_leftover`` is), on the inputs' device.
    """
    log_leftover = log_leftover if log_leftover.dtype == torch.float64 else log_leftover.float()
    top = topk_log_mass(logprob, log_leftover, temperature)
    batch, k = top.shape
    others = num_classes - k
    if others > 0:
        rest = (log_leftover - math.log(others)).clamp_min(LOG_FLOOR)
        out = rest[:, None].expand(batch, num_classes).clone()
    else:
        out = top.new_empty(batch, num_classes)
    return out.scatter_(1, index.long(), top)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) [B] in nats, in float64; generalised (``+ sum q - sum p``) so that it stays >= 0 when
    rounding leaves q a hair off 1. Classes where p is 0 contribute only their q."""
    log_p, log_q = log_p.double(), log_q.double()
    p, q = log_p.exp(), log_q.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1) - p.sum(-1) + q.sum(-1)
