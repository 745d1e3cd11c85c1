"""The mode contract: a mode registered from this file alone (config keys, a main-pass hook that adds
queries to the one-to-one pass, an explain view) composes as "deformable+toy", trains and draws,
with nothing else of the package edited. And the query-group masks the hook relies on."""
import dataclasses

import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.modeling import build_model

from hybrid_detr.config import merge_overrides
from hybrid_detr.modeling import (
    DECODER_MODES,
    ExtraQueries,
    MainPassHook,
    parse_decoder_mode,
    register_decoder_mode,
    unregister_decoder_mode,
)
from hybrid_detr.modeling.explain_support import pyplot
from hybrid_detr.modeling.query_groups import concat_groups, split_decoder_output
from hybrid_detr.modeling.transformer import QueryGroup
from model_helpers import synthetic_batch, synthetic_input, tiny_cfg


# ---------------------------------------------------------------- the toy mode, all of it
def add_toy_config(cfg):
    cfg.MODEL.HYBRID_DETR.TOY = CN()
    cfg.MODEL.HYBRID_DETR.TOY.NUM_QUERIES = 4
    cfg.MODEL.HYBRID_DETR.TOY.SEES_ONE_TO_ONE = False


class ToyGroup(MainPassHook):
    """An extra group of learned queries in the one-to-one pass, matched one-to-one on its own
    (Group-DETR's idea, in miniature)."""

    def __init__(self, cfg):
        super().__init__()
        m = cfg.MODEL.HYBRID_DETR
        self.queries = torch.nn.Embedding(m.TOY.NUM_QUERIES, 2 * m.HIDDEN_DIM)
        self.sees_one_to_one = m.TOY.SEES_ONE_TO_ONE
        self.enabled = True

    def extra_queries(self, inputs):
        if not self.enabled:
            return None
        n = inputs.queries.content.shape[0]
        position, content = self.queries.weight[None].expand(n, -1, -1).chunk(2, dim=-1)
        reference = position[..., :2].sigmoid()
        return ExtraQueries(QueryGroup(content, position, reference), sees_one_to_one=self.sees_one_to_one, state="toy")

    def losses(self, inputs, extra, output):
        if extra is None:
            return {}
        assert extra.state == "toy"
        targets = inputs.targets
        matcher = HUNGARIAN[0]
        return inputs.criterion.decoder_losses(
            output, targets, lambda _, logits, boxes: matcher(logits, boxes, targets), inputs.num_boxes, prefix="toy_"
        )


HUNGARIAN = []  # the model's matcher, set by the test (a toy mode may build its own)


def toy_view(model, captured, request):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(request.image)
    ax.set_title(f"toy: {model.main_passes['toy'].queries.num_embeddings} queries")
    path = request.path("toy.png")
    fig.savefig(path)
    plt.close(fig)
    return {"path": path}


@pytest.fixture
def toy_mode():
    register_decoder_mode("toy", add_config=add_toy_config, main_pass=ToyGroup, explain_view=toy_view)
    yield
    unregister_decoder_mode("toy")


# ---------------------------------------------------------------- tests
def toy_model(sees_one_to_one=False):
    cfg = tiny_cfg()
    merge_overrides(cfg, ["MODEL.HYBRID_DETR.DECODER_MODE", "deformable+toy", "MODEL.HYBRID_DETR.TOY.NUM_QUERIES", "6",
                          "MODEL.HYBRID_DETR.TOY.SEES_ONE_TO_ONE", str(sees_one_to_one)])
    torch.manual_seed(0)
    model = build_model(cfg)
    HUNGARIAN[:] = [model.matcher]
    return cfg, model


