"""ReGLA: Efficient Receptive-Field Modeling with Gated Linear Attention Network

A family of lightweight hybrid networks: efficient large-receptive-field convolutions (ELRF) for
local features and ReLU gated modulated linear attention (RGMA) for global context.
- Paper: `ReGLA: Efficient Receptive-Field Modeling with Gated Linear Attention Network`
  (arXiv 2602.05262). No official code has been released.

This file is a *reconstruction*. What the paper states for certain: ELRF and RGMA modules, a
softmax-free, token-linear, numerically stable ReLU gated attention, and a hybrid CNN family
(ReGLA-M: 80.85% ImageNet-1k top-1 at 224 px). Everything else is a documented default, each one
a constructor argument so it can be changed without editing code:

- Skeleton (default): the iFormer skeleton (`timm/models/iformer.py`, ICLR 2025), which the paper
  sizes itself against. Stem conv5x5/2 -> GELU -> conv5x5/2 expand -> conv1x1; four stages with
  conv3x3/2 downsampling; stages 1-2 conv blocks; stage 3 conv blocks then groups of
  [conv positional encoding, attention, FFN]; stage 4 attention groups only. Conv+BN everywhere
  so everything folds for inference; head = pool -> BN -> Linear.
- ELRF (default, `elrf_dw5_in_ffn=True`): each iFormer DW7x7 block becomes two residual units,
  (a) x + FFN(BN(DW3x3(x))) and (b) x + PW-expand -> BN(DW5x5) on the expanded channels -> GELU
  -> PW-project. Receptive field 3 + 5 - 1 = 7 (the paper reports less memory traffic than one
  DW7x7 on mobile; on CPU the extra residual unit costs memory passes, see docs/benchmarks.md).
  `elrf_dw5_in_ffn=False` gives (b) = x + FFN(BN(DW5x5(x))). Hidden widths: `elrf_ratios`.
- RGMA (default): Q = ReLU(ConvBN(x)), K = ReLU(ConvBN(x)) with C / `attn_key_reduction`
  channels; [V, G] = ConvBN(x), G = sigmoid(G);
  O = Q (K^T V) / (Q (K^T 1) + eps), always computed in fp32 (also under bf16/fp16 autocast);
  Y = ConvBN((O + DW3x3(V)) * G). Cost O(N d_k d_v): linear in the number of tokens N.
  Heads are optional (`attn_heads`, default 1 like iFormer's single-head attention).

Variant sizes are tuned to land within 15% of the parameters and 20% of the MACs of the
iFormer sibling (see docs/regla.md for the exact numbers).
"""
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module

__all__ = ["ReGLA", "RGMA", "ELRF"]


