"""The dac_detr_swin_l converter (the official DAC-DETR Swin-L release, configs/swin_deformplus_cdn_ice_ep12.sh):
the official keys are `dac_detr_keys` with the R-50 replaced by the release's Swin under `backbone.0.body.`
(models/backbone.py:197-211, 232: Swin v1's layout from `swin_keys` with the output norms norm1-norm3 of
out_indices (1, 2, 3) only) and the 1x1 input projections on its stages 1-3. Swin-L sized (on the meta device:
no memory) against the shipped config's every key and shape; a tiny Swin of the same layout with values, loaded
strictly into the model of the shipped config with the Swin's size overridden; every key used; the R-50 and
Swin-L releases refused by each other's converter, naming the right one. No download, no official code."""
import os
import runpy
from typing import Dict, Sequence

import pytest
import torch
from detectron2.modeling import build_model

from hybrid_detr.config import load_config
from hybrid_detr.converters import CONVERTERS, ConversionError
from hybrid_detr.converters.common import COCO_THING_IDS, check_against_config
from hybrid_detr.converters.kinds import describe_kind
from hybrid_detr.converters.report import convert_and_report
from hybrid_detr.model_zoo import get_config_file
from official_keys import seeded_state_dict
from official_keys_dac_co_detr import dac_detr_keys
from test_convert_dac_co_detr import _save
from test_convert_dino_swin import dino_swin_state
from test_convert_swin import LARGE, TINY, swin_keys

PREFIX = "backbone.0.body."
CONFIG = "coco/dac_dino_swin_l_12ep_release.yaml"
IDS = torch.as_tensor(COCO_THING_IDS)


def dac_swin_keys(arch=LARGE, norms: Sequence[int] = (1, 2, 3)):
    """The DAC-DETR release with its Swin (`arch`: embedding width, depths, heads, window) as backbone.0.body,
    output norms `norms` (the release's: out_indices (1, 2, 3))."""
    swin = [(k, s) for k, s in swin_keys(arch, "swin_v1", prefix=PREFIX)
            if not k.startswith(PREFIX + "norm") or int(k[len(PREFIX) + 4]) in norms]
    return dac_detr_keys(backbone=swin, channels=[arch[0] * 2 ** i for i in (1, 2, 3)])


def dac_swin_state(arch=TINY, seed=0, norms=(1, 2, 3)) -> Dict[str, torch.Tensor]:
    """Seeded values (the heads' decoder aliases equal to them); the Swin's relative_position_index as longs."""
    state = seeded_state_dict(dac_swin_keys(arch, norms), seed=seed)
    for key in [k for k in state if k.endswith("relative_position_index")]:
        state[key] = state[key].abs().long()
    return state


def swin_l_on_meta() -> Dict[str, torch.Tensor]:
    """The Swin-L release: the Swin's tensors on the meta device (shapes only), the rest with values."""
    keys = dac_swin_keys(LARGE)
    state = seeded_state_dict([(k, s) for k, s in keys if not k.startswith(PREFIX)])
    state.update({k: torch.empty(s, device="meta") for k, s in keys if k.startswith(PREFIX)})
    return state


def test_swin_l_release_fits_its_config():
    conversion = CONVERTERS["dac_detr_swin_l"](swin_l_on_meta())
    assert conversion.config_name == CONFIG
    check_against_config(conversion)  # every key and shape of the model the config builds
    assert any("Swin backbone (swin_v1 layout)" in note for note in conversion.notes)
    assert any("label_enc" in note for note in conversion.notes)


def _tiny_swin_model():
    embed, depths, heads, window = TINY
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.SWIN.ARCH", "swin_tiny_patch4_window7_224",
            "MODEL.SWIN.EMBED_DIM", embed, "MODEL.SWIN.DEPTHS", depths, "MODEL.SWIN.NUM_HEADS", heads, "MODEL.SWIN.WINDOW_SIZE", window]
    return build_model(load_config(get_config_file(CONFIG), opts))


def test_tiny_swin_converts_with_its_values_and_loads_strictly():
    official = dac_swin_state(seed=3)
    conversion = CONVERTERS["dac_detr_swin_l"](official)  # every official key used, or an error
    model = _tiny_swin_model()
    model.load_state_dict(conversion.state_dict, strict=True)
    sd = model.state_dict()
    assert sorted(model.backbone.output_norms) == ["res3", "res4", "res5"]
    assert torch.equal(sd["backbone.output_norms.res3.weight"], official[f"{PREFIX}norm1.weight"])
    assert torch.equal(sd["backbone.output_norms.res5.bias"], official[f"{PREFIX}norm3.bias"])
    assert torch.equal(sd["backbone.body.patch_embed.proj.weight"], official[f"{PREFIX}patch_embed.proj.weight"])
    assert torch.equal(sd["backbone.body.patch_embed.norm.bias"], official[f"{PREFIX}patch_embed.norm.bias"])
    assert torch.equal(sd["backbone.body.layers.2.blocks.1.attn.qkv.weight"], official[f"{PREFIX}layers.2.blocks.1.attn.qkv.weight"])
    # Patch merging ends stage i there, starts stage i + 1 in timm.
    assert torch.equal(sd["backbone.body.layers.3.downsample.reduction.weight"], official[f"{PREFIX}layers.2.downsample.reduction.weight"])
    # The rest as for R-50: the projections on the Swin's stages, the heads, the DAC / CDN extras.
    assert torch.equal(sd["neck.input_proj.0.0.weight"], official["input_proj.0.0.weight"])
    assert torch.equal(sd["neck.extra_proj.0.0.weight"], official["input_proj.3.0.weight"])
    assert torch.equal(sd["decoder.heads.class_heads.4.bias"], official["class_embed.4.bias"][IDS])
    assert torch.equal(sd["query_source.content.weight"], official["query_embed.weight"])
    label_enc = official["label_enc.weight"]
    assert torch.equal(sd["main_passes.dn.label_embedding.weight"], torch.cat((label_enc[IDS], label_enc[91:])))


