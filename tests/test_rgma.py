"""RGMA: the linear attention computes the stated formula, stays stable in low precision, costs O(N)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import regla  # noqa: F401
from pipeline.model_stats import count_macs
from regla.regla import RGMA


def naive_rgma(block: RGMA, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference: o_n = sum_m (q_n . k_m) v_m / (sum_m q_n . k_m + eps), per head."""
    B, C, H, W = x.shape
    v, gate = block.v_gate(x).chunk(2, dim=1)
    q = F.relu(block.q(x)).double().flatten(2)
    k = F.relu(block.k(x)).double().flatten(2)
    vt = v.double().flatten(2)
    heads = block.num_heads
    dk, dv = q.shape[1] // heads, vt.shape[1] // heads
    out = torch.zeros_like(vt)
    for b in range(B):
        for h in range(heads):
            qh, kh = q[b, h * dk:(h + 1) * dk], k[b, h * dk:(h + 1) * dk]
            vh = vt[b, h * dv:(h + 1) * dv]
            for n in range(H * W):
                weights = (qh[:, n:n + 1] * kh).sum(0)  # [N]: q_n . k_m for every m
                out[b, h * dv:(h + 1) * dv, n] = (vh * weights).sum(1) / (weights.sum() + block.eps)
    out = out.reshape(B, -1, H, W).to(x.dtype)
    return block.proj((out + block.local(v)) * torch.sigmoid(gate))


@pytest.mark.parametrize("heads", [1, 2])
def test_matches_naive_per_token_reference(heads):
    block = RGMA(16, key_reduction=2, num_heads=heads).eval()
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_rgma(block, x), rtol=1e-4, atol=1e-5)


def test_no_nan_when_queries_are_all_zero():
    block = RGMA(8).eval()
    with torch.no_grad():
        block.q.bn.bias.fill_(-100.0)  # ReLU(q) == 0 everywhere: the normaliser is only eps
        out = block(torch.randn(1, 8, 6, 6))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_is_finite_and_close(dtype):
    block = RGMA(64, key_reduction=2).eval()
    # 96x96 = 9216 tokens of large activations: the token sums reach ~1e7, far past fp16's 65504.
    x = 4.0 * torch.randn(1, 64, 96, 96)
    with torch.no_grad():
        reference = block(x)
        with torch.autocast("cpu", dtype=dtype):
            low = block(x)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    rel = (low.float() - reference).norm() / reference.norm()
    assert rel < 0.03, rel


def test_attention_product_runs_in_fp32_under_autocast():
    block = RGMA(16).eval()
    seen = []
    original = block._linear_attention

    def spy(q, k, v):
        out = original(q, k, v)
        seen.append(out.dtype)
        return out

    block._linear_attention = spy
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(torch.randn(1, 16, 8, 8))
    assert seen == [torch.float32]


def attention_macs(block: torch.nn.Module, side: int, dim: int) -> float:
    return count_macs(block, torch.randn(1, dim, side, side))


def test_cost_grows_linearly_with_tokens():
    dim = 64
    rgma = RGMA(dim).eval()
    macs = [attention_macs(rgma, side, dim) for side in (16, 32, 64)]
    # 4x the tokens -> exactly 4x the MACs (every term is per token or constant).
    assert macs[1] / macs[0] == pytest.approx(4.0, rel=0.01)
    assert macs[2] / macs[1] == pytest.approx(4.0, rel=0.01)

    # For contrast, iFormer's softmax attention (same widths) grows quadratically.
    shma = timm.create_model("iformer_t").stages[2].blocks[13].mixer.module.eval()
    softmax = [attention_macs(shma, side, 128) for side in (16, 32, 64)]
    assert softmax[2] / softmax[1] > 6.0
