"""The dino_swin_l converter (official DINO Swin-L, 4 and 5 scales): the official keys are `dino_keys` with
DINO's Swin under `backbone.0.` (Swin v1's layout from `swin_keys`, with the output norms `norm{i}` of the
stages in return_interm_indices only: models/dino/swin_transformer.py:549-553). Swin-L sized (on the meta
device: no memory) against the shipped configs' every key and shape; a tiny Swin of the same layout with
values, loaded strictly into the model of the shipped config with the Swin's size overridden; every key used;
the R-50 and Swin-L releases refused by each other's converter, naming the right one. No download, no
official code."""
import os
import runpy
from typing import Dict, Sequence

import pytest
import torch
from detectron2.modeling import build_model

from hybrid_detr.config import load_config
from hybrid_detr.converters import CONVERTERS, ConversionError
from hybrid_detr.converters.common import check_against_config
from hybrid_detr.converters.kinds import describe_kind
from hybrid_detr.converters.report import convert_and_report
from hybrid_detr.model_zoo import get_config_file
from official_keys import seeded_state_dict
from test_convert_dino import _save, dino_keys, dino_state
from test_convert_swin import LARGE, TINY, swin_keys

PREFIX = "backbone.0."


def out_stages(scales: int) -> Sequence[int]:
    return (1, 2, 3) if scales == 4 else (0, 1, 2, 3)  # return_interm_indices of DINO_4scale / DINO_5scale


def dino_swin_keys(scales=4, arch=LARGE, norms=None):
    """DINO with its Swin (`arch`: embedding width, depths, heads, window) as backbone.0, output norms `norms`
    (by default those of `scales`)."""
    norms = out_stages(scales) if norms is None else norms
    swin = [(k, s) for k, s in swin_keys(arch, "swin_v1", prefix=PREFIX)
            if not k.startswith(PREFIX + "norm") or int(k[len(PREFIX) + 4]) in norms]
    return dino_keys(scales, backbone=swin, stage_channels=[arch[0] * 2 ** i for i in range(4)])


def dino_swin_state(scales=4, arch=TINY, seed=0, norms=None) -> Dict[str, torch.Tensor]:
    """Seeded values, the decoder heads shared as in `dino_state`; the Swin's relative_position_index as longs."""
    state = seeded_state_dict(dino_swin_keys(scales, arch, norms), seed=seed)
    shared = dino_state(scales, seed=seed)  # the shared heads and their aliases, equal copies
    for key in [k for k in state if k.startswith(("class_embed.", "bbox_embed.", "transformer.decoder.class_embed.", "transformer.decoder.bbox_embed."))]:
        state[key] = shared[key]
    for key in [k for k in state if k.endswith("relative_position_index")]:
        state[key] = state[key].abs().long()
    return state


def swin_l_on_meta(scales: int) -> Dict[str, torch.Tensor]:
    """A Swin-L DINO: the Swin's tensors on the meta device (shapes only), the rest with values."""
    state = {k: v for k, v in dino_state(scales).items() if not k.startswith("backbone.")}
    # input_proj 1x1 convs take the Swin-L stages' channels.
    for key, shape in dino_swin_keys(scales, LARGE):
        if key.startswith(PREFIX):
            state[key] = torch.empty(shape, device="meta")
        elif key.startswith("input_proj.") and tuple(state[key].shape) != shape:
            state[key] = torch.zeros(shape)
    return state


@pytest.mark.parametrize("scales", [4, 5])
def test_swin_l_release_fits_its_config(scales):
    conversion = CONVERTERS["dino_swin_l"](swin_l_on_meta(scales))
    assert conversion.config_name == f"coco/dino_swin_l_{scales}scale_12ep.yaml"
    check_against_config(conversion)  # every key and shape of the model the config builds
    assert any("Swin backbone (swin_v1 layout)" in note for note in conversion.notes)


def _tiny_swin_model(scales):
    embed, depths, heads, window = TINY
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.SWIN.ARCH", "swin_tiny_patch4_window7_224",
            "MODEL.SWIN.EMBED_DIM", embed, "MODEL.SWIN.DEPTHS", depths, "MODEL.SWIN.NUM_HEADS", heads, "MODEL.SWIN.WINDOW_SIZE", window]
    cfg = load_config(get_config_file(f"coco/dino_swin_l_{scales}scale_12ep.yaml"), opts)
    return build_model(cfg)


