"""ViT3D and DINOHead: sizes, position-embedding interpolation, masking, gradients, optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch

from fmct.config import load_config
from fmct.errors import ConfigError, InputError
from fmct.models import DINOHead, ViT3D, ViT3DConfig, build_vit3d, interpolate_pos_embed, sincos_pos_embed_3d
from fmct.models.classifier import Classifier

torch.set_num_threads(1)


def tiny(**overrides) -> ViT3D:
    settings = dict(size="tiny", img_size=(32, 32, 32), patch_size=8, depth=2)
    settings.update(overrides)
    torch.manual_seed(0)
    return build_vit3d(ViT3DConfig(**settings))


def test_base_has_fm_ct_parameter_count():
    with torch.device("meta"):
        model = build_vit3d(ViT3DConfig(size="base"))
    n_params = sum(p.numel() for p in model.parameters())
    # FM-CT reports ~89.4 M for ViT-B, patch 12, 3 channels.
    assert 80e6 < n_params < 95e6
    assert model.config.n_patches == 512 and model.pos_embed.shape == (1, 512, 768)
    assert (model.config.embed_dim, model.config.depth, model.config.n_heads) == (768, 12, 12)
    assert model.blocks[0].mlp.fc1.out_features == 3072


def test_a_negative_depth_is_refused():
    with pytest.raises(ConfigError, match="depth -1"):
        ViT3DConfig(size="tiny", depth=-1)


def test_config_normalises_patch_and_overrides_size():
    config = ViT3DConfig(size="small", patch_size=12, depth=4)
    assert config.patch_size == (12, 12, 12) and config.grid_size == (8, 8, 8)
    assert (config.embed_dim, config.depth, config.n_heads) == (384, 4, 6)
    loaded = load_config(ViT3DConfig, None, ["size=tiny", "patch_size=[8,8,4]", "img_size=[32,32,16]"])
    assert loaded.patch_size == (8, 8, 4) and loaded.grid_size == (4, 4, 4) and loaded.embed_dim == 192
    with pytest.raises(ConfigError, match="unknown ViT size"):
        ViT3DConfig(size="huge")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        ViT3DConfig(img_size=(96, 96, 90), patch_size=12)


def test_sincos_embedding_values():
    embed = sincos_pos_embed_3d((2, 3, 4), 12)  # 2 channels per (sin, cos) per axis
    assert embed.shape == (24, 12)
    # Patch (d, h, w) = (1, 2, 3) is row 1*12 + 2*4 + 3 = 23; frequencies 1 and 1/100.
    d, h, w = 1.0, 2.0, 3.0
    expected = [
        math.sin(d),
        math.sin(d / 100),
        math.cos(d),
        math.cos(d / 100),
        math.sin(h),
        math.sin(h / 100),
        math.cos(h),
        math.cos(h / 100),
        math.sin(w),
        math.sin(w / 100),
        math.cos(w),
        math.cos(w / 100),
    ]
    assert torch.allclose(embed[23], torch.tensor(expected), atol=1e-6)
    # A width that is not a multiple of 6 pads with zero channels.
    assert torch.all(sincos_pos_embed_3d((2, 2, 2), 1024)[:, 1020:] == 0)


def test_pos_embed_interpolation_same_grid_and_linear_field():
    grid = (8, 8, 8)
    pos = torch.randn(1, 512, 6)
    assert torch.equal(interpolate_pos_embed(pos, grid, grid), pos)
    # A field linear in the patch coordinates is reproduced exactly at the centres of a coarser grid:
    # patch i of a 4-grid covers patches 2i and 2i+1 of the 8-grid, centre at 8-grid coordinate 2i + 0.5.
    d, h, w = torch.meshgrid(*(torch.arange(8.0),) * 3, indexing="ij")
    field = torch.stack([d, h, w, d + 2 * h, 3 * w, torch.ones_like(d)], dim=-1).reshape(1, 512, 6)
    coarse = interpolate_pos_embed(field, grid, (4, 4, 4))
    cd, ch, cw = torch.meshgrid(*(2 * torch.arange(4.0) + 0.5,) * 3, indexing="ij")
    expected = torch.stack([cd, ch, cw, cd + 2 * ch, 3 * cw, torch.ones_like(cd)], dim=-1).reshape(1, 64, 6)
    assert torch.allclose(coarse, expected, atol=1e-5)


def test_local_crop_and_anisotropic_inputs_run():
    model = tiny(img_size=(96, 96, 96), patch_size=12).eval()
    with torch.no_grad():
        local = model.forward_features(torch.randn(2, 3, 48, 48, 48))
        tokens = model.prepare_tokens(torch.zeros(1, 3, 48, 48, 48))
    assert (
        local["cls"].shape == (2, 192)
        and local["patch"].shape == (2, 64, 192)
        and local["registers"].shape == (2, 4, 192)
    )
    # Zero input: patch tokens are the conv bias (0) plus the pos-embed interpolated from 8^3 to 4^3.
    expected_pos = interpolate_pos_embed(model.pos_embed, (8, 8, 8), (4, 4, 4))
    assert torch.allclose(tokens[:, 5:], expected_pos, atol=1e-6)
    anisotropic = tiny(img_size=(32, 32, 16), patch_size=(8, 8, 4)).eval()
    with torch.no_grad():
        out = anisotropic.forward_features(torch.randn(1, 3, 32, 32, 16))
    assert out["patch"].shape == (1, 64, 192)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 50, 48, 48))
    with pytest.raises(InputError, match=r"expected volumes \(B, 3, D, H, W\)"):
        model(torch.randn(1, 1, 48, 48, 48))


def test_mask_token_replaces_exactly_the_masked_patches():
    model = tiny()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [0, 5, 63]] = True
    masks[1, 10:20] = True
    with torch.no_grad():
        plain = model.prepare_tokens(x)
        masked = model.prepare_tokens(x, masks=masks)
    changed = (plain != masked).any(dim=-1)
    assert torch.equal(changed[:, 5:], masks) and not changed[:, :5].any()
    assert torch.allclose(
        masked[:, 5:][masks], (model.mask_token + model.pos_embed[0])[masks.nonzero()[:, 1]], atol=1e-6
    )


def test_keep_idx_encodes_only_the_visible_patches():
    model = tiny()
    x = torch.randn(2, 3, 32, 32, 32)
    keep_idx = torch.tensor([[3, 1, 60, 7], [0, 63, 2, 9]])
    with torch.no_grad():
        full = model.prepare_tokens(x)
        visible = model.prepare_tokens(x, keep_idx=keep_idx)
        features = model.forward_features(x, keep_idx=keep_idx)
    assert visible.shape == (2, 5 + 4, 192)
    assert torch.equal(visible[:, 5:], torch.gather(full[:, 5:], 1, keep_idx.unsqueeze(-1).expand(-1, -1, 192)))
    assert features["patch"].shape == (2, 4, 192)


def test_tiny_forward_backward_gives_finite_gradients_everywhere():
    model = tiny(drop_path_rate=0.2).train()
    masks = torch.rand(2, 64) < 0.3
    out = model.forward_features(torch.randn(2, 3, 32, 32, 32), masks=masks)
    (out["cls"].square().sum() + out["patch"].square().mean() + out["registers"].sum()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.cls_token.grad.abs().sum() > 0 and model.mask_token.grad.abs().sum() > 0


def test_stochastic_depth_only_in_training():
    model = tiny(drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        assert not torch.allclose(first, model(x))


def test_param_groups_layer_decay_and_no_decay_rules():
    model = tiny()
    groups = model.param_groups(weight_decay=0.04, layer_decay=0.5)
    by_name = {name: group for group in groups for name in group["names"]}
    assert set(by_name) == {name for name, _ in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # depth 2: embeddings at layer 0 -> 0.5^3, block 0 -> 0.5^2, block 1 -> 0.5, final norm -> 1.
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == 0.125
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == 0.25
    assert by_name["blocks.1.mlp.fc2.weight"]["lr_scale"] == 0.5
    assert by_name["norm.weight"]["lr_scale"] == 1.0
    for name in [
        "pos_embed",
        "cls_token",
        "register_tokens",
        "mask_token",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.1.ls2.gamma",
        "patch_embed.proj.bias",
    ]:
        assert by_name[name]["wd_scale"] == 0.0 and by_name[name]["weight_decay"] == 0.0, name
    assert by_name["blocks.0.attn.proj.weight"]["weight_decay"] == pytest.approx(0.04)
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
    # DINOv2's patch-embedding multiplier scales the embedding on top of its layer decay, nothing else.
    slow = {name: g["lr_scale"] for g in model.param_groups(0.04, 0.5, patch_embed_lr_mult=0.2) for name in g["names"]}
    assert slow["patch_embed.proj.weight"] == pytest.approx(0.025) and slow["pos_embed"] == 0.125
    assert slow["blocks.0.attn.qkv.weight"] == 0.25


def test_dino_head_is_weight_normalised_and_last_layer_freezes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=32, hidden=24, bottleneck=8, n_layers=3)
    x = torch.randn(5, 7, 16)
    logits = head(x)
    assert logits.shape == (5, 7, 32) and logits.abs().max() <= 1.0 + 1e-6  # norms start at 1: cosines
    with torch.no_grad():
        before = head(x)
        head.prototypes.mul_(torch.rand(32, 1) * 10 + 0.1)  # rescaling a prototype's direction leaves its logits
        assert torch.allclose(head(x), before, atol=1e-6)
        head.prototype_norms[3] = 2.5  # the trainable norm (DINOv2's weight_g) scales its logit
        assert torch.allclose(head(x)[..., 3], 2.5 * before[..., 3], atol=1e-6)
        head.prototype_norms.fill_(1.0)
    prototypes = head.prototypes.detach().clone()
    norms = head.prototype_norms.detach().clone()
    first_linear = head.mlp[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(head.param_groups(weight_decay=0.04), lr=1e-2)
    head(x).logsumexp(-1).sum().backward()
    head.cancel_last_layer_gradients()
    optimizer.step()
    assert torch.equal(head.prototypes, prototypes) and torch.equal(head.prototype_norms, norms)
    assert not torch.equal(head.mlp[0].weight, first_linear)
    assert len(head.mlp) == 5  # Linear, GELU, Linear, GELU, Linear


def conv_stem(**overrides) -> ViT3D:
    """The CPU-scale backbone's shape, narrow: a 3-stage stem (patch 8) under 2 blocks."""
    config = dict(
        size="tiny",
        depth=2,
        embed_dim=48,
        n_heads=4,
        img_size=(32, 32, 32),
        patch_size=(8, 8, 8),
        n_registers=1,
        layerscale_init=None,
        stem_channels=(4, 8, 8),
    )
    return ViT3D(ViT3DConfig(**{**config, **overrides})).eval()


