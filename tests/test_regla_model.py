"""ReGLA behaves like a timm model: the checks timm's own model tests make, plus folding and loading."""
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models._features_fx import create_feature_extractor, get_graph_node_names
from timm.utils import reparameterize_model

import regla  # noqa: F401  (registers the models)
from pipeline.model_stats import count_macs, count_params
from regla.regla import ELRF

VARIANTS = ["regla_t", "regla_s", "regla_m", "regla_l"]

# iFormer siblings as torch's FlopCounterMode counts timm's iformer_* at 224 px: (params, MACs).
IFORMER_SIZES = {
    "regla_t": (2.886e6, 0.530e9),
    "regla_s": (6.563e6, 1.092e9),
    "regla_m": (8.907e6, 1.640e9),
    "regla_l": (14.780e6, 2.827e9),
}


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every BN non-trivial statistics and affine terms so folding is actually exercised."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_every_param_gets_grad(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 42)
    assert torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", VARIANTS)
def test_size_within_budget_of_iformer_sibling(name):
    model = timm.create_model(name).eval()
    params = count_params(model)
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    ref_params, ref_macs = IFORMER_SIZES[name]
    assert abs(params / ref_params - 1) <= 0.15, params
    assert abs(macs / ref_macs - 1) <= 0.20, macs


def test_pretrained_cfg_has_timm_fields():
    model = timm.create_model("regla_t")
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "first_conv", "classifier"):
        assert key in cfg, key
    state_dict = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state_dict
    assert cfg["classifier"] + ".weight" in state_dict
    assert sorted(timm.list_models("regla_*")) == sorted(VARIANTS)


def test_features_head_and_classifier_reset():
    model = timm.create_model("regla_t").eval()
    x = torch.randn(1, 3, 224, 224)
    pool_size = model.pretrained_cfg["pool_size"]
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, model.num_features, *pool_size)
        pre_logits = model.forward_head(feats, pre_logits=True)
        assert pre_logits.shape == (1, model.num_features)
        logits = model(x)
        assert logits.shape == (1, 1000)

        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (1, model.num_features)
        torch.testing.assert_close(pooled, pre_logits)

        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.num_features, *pool_size)

        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7)
    assert model.get_classifier().l.out_features == 7


@pytest.mark.parametrize("size", [(160, 224), (96, 70), (512, 512)])
def test_non_square_and_non_default_sizes(size):
    model = timm.create_model("regla_t", num_classes=5).eval()
    h, w = size
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, h, w))
        out = model.forward_head(feats)
    assert feats.shape[-2:] == (-(-h // 32), -(-w // 32))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(feature_cls):
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    model = timm.create_model("regla_t", features_only=True, out_indices=(1, 2, 3), **kwargs).eval()
    assert model.feature_info.channels() == [64, 128, 256]
    assert model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 96, 128))
    assert [o.shape for o in outs] == [
        (2, 64, 12, 16), (2, 128, 6, 8), (2, 256, 3, 4),
    ]


def test_forward_intermediates_match_forward_features():
    model = timm.create_model("regla_t").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in intermediates] == [32, 64, 128, 256]
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[1])
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.stages) == 2 and model.num_features == 64


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("regla_t", num_classes=3).train()
    # BN in train mode and no dropout: the recomputed forward is identical.
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_torchscript_matches_eager():
    model = timm.create_model("regla_t", num_classes=10).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_fx_feature_extraction():
    model = timm.create_model("regla_t", num_classes=10).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert any("rgma" in n.lower() or n.endswith(".module") for n in eval_nodes)
    extractor = create_feature_extractor(model, return_nodes={"stages.2": "s2", "head": "logits"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x))
    assert out["s2"].shape == (1, 128, 4, 4)
    fx_model = timm.create_model("regla_t", features_only=True, feature_cls="fx").eval()
    assert [o.shape[1] for o in fx_model(x)] == [32, 64, 128, 256]


def test_reparameterize_folds_every_batchnorm_and_matches():
    model = timm.create_model("regla_s", num_classes=10).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        got = fused(x)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    # ConvPosEnc folds into one conv: fewer modules than the unfused model.
    assert sum(1 for _ in fused.modules()) < sum(1 for _ in model.modules())
    assert (got - expected).abs().max().item() < 1e-4


def test_pretrained_from_local_safetensors(tmp_path):
    source = timm.create_model("regla_t").eval()
    randomize_batchnorm(source)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))

    loaded = timm.create_model("regla_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    fresh = timm.create_model("regla_t").eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), source(x))


def test_pretrained_from_wrapped_pth_checkpoint(tmp_path):
    source = timm.create_model("regla_t", num_classes=1000).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    loaded = timm.create_model("regla_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_in_chans_and_drop_path():
    model = timm.create_model("regla_t", in_chans=1, num_classes=4, drop_path_rate=0.1, drop_rate=0.1)
    out = model.train()(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 4)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)


@pytest.mark.parametrize("dw5_in_ffn", [True, False])
def test_elrf_receptive_field_is_7x7(dw5_in_ffn):
    block = ELRF(8, (2.0, 2.0), dw5_in_ffn=dw5_in_ffn).eval()
    randomize_batchnorm(block)
    x = torch.randn(1, 8, 15, 15, requires_grad=True)
    # Subtract the identity path so only the convolutional branches' reach is measured.
    (block(x) - x)[0, :, 7, 7].sum().backward()
    reach = (x.grad[0].abs().sum(0) > 0).nonzero()
    assert reach[:, 0].min() == 4 and reach[:, 0].max() == 10
    assert reach[:, 1].min() == 4 and reach[:, 1].max() == 10


def test_reconstruction_switches_change_the_model():
    base = timm.create_model("regla_t")
    alt = timm.create_model("regla_t", elrf_dw5_in_ffn=False, attn_heads=2, elrf_ratios=(1.0, 2.0))
    assert count_params(alt) != count_params(base)
    out = alt.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
