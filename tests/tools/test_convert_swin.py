"""Official Swin weights -> our Swin backbone (`hybrid_detr.converters.swin`). Key lists written from the
official model definitions (Swin v1: Microsoft's Swin / Co-DETR's SwinTransformerV1 / DINO; mmdet's
SwinTransformer) and checked once against the state dicts of the official modules themselves
(`tools/compare_swin.py`, which also compares outputs: 0 / 1.2e-5 max difference on Swin-L); here:
strict loading, mmdet's patch-merging channel order against its definition (nn.Unfold), the backbone-only
file for ImageNet checkpoints, the Co-DINO Swin-L release against its config, and refusals. No official code."""
from typing import List, Tuple

import pytest
import torch
from torch import nn

import hybrid_detr.config as config_module
from detectron2.modeling import build_backbone
from hybrid_detr.converters import CONVERTERS, ConversionError, convert_file
from hybrid_detr.converters.common import StateDictReader
from hybrid_detr.converters.kinds import describe_kind
from hybrid_detr.converters.swin import convert_swin_backbone, convert_swin_backbone_file, swin_layout
from hybrid_detr.modeling.backbones import add_swin_config
from model_helpers import tiny_cfg
from official_keys import Shape, seeded_state_dict
from test_convert_co_dino import co_dino_keys
from test_convert_dac_co_detr import _assert_refused, _save

TINY = (16, [2, 2, 2, 2], [1, 2, 2, 4], 7)
LARGE = (192, [2, 2, 18, 2], [6, 12, 24, 48], 12)


def _norm(prefix, dim):
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))]


def _linear(prefix, out_dim, in_dim, bias=True):
    return [(f"{prefix}.weight", (out_dim, in_dim))] + ([(f"{prefix}.bias", (out_dim,))] if bias else [])


