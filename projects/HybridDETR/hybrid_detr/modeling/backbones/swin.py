"""Swin Transformer (Liu et al., ICCV 2021) as a detectron2 `Backbone`, built from timm's Swin.

The papers' Swin-L rows (DINO, DAC-DETR, Co-DINO) use the detection Swin of Swin-Transformer-Object-
Detection (Co-DETR `projects/models/swin_transformer.py` SwinTransformerV1, DINO `models/dino/
swin_transformer.py`, mmdet's `SwinTransformer`). It differs from timm's classification forward in three
places, which this module follows; timm gives the parameters, their layout and every layer (patch
embedding, window attention with its relative position bias, MLP, patch merging, drop path):

- any input size: the image is padded bottom / right to a multiple of the patch size, and each block pads
  its (normalised) map to whole windows *before* the cyclic shift, so that the shift and its attention
  mask are those of the padded map (timm's block shifts first, then pads: the same only when every
  stage is a whole number of windows). The padded tokens are zeros that the windows attend to and are
  cropped after the attention; patch merging pads odd sizes bottom / right (timm's `PatchMerging` does);
- windows are never shrunk to a small map and odd blocks always shift (timm's `always_partition`);
- one LayerNorm on each output stage (`norm0`..`norm3` there, `output_norms.<name>` here), no final norm.

timm's `features_only` model runs timm's own block forward (shift before padding), so it is not used;
its weight layout (`body.*`) is timm's, `hybrid_detr.converters.swin` converts the official layouts.

Outputs are named by stride as detectron2's ResNet stages ("res2".."res5": strides 4..32), so that
`MODEL.HYBRID_DETR.IN_FEATURES` reads the same for both backbones.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["SWIN_STAGE_NAMES", "SwinBackbone", "add_swin_config", "build_swin_backbone"]

SWIN_STAGE_NAMES = ("res2", "res3", "res4", "res5")
# The timm version the backbone is tested with (tools/bootstrap.sh installs it).
TIMM_VERSION = "1.0.31"


def add_swin_config(cfg) -> None:
    """`MODEL.SWIN.*` (idempotent). The architecture is a timm Swin name; the other keys override it."""
    if "SWIN" in cfg.MODEL:
        return
    cfg.MODEL.SWIN = CN()
    swin = cfg.MODEL.SWIN
    # A timm Swin: swin_{tiny,small,base,large}_patch4_window{7_224,12_384} (embedding width, depths,
    # heads, window). Swin-L of the papers' rows: "swin_large_patch4_window12_384" (ImageNet-22k, 384).
    swin.ARCH = "swin_tiny_patch4_window7_224"
    # Overrides of the architecture when set (0 / empty: the architecture's): a small Swin for tests and
    # the quickstart is e.g. EMBED_DIM 32, DEPTHS [2, 2, 2, 2], NUM_HEADS [1, 2, 4, 8].
    swin.EMBED_DIM = 0
    swin.DEPTHS = []
    swin.NUM_HEADS = []
    swin.WINDOW_SIZE = 0
    # Stages given to the neck ("res2".."res5", strides 4..32), each through its own LayerNorm.
    swin.OUT_FEATURES = ["res3", "res4", "res5"]
    # Stochastic depth, rising linearly over all blocks to this rate (official: 0.2 by default, 0.3 in
    # Co-DINO Swin-L).
    swin.DROP_PATH_RATE = 0.2
    # Recompute each block's activations in the backward pass (official `use_checkpoint`).
    swin.GRAD_CHECKPOINTING = False
    # Frozen parts follow MODEL.BACKBONE.FREEZE_AT as detectron2's ResNet: 0 none, 1 the patch
    # embedding, k >= 2 also the stages res2..res{k} (with their output norms).


def _require_timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"the Swin backbone (MODEL.BACKBONE.NAME build_swin_backbone) needs timm: run `bash tools/bootstrap.sh` "
            f"or `pip install timm=={TIMM_VERSION}`"
        ) from e
    return timm


def _padded_window_attention(block: nn.Module, x: torch.Tensor, shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """`block.attn` over (shifted) windows of x (B, H, W, C), the map padded to whole windows before the shift."""
    _, height, width, channels = x.shape
    window_h, window_w = block.window_size
    x = F.pad(x, (0, 0, 0, (-width) % window_w, 0, (-height) % window_h))
    padded_h, padded_w = x.shape[1], x.shape[2]
    shift = tuple(block.shift_size)
    shifted = any(shift)
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    from timm.models.swin_transformer import window_partition, window_reverse

    windows = window_partition(x, block.window_size).view(-1, window_h * window_w, channels)
    windows = block.attn(windows, mask=shift_mask if shifted else None)
    x = window_reverse(windows.view(-1, window_h, window_w, channels), block.window_size, padded_h, padded_w)
    if shifted:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :height, :width]


def _block_forward(block: nn.Module, x: torch.Tensor, shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One timm `SwinTransformerBlock` on x (B, H, W, C), with the detection Swin's padding."""
    x = x + block.drop_path1(_padded_window_attention(block, block.norm1(x), shift_mask))
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def _shift_mask(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The shifted windows' attention mask (-100 between regions that the shift made neighbours) for x's
    size padded to whole windows: timm's own mask, computed for the padded map."""
    window_h, window_w = block.window_size
    padded = x.new_empty(1, -(-x.shape[1] // window_h) * window_h, -(-x.shape[2] // window_w) * window_w, 0)
    return block.get_attn_mask(padded)


class SwinBackbone(Backbone):
    """A timm Swin (`body`, classifier and final norm removed) whose stages run with the detection Swin's
    padding, plus a LayerNorm on each output stage. Takes (N, 3, H, W) of any H, W; returns
    {name: (N, C, ceil(H / stride), ceil(W / stride))} for the names in `out_features`."""

    def __init__(
        self,
        body: nn.Module,
        out_features: Sequence[str],
        freeze_at: int = 0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        unknown = [name for name in out_features if name not in SWIN_STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.SWIN.OUT_FEATURES {list(out_features)}: choose among {list(SWIN_STAGE_NAMES)}"
            )
        indices = sorted(SWIN_STAGE_NAMES.index(name) for name in out_features)
        channels = [info["num_chs"] for info in body.feature_info]
        strides = [info["reduction"] for info in body.feature_info]
        # Stages after the last output, the final norm and the classifier are not part of a backbone.
        body.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self.body = body
        self.patch_size = tuple(body.patch_embed.patch_size)
        self._out_features = [SWIN_STAGE_NAMES[i] for i in indices]
        self._out_feature_channels = {SWIN_STAGE_NAMES[i]: channels[i] for i in indices}
        self._out_feature_strides = {SWIN_STAGE_NAMES[i]: strides[i] for i in indices}
        self.output_norms = nn.ModuleDict({SWIN_STAGE_NAMES[i]: nn.LayerNorm(channels[i]) for i in indices})
        self.grad_checkpointing = grad_checkpointing
        if freeze_at < 0 or freeze_at > 1 + len(SWIN_STAGE_NAMES):
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at}: 0 (nothing) to 5 (patch embedding + 4 stages)")
        self.freeze_at = freeze_at
        for module in self._frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.train()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.freeze_at == 0:
            return []
        modules = [self.body.patch_embed]
        for index in range(min(self.freeze_at - 1, len(self.body.layers))):
            modules.append(self.body.layers[index])
            name = SWIN_STAGE_NAMES[index]
            if name in self.output_norms:
                modules.append(self.output_norms[name])
        return modules

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():  # no drop path in frozen stages, as the official _freeze_stages
            module.eval()
        return self

    @property
    def size_divisibility(self) -> int:
        return 0  # any size: the backbone pads itself

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"SwinBackbone takes (N, C, H, W) images, got shape {tuple(images.shape)}")
        patch_h, patch_w = self.patch_size
        height, width = images.shape[-2:]
        x = F.pad(images, (0, (-width) % patch_w, 0, (-height) % patch_h))
        x = self.body.patch_embed(x)  # (N, H / 4, W / 4, C)
        outputs = {}
        for index, stage in enumerate(self.body.layers):
            x = stage.downsample(x)
            shift_mask = _shift_mask(stage.blocks[1], x) if len(stage.blocks) > 1 else None
            for block in stage.blocks:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(_block_forward, block, x, shift_mask, use_reentrant=False)
                else:
                    x = _block_forward(block, x, shift_mask)
            name = SWIN_STAGE_NAMES[index]
            if name in self.output_norms:
                outputs[name] = self.output_norms[name](x).permute(0, 3, 1, 2).contiguous()
        return outputs


def _timm_swin(cfg, in_channels: int) -> nn.Module:
    timm = _require_timm()
    swin = cfg.MODEL.SWIN
    overrides = {}
    if swin.EMBED_DIM:
        overrides["embed_dim"] = swin.EMBED_DIM
    if swin.DEPTHS:
        overrides["depths"] = tuple(swin.DEPTHS)
    if swin.NUM_HEADS:
        overrides["num_heads"] = tuple(swin.NUM_HEADS)
    if swin.WINDOW_SIZE:
        overrides["window_size"] = swin.WINDOW_SIZE
    if swin.DEPTHS and swin.NUM_HEADS and len(swin.DEPTHS) != len(swin.NUM_HEADS):
        raise ValueError(f"MODEL.SWIN.DEPTHS {swin.DEPTHS} and NUM_HEADS {swin.NUM_HEADS} must have one entry per stage")
    if not swin.ARCH.startswith("swin_") or swin.ARCH not in timm.list_models("swin_*"):
        raise ValueError(
            f"MODEL.SWIN.ARCH {swin.ARCH!r} is not a timm Swin; choose e.g. swin_tiny_patch4_window7_224, "
            f"swin_small_patch4_window7_224, swin_base_patch4_window12_384, swin_large_patch4_window12_384"
        )
    return timm.create_model(
        swin.ARCH,
        pretrained=False,  # weights come through MODEL.WEIGHTS (hybrid_detr.converters.swin)
        in_chans=in_channels,
        num_classes=0,
        drop_path_rate=swin.DROP_PATH_RATE,
        strict_img_size=False,  # no fixed-size attention masks: computed per input
        always_partition=True,
        **overrides,
    )


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> SwinBackbone:
    """MODEL.BACKBONE.NAME "build_swin_backbone": a Swin from `MODEL.SWIN.*` (see `add_swin_config`)."""
    if "SWIN" not in cfg.MODEL:
        raise KeyError(
            "MODEL.BACKBONE.NAME build_swin_backbone needs the MODEL.SWIN keys: load the config with "
            "hybrid_detr.config.load_config, or call hybrid_detr.modeling.backbones.add_swin_config(cfg) first"
        )
    body = _timm_swin(cfg, input_shape.channels)
    return SwinBackbone(
        body, cfg.MODEL.SWIN.OUT_FEATURES, cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.SWIN.GRAD_CHECKPOINTING
    )