def test_conv_stem_makes_one_token_per_patch_and_needs_a_patch_of_two_to_the_stages():
    model = conv_stem()
    with torch.no_grad():
        features = model.forward_features(torch.rand(2, 3, 32, 48, 32))
    assert features["patch"].shape == (2, 4 * 6 * 4, 48)
    with pytest.raises(ConfigError, match="3 stages makes patches of 8 voxels, but patch_size is \\[12, 12, 12\\]"):
        ViT3DConfig(size="tiny", patch_size=12, img_size=(48, 48, 48), stem_channels=(4, 8, 8))


@pytest.mark.parametrize("full_resolution", [False, True])
@pytest.mark.parametrize("hide", ["masks", "keep_idx"])
def test_conv_stem_tokens_never_see_into_hidden_patches(hide, full_resolution):
    """The stem's 3x3x3 kernels cross patch borders: hidden patches are zeroed in the input, so changing
    their voxels must change no visible token (exactly: the changed voxels are multiplied by 0)."""
    model = conv_stem(stem_full_resolution=full_resolution)
    x = torch.rand(2, 3, 32, 32, 32)
    hidden = torch.zeros(2, 64, dtype=torch.bool)
    hidden[:, [0, 21, 42]] = True  # patches (0,0,0), (1,1,1), (2,2,2) of the 4^3 grid
    changed = x.clone()
    for d in range(3):
        changed[:, :, 8 * d : 8 * d + 8, 8 * d : 8 * d + 8, 8 * d : 8 * d + 8] = torch.rand(2, 3, 8, 8, 8)
    if hide == "masks":
        kwargs = {"masks": hidden}
    else:
        kwargs = {"keep_idx": (~hidden).nonzero()[:, 1].reshape(2, -1)}
    with torch.no_grad():
        before, after = model.prepare_tokens(x, **kwargs), model.prepare_tokens(changed, **kwargs)
        unmasked = model.prepare_tokens(x), model.prepare_tokens(changed)
    assert torch.equal(before, after)
    # Without the hiding, the same change reaches the tokens next to the changed patches.
    assert not torch.equal(*unmasked)