def swin_keys(arch, layout="swin_v1", prefix="", classifier=False) -> List[Tuple[str, Shape]]:
    """An official Swin's state dict keys. Swin v1 (projects/models/swin_transformer.py): PatchEmbed.proj / norm,
    layers.i.blocks.j (norm1, attn: relative_position_bias_table, relative_position_index buffer, qkv, proj; norm2,
    mlp.fc1 / fc2), layers.i.downsample (reduction without bias, norm) for i < 3, norm0..3; a classification
    checkpoint has norm + head and fixed-size attn_mask buffers in shifted blocks instead of norm0..3.
    mmdet (mmdet/models/backbones/swin.py): patch_embed.projection, stages.i.blocks.j.attn.w_msa.*, ffn.layers.0.0 /
    ffn.layers.1, stages.i.downsample, norm0..3."""
    embed, depths, heads, window = arch
    stage, attn = ("layers", "attn") if layout == "swin_v1" else ("stages", "attn.w_msa")
    keys = [(f"patch_embed.{'proj' if layout == 'swin_v1' else 'projection'}.weight", (embed, 3, 4, 4)),
            (f"patch_embed.{'proj' if layout == 'swin_v1' else 'projection'}.bias", (embed,))]
    keys += _norm("patch_embed.norm", embed)
    for i, (depth, head) in enumerate(zip(depths, heads)):
        dim = embed * 2 ** i
        for j in range(depth):
            b = f"{stage}.{i}.blocks.{j}"
            keys += _norm(f"{b}.norm1", dim)
            keys += [(f"{b}.{attn}.relative_position_bias_table", ((2 * window - 1) ** 2, head)),
                     (f"{b}.{attn}.relative_position_index", (window * window, window * window))]
            keys += _linear(f"{b}.{attn}.qkv", 3 * dim, dim) + _linear(f"{b}.{attn}.proj", dim, dim)
            keys += _norm(f"{b}.norm2", dim)
            fc1, fc2 = ("mlp.fc1", "mlp.fc2") if layout == "swin_v1" else ("ffn.layers.0.0", "ffn.layers.1")
            keys += _linear(f"{b}.{fc1}", 4 * dim, dim) + _linear(f"{b}.{fc2}", dim, 4 * dim)
            if classifier and j % 2 == 1:
                keys += [(f"{b}.attn_mask", (64, window * window, window * window))]
        if i < 3:
            keys += _linear(f"{stage}.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            keys += _norm(f"{stage}.{i}.downsample.norm", 4 * dim)
    if classifier:
        keys += _norm("norm", embed * 8) + _linear("head", 1000, embed * 8)
    else:
        for i in range(4):
            keys += _norm(f"norm{i}", embed * 2 ** i)
    return [(prefix + k, s) for k, s in keys]


def official_state(arch, layout="swin_v1", prefix="", classifier=False, seed=0):
    state = seeded_state_dict(swin_keys(arch, layout, prefix, classifier), seed=seed)
    for key in [k for k in state if k.endswith("relative_position_index")]:
        state[key] = state[key].abs().long()
    return state


def our_backbone(arch, out_features=("res2", "res3", "res4", "res5")):
    embed, depths, heads, window = arch
    cfg = tiny_cfg()
    add_swin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.SWIN.ARCH = "swin_large_patch4_window12_384" if arch == LARGE else "swin_tiny_patch4_window7_224"
    cfg.MODEL.SWIN.EMBED_DIM, cfg.MODEL.SWIN.DEPTHS, cfg.MODEL.SWIN.NUM_HEADS, cfg.MODEL.SWIN.WINDOW_SIZE = embed, depths, heads, window
    cfg.MODEL.SWIN.OUT_FEATURES = list(out_features)
    return build_backbone(cfg)


def convert(state, prefix=""):
    reader = StateDictReader(state, "swin")
    out = {}
    notes = convert_swin_backbone(reader, prefix, out)
    reader.check_all_used()
    return {k[len("backbone."):]: v for k, v in out.items()}, notes


@pytest.mark.parametrize("layout", ["swin_v1", "mmdet"])
def test_both_layouts_load_strictly_with_their_values(layout):
    state = official_state(TINY, layout, prefix="backbone.")
    assert swin_layout(state, "backbone.") == layout
    converted, notes = convert(state, "backbone.")
    backbone = our_backbone(TINY)
    backbone.load_state_dict(converted, strict=True)
    stage = "layers" if layout == "swin_v1" else "stages"
    attn = "attn" if layout == "swin_v1" else "attn.w_msa"
    fc1 = "mlp.fc1" if layout == "swin_v1" else "ffn.layers.0.0"
    assert torch.equal(backbone.body.layers[2].blocks[1].attn.qkv.weight, state[f"backbone.{stage}.2.blocks.1.{attn}.qkv.weight"])
    assert torch.equal(backbone.body.layers[3].blocks[0].mlp.fc1.bias, state[f"backbone.{stage}.3.blocks.0.{fc1}.bias"])
    assert torch.equal(backbone.output_norms["res4"].weight, state["backbone.norm2.weight"])
    # Patch merging at the end of stage i there, at the start of stage i + 1 in timm.
    reduction = state[f"backbone.{stage}.0.downsample.reduction.weight"]
    if layout == "swin_v1":
        assert torch.equal(backbone.body.layers[1].downsample.reduction.weight, reduction)
    else:
        assert not torch.equal(backbone.body.layers[1].downsample.reduction.weight, reduction)
        assert any("unfold order" in n for n in notes)


def test_mmdet_patch_merging_channel_order():
    """mmdet's merging, from its definition (nn.Unfold(2, stride 2) -> LayerNorm(4C) -> Linear(4C, 2C, no bias)),
    computes what timm's merging does with the converted weights."""
    torch.manual_seed(0)
    channels = 16
    unfold, norm, reduction = nn.Unfold(2, stride=2), nn.LayerNorm(4 * channels), nn.Linear(4 * channels, 2 * channels, bias=False)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    state = official_state(TINY, "mmdet")
    state["stages.0.downsample.norm.weight"] = norm.weight.detach().clone()
    state["stages.0.downsample.norm.bias"] = norm.bias.detach().clone()
    state["stages.0.downsample.reduction.weight"] = reduction.weight.detach().clone()
    backbone = our_backbone(TINY)
    backbone.load_state_dict(convert(state)[0], strict=True)
    x = torch.randn(2, channels, 10, 14)
    with torch.no_grad():
        expected = reduction(norm(unfold(x).transpose(1, 2))).transpose(1, 2).reshape(2, 2 * channels, 5, 7)
        found = backbone.body.layers[1].downsample(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)


def test_swin_l_keys_and_shapes_match_the_backbone():
    converted, _ = convert(official_state(LARGE, "swin_v1"))
    with torch.device("meta"):
        backbone = our_backbone(LARGE)
    expected = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert expected["output_norms.res5.weight"] == (1536,) and expected["body.layers.3.downsample.reduction.weight"] == (1536, 3072)


def test_imagenet_classification_checkpoint_to_a_backbone_file(tmp_path):
    source = _save(tmp_path, "swin_tiny_22k.pth", official_state(TINY, "swin_v1", classifier=True))
    output = tmp_path / "backbone.pth"
    conversion = convert_swin_backbone_file(source, str(output))
    assert any("final norm and classifier head dropped" in n for n in conversion.notes)
    data = torch.load(output, map_location="cpu", weights_only=True)
    assert all(k.startswith("backbone.") for k in data["model"])
    backbone = our_backbone(TINY, out_features=("res3", "res4", "res5"))
    missing, unexpected = backbone.load_state_dict({k[len("backbone."):]: v for k, v in data["model"].items()}, strict=False)
    # A classification checkpoint has no output norms: those (and only those) start afresh.
    assert sorted(missing) == [f"output_norms.res{i}.{p}" for i in (3, 4, 5) for p in ("bias", "weight")] and not unexpected


def test_refusals_name_what_is_wrong(tmp_path):
    state = official_state(TINY, "swin_v1")
    with pytest.raises(ConversionError, match="absolute position embedding"):
        convert({**state, "absolute_pos_embed": torch.zeros(1, 16, 56, 56)})
    with pytest.raises(ConversionError, match="'layers.1.blocks.0.attn.extra.weight' is not a Swin"):
        convert({**state, "layers.1.blocks.0.attn.extra.weight": torch.zeros(1)})
    resnet = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(ConversionError, match="no Swin Transformer under 'backbone.'"):
        convert(resnet, "backbone.")
    not_swin = _save(tmp_path, "resnet.pth", resnet)
    with pytest.raises(ConversionError, match="no Swin Transformer"):
        convert_swin_backbone_file(not_swin, str(tmp_path / "out.pth"))
    assert describe_kind(state) == "a Swin Transformer checkpoint (swin_v1 layout)"


def co_dino_swin_l_keys():
    """co_dino_5scale_swin_large_1x_coco.py: Co-DINO R-50's keys with SwinTransformerV1 (Swin-L, window 12,
    out_indices 0-3) as the backbone and the ChannelMapper on 192 / 384 / 768 / 1536 channels (cfg:21)."""
    d = 256
    keys = [(k, s) for k, s in co_dino_keys() if not k.startswith(("backbone.", "neck."))]
    keys += swin_keys(LARGE, "swin_v1", prefix="backbone.")
    for i, c in enumerate((192, 384, 768, 1536)):
        keys += [(f"neck.convs.{i}.conv.weight", (d, c, 1, 1))] + _norm(f"neck.convs.{i}.gn", d)
    keys += [("neck.extra_convs.0.conv.weight", (d, 1536, 3, 3))] + _norm("neck.extra_convs.0.gn", d)
    return keys


@pytest.fixture
def swin_config_keys(monkeypatch):
    """load_config with MODEL.SWIN (until hybrid_detr/config.py adds them itself; add_swin_config is idempotent)."""
    plain = config_module.get_hybrid_detr_cfg

    def with_swin():
        cfg = plain()
        add_swin_config(cfg)
        return cfg

    monkeypatch.setattr(config_module, "get_hybrid_detr_cfg", with_swin)


def test_co_dino_swin_l_release_fits_its_config(tmp_path, swin_config_keys):
    official = official_state(LARGE, "swin_v1", prefix="backbone.")
    official.update(seeded_state_dict([(k, s) for k, s in co_dino_swin_l_keys() if not k.startswith("backbone.")], seed=3))
    source = _save(tmp_path, "co_dino_5scale_swin_large_1x_coco.pth", official, wrap="state_dict")
    output = tmp_path / "co_dino_swin_l.pth"
    # convert_file checks every key and shape against the model configs/coco/co_dino_swin_l_12ep_query_head.yaml builds.
    conversion = convert_file("co_dino_swin_l", source, str(output))
    data = torch.load(output, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(data["backbone.body.layers.2.blocks.17.attn.proj.weight"], official["backbone.layers.2.blocks.17.attn.proj.weight"])
    assert torch.equal(data["backbone.body.layers.3.downsample.norm.bias"], official["backbone.layers.2.downsample.norm.bias"])
    assert torch.equal(data["neck.extra_proj.0.0.weight"], official["neck.extra_convs.0.conv.weight"])
    assert any("Swin backbone (swin_v1 layout)" in n for n in conversion.notes)
    # The R-50 converter refuses it, naming the Swin backbone; this one refuses the R-50 release.
    _assert_refused(tmp_path, "co_dino", source, "not a torchvision ResNet parameter")
    r50 = _save(tmp_path, "co_dino_r50.pth", seeded_state_dict(co_dino_keys(), seed=4), wrap="state_dict")
    _assert_refused(tmp_path, "co_dino_swin_l", r50, "expected a Co-DINO checkpoint with a Swin backbone")
    assert "co_dino_swin_l" in CONVERTERS
