"""The shared transformer: the multi-level token layout, and the whole forward as one graph."""
import pytest
import torch
from detectron2.modeling import build_model

from hybrid_detr.modeling.token_layout import LevelLayout, valid_ratios
from model_helpers import synthetic_batch, tiny_cfg


def test_layout_flattens_and_splits_back():
    maps = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 2, 3), torch.randn(2, 3, 1, 1)]
    layout = LevelLayout.of_maps(maps)
    assert layout.shapes == ((4, 5), (2, 3), (1, 1)) and layout.sizes == [20, 6, 1]
    assert layout.spatial_shapes.tolist() == [[4, 5], [2, 3], [1, 1]]
    assert layout.level_start_index.tolist() == [0, 20, 26]
    tokens = layout.flatten(maps)
    assert tokens.shape == (2, 27, 3)
    assert torch.equal(tokens[:, layout.level_tokens(1)], maps[1].flatten(2).transpose(1, 2))
    for back, original in zip(layout.split(tokens), maps):
        assert torch.equal(back, original)
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in layout.shapes]
    assert layout.flatten(masks).shape == (2, 27)


def test_symbolic_layout_equals_the_int_one_in_eager_mode():
    maps = [torch.randn(1, 3, 4, 5), torch.randn(1, 3, 2, 3)]
    ints, symbolic = LevelLayout.of_maps(maps), LevelLayout.of_maps(maps, symbolic=True)
    assert symbolic.shapes == ints.shapes
    assert torch.equal(symbolic.spatial_shapes, ints.spatial_shapes)
    assert torch.equal(symbolic.level_start_index, ints.level_start_index)


def test_layout_needs_no_device_values():
    """Shapes come from the maps' sizes: a layout of meta tensors (which hold no values) works."""
    layout = LevelLayout.of_maps([torch.empty(1, 8, 6, 7, device="meta"), torch.empty(1, 8, 3, 4, device="meta")])
    assert layout.shapes == ((6, 7), (3, 4)) and layout.num_tokens == 54
    assert layout.spatial_shapes.device.type == "meta"


def test_token_centers_are_normalised_to_the_valid_image():
    mask = torch.ones(1, 4, 6, dtype=torch.bool)
    mask[0, :2, :3] = False  # valid: 2 rows x 3 columns
    ratios = valid_ratios([mask])
    torch.testing.assert_close(ratios, torch.tensor([[[0.5, 0.5]]]))
    centers = LevelLayout.of_shapes([(4, 6)]).token_centers(ratios).view(4, 6, 2)
    torch.testing.assert_close(centers[0, 0], torch.tensor([0.5 / 3, 0.5 / 2]))
    torch.testing.assert_close(centers[1, 2], torch.tensor([2.5 / 3, 1.5 / 2]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides", [{}, {"DECODER_MODE": "smca", "TWO_STAGE": True, "WITH_BOX_REFINE": True}], ids=["learned", "two_stage_smca"]
)
def test_transformer_compiles_as_one_graph(overrides):
    """Encoder, query selection and decoder under torch.compile(fullgraph=True): a graph break (a
    host read of a device value such as .item() or .tolist()) would fail here."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**overrides)).eval()
    with torch.no_grad():
        images, padding_mask = model.preprocess_image(synthetic_batch())
        levels = model.features(images.tensor, padding_mask)
        eager = model.transformer(*levels)
        compiled = torch.compile(model.transformer, fullgraph=True)(*levels)
    torch.testing.assert_close(compiled[3].logits, eager[3].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[3].boxes, eager[3].boxes, atol=1e-5, rtol=1e-5)