class ConvNorm(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; `fuse()` folds them into one Conv2d."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            groups: int = 1,
    ):
        super().__init__()
        self.c = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        fused = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
            groups=c.groups, device=c.weight.device, dtype=c.weight.dtype,
        )
        fused.weight.copy_(c.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


class NormLinear(nn.Sequential):
    """BatchNorm1d followed by Linear (the classifier); `fuse()` folds them into one Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.l = nn.Linear(in_features, out_features)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, l = self.bn, self.l
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        shift = bn.bias - bn.running_mean * scale
        fused = nn.Linear(l.in_features, l.out_features, device=l.weight.device, dtype=l.weight.dtype)
        fused.weight.copy_(l.weight * scale[None, :])
        fused.bias.copy_(l.weight @ shift + l.bias)
        return fused


class Residual(nn.Module):
    """x + drop_path(module(x))."""

    def __init__(self, module: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.module = module
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.module(x))


class ConvMlp(nn.Sequential):
    """Pointwise FFN: ConvBN1x1 expand -> activation -> ConvBN1x1 project."""

    def __init__(self, dim: int, hidden: int, act_layer: Type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden)
        self.act = act_layer()
        self.fc2 = ConvNorm(hidden, dim)


class ELRF(nn.Module):
    """Efficient Large Receptive Field block: a DW3x3 unit cascaded into a DW5x5 unit.

    Replaces a DW7x7 + FFN block with the same 7x7 receptive field: (a) x + FFN(BN(DW3x3(x)));
    (b) x + expand -> BN(DW5x5) on the expanded channels -> act -> project (default), or
    x + FFN(BN(DW5x5(x))) with `dw5_in_ffn=False`.
    """

    def __init__(
            self,
            dim: int,
            ratios: Tuple[float, float] = (2.0, 2.0),
            dw5_in_ffn: bool = True,
            drop_path: float = 0.0,
            act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        hidden3, hidden5 = (int(round(dim * r)) for r in ratios)
        self.local3 = Residual(
            nn.Sequential(ConvNorm(dim, dim, 3, groups=dim), ConvMlp(dim, hidden3, act_layer)),
            drop_path,
        )
        if dw5_in_ffn:
            unit5 = nn.Sequential(
                ConvNorm(dim, hidden5),
                ConvNorm(hidden5, hidden5, 5, groups=hidden5),
                act_layer(),
                ConvNorm(hidden5, dim),
            )
        else:
            unit5 = nn.Sequential(ConvNorm(dim, dim, 5, groups=dim), ConvMlp(dim, hidden5, act_layer))
        self.local5 = Residual(unit5, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local5(self.local3(x))


class RGMA(nn.Module):
    """ReLU Gated Modulated Attention: softmax-free linear attention with a local branch and a gate.

    Y = proj((O + DW3x3(V)) * sigmoid(G)), O = Q (K^T V) / (Q (K^T 1) + eps), Q = ReLU(q(x)),
    K = ReLU(k(x)). K^T V is a d_k x d_v summary of all tokens, so cost is linear in tokens.
    The attention product runs in fp32 even under autocast: the sums over all tokens in the
    numerator and normaliser overflow or lose precision in bf16/fp16 at high resolution.
    """

    def __init__(
            self,
            dim: int,
            key_reduction: int = 2,
            value_ratio: float = 1.0,
            num_heads: int = 1,
            local_kernel: int = 3,
            eps: float = 1e-6,
    ):
        super().__init__()
        dim_k = dim // key_reduction
        dim_v = int(dim * value_ratio)
        assert dim_k % num_heads == 0 and dim_v % num_heads == 0, "heads must divide key and value dims"
        self.num_heads = num_heads
        self.eps = eps
        self.q = ConvNorm(dim, dim_k)
        self.k = ConvNorm(dim, dim_k)
        self.v_gate = ConvNorm(dim, 2 * dim_v)
        self.local = ConvNorm(dim_v, dim_v, local_kernel, groups=dim_v)
        self.proj = ConvNorm(dim_v, dim)

    def _linear_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Channel-first [B, heads, d, N] layout avoids transposing the token-sized tensors. A row
        # of ones appended to V yields numerator and normaliser from the same two matmuls.
        q, k, v = q.float(), k.float(), v.float()
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
        kv = v @ k.transpose(-1, -2)  # [B, h, d_v + 1, d_k]
        out = kv @ q  # [B, h, d_v + 1, N]
        return out[:, :, :-1] / (out[:, :, -1:] + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        v, gate = self.v_gate(x).chunk(2, dim=1)
        q = F.relu(self.q(x)).reshape(B, self.num_heads, -1, H * W)
        k = F.relu(self.k(x)).reshape(B, self.num_heads, -1, H * W)
        v_heads = v.reshape(B, self.num_heads, -1, H * W)
        if torch.jit.is_scripting():
            out = self._linear_attention(q, k, v_heads)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = self._linear_attention(q, k, v_heads)
        out = out.to(v.dtype).reshape(B, -1, H, W)
        return self.proj((out + self.local(v)) * torch.sigmoid(gate))


register_notrace_module(RGMA)  # shape- and device-dependent control flow: a leaf for FX tracing


class ConvPosEnc(nn.Module):
    """Conditional positional encoding: x + BN(DW3x3(x)); folds into a single DW conv."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.cpe = Residual(ConvNorm(dim, dim, kernel_size, groups=dim))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv = self.cpe.module.fuse()
        kh, kw = conv.kernel_size
        conv.weight[:, :, kh // 2, kw // 2] += 1.0
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpe(x)


class Stage(nn.Module):
    """Optional stride-2 ConvBN3x3 downsample, then ELRF blocks and [CPE, RGMA, FFN] groups.

    Like iFormer: with attention groups, all conv blocks but one come first, then the groups, then
    the last conv block. Each group counts as three blocks of `depth`.
    """

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_attn: int,
            key_reduction: int,
            elrf_ratios: Tuple[float, float],
            elrf_dw5_in_ffn: bool,
            ffn_ratio: float,
            attn_value_ratio: float,
            attn_heads: int,
            drop_path_rates: List[float],
            act_layer: Type[nn.Module],
    ):
        super().__init__()
        assert depth >= 3 * num_attn, "each attention group takes three blocks of the stage depth"
        self.grad_checkpointing = False
        self.downsample = nn.Identity() if in_dim == dim else ConvNorm(in_dim, dim, 3, 2)

        def conv_block(j: int) -> nn.Module:
            return ELRF(dim, elrf_ratios, elrf_dw5_in_ffn, drop_path_rates[j], act_layer)

        num_conv = depth - 3 * num_attn
        num_prefix = num_conv - 1 if num_attn and num_conv else num_conv
        blocks = [conv_block(j) for j in range(num_prefix)]
        for g in range(num_attn):
            offset = num_prefix + 3 * g
            blocks += [
                ConvPosEnc(dim, 3),
                Residual(
                    RGMA(dim, key_reduction, attn_value_ratio, attn_heads),
                    drop_path_rates[offset + 1],
                ),
                Residual(ConvMlp(dim, int(round(dim * ffn_ratio)), act_layer), drop_path_rates[offset + 2]),
            ]
        if num_prefix < num_conv:
            blocks.append(conv_block(depth - 1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Stem(nn.Module):
    """Stride-4 stem: ConvBN5x5/2 -> act -> ConvBN5x5/2 (expand x4) -> act -> ConvBN1x1."""

    def __init__(self, in_chans: int, out_chs: int, act_layer: Type[nn.Module] = nn.GELU):
        super().__init__()
        mid_chs = out_chs // 2
        self.conv1 = ConvNorm(in_chans, mid_chs, 5, 2)
        self.act1 = act_layer()
        self.conv2 = ConvNorm(mid_chs, mid_chs * 4, 5, 2)
        self.act2 = act_layer()
        self.conv3 = ConvNorm(mid_chs * 4, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class ReGLA(nn.Module):
    """ReGLA hybrid CNN: stem, four stages of ELRF conv blocks and RGMA attention groups, BN-linear head."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            dims: Tuple[int, ...] = (32, 64, 128, 256),
            depths: Tuple[int, ...] = (2, 2, 16, 6),
            attn_groups: Tuple[int, ...] = (0, 0, 3, 2),
            attn_key_reduction: Tuple[int, ...] = (0, 0, 2, 4),
            elrf_ratios: Tuple[float, float] = (1.5, 1.5),
            elrf_dw5_in_ffn: bool = True,
            ffn_ratio: float = 2.0,
            attn_value_ratio: float = 1.0,
            attn_heads: int = 1,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        assert global_pool in ("", "avg"), "only avg pooling (or none) is supported"
        assert len(dims) == len(depths) == len(attn_groups) == len(attn_key_reduction)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool

        self.stem = Stem(in_chans, dims[0], act_layer)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        stages = []
        self.feature_info = []
        prev_dim = dims[0]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stages.append(Stage(
                prev_dim, dim, depth, attn_groups[i], attn_key_reduction[i], elrf_ratios, elrf_dw5_in_ffn,
                ffn_ratio, attn_value_ratio, attn_heads, dpr[i], act_layer,
            ))
            prev_dim = dim
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = NormLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ("", "avg"), "only avg pooling (or none) is supported"
            self.global_pool = global_pool
        device = next(self.parameters()).device
        self.head = NormLinear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the outputs of the selected stages (timm's intermediates API).

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, the listed ones if a sequence.
            norm: Unused: there is no final feature norm.
            stop_early: Stop after the last requested stage.
            output_fmt: Only NCHW.
            intermediates_only: Return only the intermediates.
        """
        assert output_fmt == "NCHW", "output shape must be NCHW"
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        if prune_head or max_index < len(self.feature_info) - 1:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwrap training checkpoints that nest the weights under 'model', 'state_dict' or 'state_dict_ema'."""
    for key in ("state_dict_ema", "model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            return state_dict[key]
    return state_dict


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.c",
        "classifier": "head.l",
        "paper_ids": "arXiv:2602.05262",
        "paper_name": "ReGLA: Efficient Receptive-Field Modeling with Gated Linear Attention Network",
        **kwargs,
    }


# Widths, depths and attention layout follow the iFormer sibling; ELRF hidden ratios are chosen so
# that parameters and MACs stay within 15% / 20% of it.
model_cfgs: Dict[str, Dict[str, Any]] = {
    "regla_t": dict(
        dims=(32, 64, 128, 256), depths=(2, 2, 16, 6), attn_groups=(0, 0, 3, 2),
        attn_key_reduction=(0, 0, 2, 4), elrf_ratios=(1.5, 1.5), ffn_ratio=2.0,
    ),
    "regla_s": dict(
        dims=(32, 64, 176, 320), depths=(2, 2, 19, 6), attn_groups=(0, 0, 3, 2),
        attn_key_reduction=(0, 0, 2, 4), elrf_ratios=(2.0, 2.0), ffn_ratio=3.0,
    ),
    "regla_m": dict(
        dims=(48, 96, 192, 384), depths=(2, 2, 22, 6), attn_groups=(0, 0, 4, 2),
        attn_key_reduction=(0, 0, 2, 4), elrf_ratios=(2.0, 2.0), ffn_ratio=3.0,
    ),
    "regla_l": dict(
        dims=(48, 96, 256, 384), depths=(2, 2, 33, 6), attn_groups=(0, 0, 8, 2),
        attn_key_reduction=(0, 0, 2, 4), elrf_ratios=(2.0, 2.0), ffn_ratio=3.0,
    ),
}

default_cfgs = generate_default_cfgs({f"{name}.untrained": _cfg() for name in model_cfgs})


def _create_regla(variant: str, pretrained: bool = False, **kwargs: Any) -> ReGLA:
    return build_model_with_cfg(
        ReGLA,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **dict(model_cfgs[variant], **kwargs),
    )


@register_model
def regla_t(pretrained: bool = False, **kwargs: Any) -> ReGLA:
    return _create_regla("regla_t", pretrained, **kwargs)


@register_model
def regla_s(pretrained: bool = False, **kwargs: Any) -> ReGLA:
    return _create_regla("regla_s", pretrained, **kwargs)


@register_model
def regla_m(pretrained: bool = False, **kwargs: Any) -> ReGLA:
    return _create_regla("regla_m", pretrained, **kwargs)


@register_model
def regla_l(pretrained: bool = False, **kwargs: Any) -> ReGLA:
    return _create_regla("regla_l", pretrained, **kwargs)