@pytest.mark.parametrize("scales", [4, 5])
def test_tiny_swin_converts_with_its_values_and_loads_strictly(scales):
    official = dino_swin_state(scales, seed=scales)
    conversion = CONVERTERS["dino_swin_l"](official)  # every official key used, or an error
    model = _tiny_swin_model(scales)
    model.load_state_dict(conversion.state_dict, strict=True)
    sd = model.state_dict()
    first = min(out_stages(scales))
    assert sorted(model.backbone.output_norms) == [f"res{i + 2}" for i in out_stages(scales)]
    assert torch.equal(sd[f"backbone.output_norms.res{first + 2}.weight"], official[f"{PREFIX}norm{first}.weight"])
    assert torch.equal(sd["backbone.output_norms.res5.bias"], official[f"{PREFIX}norm3.bias"])
    assert torch.equal(sd["backbone.body.patch_embed.proj.weight"], official[f"{PREFIX}patch_embed.proj.weight"])
    assert torch.equal(sd["backbone.body.layers.2.blocks.1.attn.qkv.weight"], official[f"{PREFIX}layers.2.blocks.1.attn.qkv.weight"])
    # Patch merging ends stage i there, starts stage i + 1 in timm.
    assert torch.equal(sd["backbone.body.layers.3.downsample.reduction.weight"], official[f"{PREFIX}layers.2.downsample.reduction.weight"])
    # The rest as for R-50: the projections on the Swin's stages, the heads, the label book.
    assert torch.equal(sd["neck.input_proj.0.0.weight"], official["input_proj.0.0.weight"])
    assert torch.equal(sd["neck.extra_proj.0.0.weight"], official[f"input_proj.{scales - 1}.0.weight"])
    assert torch.equal(sd["query_source.content.weight"], official["transformer.tgt_embed.weight"])
    assert sd["main_passes.dn.label_embedding.weight"].shape == (81, 256)


def test_each_backbone_refused_by_the_other_converter(tmp_path):
    resnet, swin = dino_state(), dino_swin_state()
    with pytest.raises(ConversionError, match=r"found a torchvision ResNet \(backbone.0.body.\*\): convert it with the dino converter"):
        CONVERTERS["dino_swin_l"](resnet)
    with pytest.raises(ConversionError, match="Swin backbone .*convert it with the dino_swin_l converter"):
        CONVERTERS["dino"](swin)
    assert describe_kind(swin) == "a DINO checkpoint (4 scales, Swin backbone)"
    # Co-DINO's Swin-L converter (backbone.* directly) names it too.
    with pytest.raises(ConversionError, match=r"found a DINO checkpoint \(4 scales, Swin backbone\)"):
        CONVERTERS["co_dino_swin_l"](swin)
    # Through the tool: the error on stderr, no output file.
    output = tmp_path / "out.pth"
    assert convert_and_report("dino_swin_l", _save(tmp_path, "checkpoint0011_4scale.pth", resnet), str(output)) == 1
    assert not output.exists()


@pytest.mark.parametrize(
    "scales, norms, named",
    [
        (4, (0, 1, 2, 3), r"output norms \['norm0', 'norm1', 'norm2', 'norm3'\] for 3 backbone levels.*\['norm1', 'norm2', 'norm3'\]"),
        (5, (1, 2, 3), r"output norms \['norm1', 'norm2', 'norm3'\] for 4 backbone levels.*\['norm0', 'norm1', 'norm2', 'norm3'\]"),
        (4, (0, 1, 2), r"output norms \['norm0', 'norm1', 'norm2'\] for 3 backbone levels"),
    ],
)
def test_output_norms_must_be_the_last_stages(scales, norms, named):
    with pytest.raises(ConversionError, match=named):
        CONVERTERS["dino_swin_l"](dino_swin_state(scales, norms=norms))


def test_every_key_is_used_and_a_missing_one_named():
    state = dino_swin_state()
    with pytest.raises(ConversionError, match="'backbone.0.layers.1.blocks.0.attn.extra.weight' is not a Swin"):
        CONVERTERS["dino_swin_l"]({**state, f"{PREFIX}layers.1.blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="does not know: transformer.two_stage_wh_embedding.weight"):
        CONVERTERS["dino_swin_l"]({**state, "transformer.two_stage_wh_embedding.weight": torch.zeros(1, 2)})
    # A classification Swin's final norm is no part of DINO's backbone (the Swin converter alone drops it).
    with pytest.raises(ConversionError, match="backbone.0.norm.weight belong to a classification Swin"):
        CONVERTERS["dino_swin_l"]({**state, f"{PREFIX}norm.weight": torch.ones(128)})
    # A missing tensor: the converted dict lacks it, and the check against the config names it.
    large = swin_l_on_meta(4)
    del large[f"{PREFIX}layers.2.blocks.17.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing: backbone.body.layers.2.blocks.17.mlp.fc2.bias"):
        check_against_config(CONVERTERS["dino_swin_l"](large))


def test_the_tool_lists_dino_swin_l(capsys):
    tool = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_official.py"))
    with pytest.raises(SystemExit):
        tool["main"](["--help"])
    assert "dino_swin_l" in capsys.readouterr().out