def test_a_full_resolution_stem_convolves_at_the_input_grid_and_depth_0_is_the_stem_alone():
    """stem_full_resolution: the first stage is two 3x3x3 convolutions at the input's grid (no 2x2x2
    patchify); depth 0: no block, the patch tokens are the normalised stem tokens (plus position)."""
    model = conv_stem(stem_full_resolution=True, depth=0)
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv3d)]
    assert [tuple(c.kernel_size) for c in convs] == [(3, 3, 3)] * 6 and len(model.blocks) == 0
    x = torch.rand(2, 3, 32, 32, 32)
    with torch.no_grad():
        tokens = model.patch_embed(x) + model.pos_embed
        expected = torch.nn.functional.layer_norm(tokens, (48,), model.norm.weight, model.norm.bias, model.norm.eps)
        patch = model.forward_features(x)["patch"]
    # The same float32 operations on the same values; a different reduction order inside layer_norm can move
    # a unit-scale output by a few ulps (~1e-7 each), far inside 1e-5.
    assert patch.shape == (2, 64, 48) and torch.allclose(patch, expected, atol=1e-5)


def test_a_restored_fine_tuning_state_carries_the_stem_statistics_and_a_frozen_stem_keeps_its_own():
    """The conv stem's batch norms hold running statistics: the best weights of a fine-tune are worth
    nothing beside the statistics of a later step, and a frozen stem must not re-estimate them."""
    torch.manual_seed(0)
    classifier = Classifier(tiny(stem_channels=(4, 8, 8)), 1, "pooled")
    x = torch.rand(4, 3, 32, 32, 32)
    classifier.train()
    classifier(x)
    best = {name: value.clone() for name, value in classifier.trained_state().items()}
    assert "backbone.patch_embed.stem.1.running_mean" in best
    classifier.eval()
    expected = classifier(x)
    classifier.train()
    for _ in range(3):  # later steps move the running statistics (no optimizer: only they change)
        classifier(2 * x)
    classifier.load_state_dict(best, strict=False)
    classifier.eval()
    assert torch.equal(classifier(x), expected)

    frozen = Classifier(tiny(stem_channels=(4, 8, 8)), 1, "pooled")
    frozen.freeze(trainable_blocks=1)
    stem_statistics = frozen.backbone.patch_embed.stem[1].running_var.clone()
    frozen.train()
    frozen(x)
    assert torch.equal(frozen.backbone.patch_embed.stem[1].running_var, stem_statistics)
    assert frozen.backbone.blocks[-1].training and not frozen.backbone.patch_embed.stem[1].training