def test_a_mode_registered_from_a_test_file_trains_and_explains(toy_mode, tmp_path):
    cfg, model = toy_model()
    assert "toy" in DECODER_MODES and parse_decoder_mode("deformable+toy").main_passes == ("toy",)
    assert model.main_passes["toy"].queries.num_embeddings == 6  # its config key reached it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = synthetic_batch()
    before = model.main_passes["toy"].queries.weight.detach().clone()
    for _ in range(2):
        losses = model(batch)
        assert {"toy_loss_class", "toy_loss_bbox", "toy_loss_giou", "toy_loss_class_0"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert not torch.equal(before, model.main_passes["toy"].queries.weight)  # its queries train

    from hybrid_detr.analysis.explain import explain

    model.eval()
    results = explain(model, synthetic_input(96, 128, 2, seed=4), str(tmp_path), image_format=cfg.INPUT.FORMAT)
    assert results["toy"]["path"] == str(tmp_path / "toy.png")
    with open(results["toy"]["path"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sees_one_to_one", [False, True])
def test_the_one_to_one_queries_never_see_a_hooks_queries(toy_mode, sees_one_to_one):
    _, model = toy_model(sees_one_to_one)
    model.train()
    hook = model.main_passes["toy"]
    batch = synthetic_batch()
    with torch.no_grad():
        with_toy = model(batch)
        hook.enabled = False
        without = model(batch)
        hook.enabled = True
        assert set(with_toy) - set(without) == {k for k in with_toy if k.startswith("toy_")}
        for name, value in without.items():
            torch.testing.assert_close(with_toy[name], value, rtol=0, atol=1e-5)
        # The hook's queries change, the one-to-one losses do not.
        hook.queries.weight.add_(0.5)
        changed = model(batch)
        for name in without:
            torch.testing.assert_close(changed[name], without[name], rtol=0, atol=1e-5)
        assert changed["toy_loss_class"] != with_toy["toy_loss_class"]
        # The one-to-one queries change: the hook's queries notice only when they see them.
        model.query_source.embedding.weight.add_(0.5)
        moved = model(batch)
    assert moved["loss_class"] != changed["loss_class"]
    toy_moved = any((moved[k] - changed[k]).abs() > 1e-5 for k in changed if k.startswith("toy_"))
    assert toy_moved == sees_one_to_one


def test_concat_groups_masks():
    def group(q, padding=None):
        return QueryGroup(torch.zeros(2, q, 4), torch.zeros(2, q, 4), torch.full((2, q, 2), 0.5), padding_mask=padding)

    inner = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    extra = dataclasses.replace(group(3), self_attn_mask=inner)
    main = group(2)
    sees = torch.tensor([[True, True], [False, True]])  # extra sees main; main sees only itself
    joined = concat_groups([extra, main], sees)
    blocked = joined.self_attn_mask
    assert blocked[:3, :3].equal(inner)  # the group's own mask kept
    assert not blocked[:3, 3:].any() and blocked[3:, :3].all() and not blocked[3:, 3:].any()
    assert joined.padding_mask is None
    apart = concat_groups([group(3), group(2, torch.tensor([[False, True], [False, False]]))])
    assert apart.self_attn_mask[:3, 3:].all() and apart.self_attn_mask[3:, :3].all()
    assert apart.padding_mask.tolist() == [[False] * 4 + [True], [False] * 5]
    assert concat_groups([main]).self_attn_mask is None  # one group: nothing blocked, as before
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        concat_groups([extra, main], torch.ones(3, 3, dtype=torch.bool))


def test_split_decoder_output_splits_self_attention_outputs_too():
    from hybrid_detr.modeling.transformer import DecoderOutput

    out = DecoderOutput(torch.randn(2, 1, 5, 3), torch.rand(2, 1, 5, 4), torch.randn(2, 1, 5, 8), (torch.randn(1, 5, 8),) * 2)
    a, b = split_decoder_output(out, [2, 3], [None, torch.ones(1, 3, dtype=torch.bool)])
    assert a.logits.shape == (2, 1, 2, 3) and b.boxes.shape == (2, 1, 3, 4)
    assert len(b.self_attn_outputs) == 2 and b.self_attn_outputs[0].equal(out.self_attn_outputs[0][:, 2:])
    assert a.padding_mask is None and b.padding_mask.all()


def test_unknown_mode_part_is_refused():
    with pytest.raises(TypeError, match="unknown parts"):
        register_decoder_mode("bad", training_branch=object, explain=object)
    with pytest.raises(ValueError, match="brings nothing"):
        register_decoder_mode("bad", add_config=add_toy_config)
    assert "bad" not in DECODER_MODES