def test_each_backbone_refused_by_the_other_converter(tmp_path):
    resnet, swin = seeded_state_dict(dac_detr_keys()), dac_swin_state()
    with pytest.raises(ConversionError, match=r"dac_detr_swin_l checkpoint: expected DAC-DETR's Swin under 'backbone.0.body.'.*"
                       r"found a torchvision ResNet \(backbone.0.body.\*\): convert it with the dac_detr converter"):
        CONVERTERS["dac_detr_swin_l"](resnet)
    with pytest.raises(ConversionError, match=r"dac_detr checkpoint with a Swin backbone .*convert it with the dac_detr_swin_l converter"):
        CONVERTERS["dac_detr"](swin)
    assert describe_kind(swin) == "a DAC-DETR (DINO-style, CDN label_enc) checkpoint, Swin backbone"
    assert describe_kind(resnet) == "a DAC-DETR (DINO-style, CDN label_enc) checkpoint"
    # The Deformable DETR converter has no Swin; it names what it found.
    with pytest.raises(ConversionError, match=r"no Deformable DETR converter takes it \(found a DAC-DETR .* Swin backbone\)"):
        CONVERTERS["deformable_detr"](swin)
    # DINO's Swin-L and DAC-DETR's Swin-L: each converter refuses the other's release.
    with pytest.raises(ConversionError, match=r"expected an official DINO checkpoint.*found a DAC-DETR .*, Swin backbone"):
        CONVERTERS["dino_swin_l"](swin)
    with pytest.raises(ConversionError, match=r"expected a DAC-DETR release checkpoint.*found a DINO checkpoint \(4 scales, Swin backbone\)"):
        CONVERTERS["dac_detr_swin_l"](dino_swin_state())
    # Through the tool: the error on stderr, no output file.
    output = tmp_path / "out.pth"
    assert convert_and_report("dac_detr_swin_l", _save(tmp_path, "checkpoint0011.pth", resnet), str(output)) == 1
    assert not output.exists()


@pytest.mark.parametrize(
    "norms, named",
    [
        ((0, 1, 2, 3), r"output norms \['norm0', 'norm1', 'norm2', 'norm3'\] for 3 backbone levels.*\['norm1', 'norm2', 'norm3'\]"),
        ((1, 2), r"output norms \['norm1', 'norm2'\] for 3 backbone levels"),
    ],
)
def test_output_norms_must_be_those_of_the_three_levels(norms, named):
    with pytest.raises(ConversionError, match=named):
        CONVERTERS["dac_detr_swin_l"](dac_swin_state(norms=norms))


def test_every_key_is_used_and_a_missing_one_named():
    state = dac_swin_state()
    with pytest.raises(ConversionError, match="'backbone.0.body.layers.1.blocks.0.attn.extra.weight' is not a Swin"):
        CONVERTERS["dac_detr_swin_l"]({**state, f"{PREFIX}layers.1.blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="dac_detr_swin_l checkpoint has keys this converter does not know: transformer.extra.weight"):
        CONVERTERS["dac_detr_swin_l"]({**state, "transformer.extra.weight": torch.zeros(1, 2)})
    # A classification Swin's final norm is no part of the release's backbone.
    with pytest.raises(ConversionError, match="backbone.0.body.norm.weight belong to a classification Swin"):
        CONVERTERS["dac_detr_swin_l"]({**state, f"{PREFIX}norm.weight": torch.ones(128)})
    # A missing tensor: the converted dict lacks it, and the check against the config names it.
    large = swin_l_on_meta()
    del large[f"{PREFIX}layers.2.blocks.17.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing: backbone.body.layers.2.blocks.17.mlp.fc2.bias"):
        check_against_config(CONVERTERS["dac_detr_swin_l"](large))


def test_the_tool_lists_dac_detr_swin_l(capsys):
    tool = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_official.py"))
    with pytest.raises(SystemExit):
        tool["main"](["--help"])
    assert "dac_detr_swin_l" in capsys.readouterr().out
