"""Training parity of the losses (behind tools/compare_losses.py): with the same predictions, the same
batch and the same random draws, our losses against the official criteria's, term by term and per layer.

Both criteria see the same tensors, the per-layer outputs of *our* model (a training forward of the
shipped config, weights drawn at random, small images, seeded targets: `capture_model_losses`) or
synthetic predictions (`synthetic_loss_inputs`, what the recorded fixtures of
tests/tools/test_loss_parity.py hold): `LossInputs`. Ours are computed by the model's own parts
(`OurLossParts`: its criterion, Hungarian matcher, DAC branch and denoising hook; `our_losses`, checked
against the model's own loss dict in `compare_losses`); the official ones by the official `SetCriterion`
(and matchers) built by the official `build` of a source tree given by path (nothing of it copied here,
the import shims of `official_comparison` / `dino_comparison`), its losses weighted by its `weight_dict`.
Every official `.cuda()` / `.to('cuda')` runs on the CPU (`cuda_on_cpu`, a patch active during their
calls only). Both use one class count: the official criterion's `num_classes` (the background slot of its
one-hot target) is set to ours.

- `deformable_detr` (fundamentalvision/Deformable-DETR `SetCriterion` + `HungarianMatcher`): our
  loss_class / loss_bbox / loss_giou[_i] against its loss_ce / loss_bbox / loss_giou[_i]; two-stage:
  our enc_loss_* against its class-agnostic `*_enc`.
- `dac_detr` (huzhengdongcs/DAC-DETR, the release's criterion, `balance_targets` = the targets x 3 as its
  engine.py): our dac_loss_*[_i] (C-decoder, one-to-many) against its unsuffixed loss_*[_i], with the
  IoU-aware BCE (DAC.CLS_LOSS "iou_aware_bce", its `IA_BCE_loss`); also our loss_* (O-decoder) against its
  `*_one2one`, dn_loss_* / dac_dn_loss_* against `*_dn_one2one` / `*_dn`, enc_loss_* against `*_enc`. The
  release caps each image's positives at 75 with a random subsample (onetomany.py `subsample_labels`):
  its choice is recorded (`record_dac_subsample`) and given to our `DACMatcher` as its random key
  (`dac_cap_keys`), so both train the same positives.
- `dino` (IDEA-Research/DINO `SetCriterion`): loss_*[_i] against loss_ce/..., dn_loss_*[_i] against
  `*_dn[_i]`, enc_loss_* (DINO's class-aware "interm" loss) against `*_interm`. The denoising groups are
  compared first (`compare_denoising_groups`): the official `prepare_for_cdn` run from the RNG state our
  hook drew its noise from gives the same labels, boxes and attention mask.

The GIoU loss adds MODEL.HYBRID_DETR.GIOU_EPS to the union and the enclosing area: 0 as Deformable DETR
and DAC-DETR, 1e-6 in the DINO configs, as the official `generalized_box_iou`s. The denoising references
go through the model's INVERSE_SIGMOID_EPS (DAC-DETR's release 1e-5, DINO 1e-3), as the official ones.
What is not the same, and shows in the report: where one query is among the best of two gts of one class, the release's IoU-aware
BCE keeps the target written last (an index_put with a repeated index, unspecified in PyTorch), ours the
larger: the report counts such entries (`dac_assignment_summary`); the synthetic targets never overlap,
so that they have none.
"""
import copy
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from ..config import load_config
from ..model_zoo import get_config_file
from ..modeling.dn import DenoisingQueries, denoising_groups, num_denoising_groups
from ..modeling.modes import ExtraQueries, MainPassInputs
from ..modeling.transformer import DecoderOutput

__all__ = [
    "KINDS",
    "MODEL_CONFIGS",
    "Predictions",
    "LossInputs",
    "OurLossParts",
    "our_losses",
    "dac_cap_keys",
    "cuda_on_cpu",
    "official_criterion",
    "official_losses",
    "official_name_to_ours",
    "compare_terms",
    "capture_model_losses",
    "synthetic_loss_inputs",
    "compare_denoising_groups",
    "official_denoising_groups",
    "compare_losses",
    "loss_report",
    "record_fixture",
    "fixture_parts",
    "fixture_losses",
    "save_fixture",
    "load_fixture",
]

KINDS = ("deformable_detr", "dac_detr", "dino")
# Our config of each compared setting (kind -> {variant: config}).
MODEL_CONFIGS = {
    "deformable_detr": {"plain": "coco/deformable_detr_r50_50ep.yaml", "two_stage": "coco/deformable_detr_r50_two_stage_50ep.yaml"},
    "dac_detr": {"release": "coco/dac_dino_r50_12ep_release.yaml"},
    "dino": {"4scale": "coco/dino_r50_4scale_12ep.yaml"},
}
# Boxes per image of the seeded targets (model outputs). DAC's are placed on the proposal grid
# (`_grid_boxes`), the first image's more than the release's cap of 75 positives, so that its random
# subsample decides.
BOX_COUNTS = {"deformable_detr": (7, 3), "dac_detr": (110, 6), "dino": (6, 3)}
# Two sizes (padding exercised), each with more encoder tokens than DINO's and DAC's 900 queries.
IMAGE_SIZES = ((256, 320), (224, 288))
# A light model for the loss parts alone (synthetic inputs, the fixtures): the loss settings of the
# config, a small backbone and transformer (neither takes part in the losses).
LIGHT_OPTS = [
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.HYBRID_DETR.HIDDEN_DIM", 32,
    "MODEL.HYBRID_DETR.DIM_FEEDFORWARD", 64, "MODEL.HYBRID_DETR.ENC_LAYERS", 1,
]
DAC_RELEASE_BALANCE = 3  # the release's engine.py: balance_targets = targets x 3 (C-branch normaliser)


# ----------------------------------------------------------------------------------------- inputs


@dataclass
class Predictions:
    """One query group's per-layer predictions: logits (L, N, Q, K), boxes (L, N, Q, 4) cxcywh."""

    logits: torch.Tensor
    boxes: torch.Tensor

    def output(self) -> DecoderOutput:
        return DecoderOutput(self.logits, self.boxes, self.logits.new_zeros(*self.logits.shape[:3], 0))

    def official(self, layer: int, suffix: str = "") -> Dict[str, torch.Tensor]:
        """The official per-layer dict ({"pred_logits", "pred_boxes"} + suffix)."""
        return {f"pred_logits{suffix}": self.logits[layer], f"pred_boxes{suffix}": self.boxes[layer]}

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]


@dataclass
class LossInputs:
    """What both criteria see: targets (per image {"labels", "boxes" cxcywh in [0, 1]}) and the
    predictions of each query group. `encoder`: the two-stage encoder's (N, S, K) logits and boxes
    (class-agnostic targets; DINO: its selected proposals, class-aware); `c_branch`: DAC's C-decoder;
    `denoising` / `c_denoising`: the denoising queries of the O / C pass (P = 2 x groups x most boxes)."""

    targets: List[Dict[str, torch.Tensor]]
    one_to_one: Predictions
    encoder: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    c_branch: Optional[Predictions] = None
    denoising: Optional[Predictions] = None
    c_denoising: Optional[Predictions] = None

    @property
    def num_boxes(self) -> float:
        """The loss normaliser on one worker (both codes: gt boxes in the batch, at least 1)."""
        return max(float(sum(len(t["labels"]) for t in self.targets)), 1.0)

    def to_dict(self) -> Dict:
        def group(p):
            return None if p is None else {"logits": p.logits, "boxes": p.boxes}

        return {
            "targets": [{"labels": t["labels"], "boxes": t["boxes"]} for t in self.targets],
            "one_to_one": group(self.one_to_one),
            "encoder": None if self.encoder is None else tuple(self.encoder),
            "c_branch": group(self.c_branch),
            "denoising": group(self.denoising),
            "c_denoising": group(self.c_denoising),
        }

    @classmethod
    def from_dict(cls, d: Dict) -> "LossInputs":
        def group(p):
            return None if p is None else Predictions(p["logits"], p["boxes"])

        return cls(
            [dict(t) for t in d["targets"]], group(d["one_to_one"]), None if d["encoder"] is None else tuple(d["encoder"]),
            group(d["c_branch"]), group(d["denoising"]), group(d["c_denoising"]),
        )


# ------------------------------------------------------------------------------------------- ours


@dataclass
class OurLossParts:
    """The parts of our model that compute its losses."""

    criterion: torch.nn.Module
    matcher: torch.nn.Module
    aux_loss: bool
    class_aware_encoder_loss: bool
    dac: Optional[torch.nn.Module] = None  # the DAC branch (its matcher, normaliser, options)
    dn: Optional[DenoisingQueries] = None  # the denoising hook

    @classmethod
    def of_model(cls, model) -> "OurLossParts":
        dn = next((h for h in model.main_passes.values() if isinstance(h, DenoisingQueries)), None)
        return cls(
            model.criterion, model.matcher, model.aux_loss, model.class_aware_encoder_loss,
            model.branches["dac"] if "dac" in model.branches else None, dn,
        )

    @classmethod
    def from_config(cls, config: str, opts=()) -> "OurLossParts":
        """The loss parts of a shipped config's model (`opts`: KEY VALUE overrides)."""
        cfg = load_config(get_config_file(config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
        return cls.of_model(build_model(cfg).train())


def noise_free_groups(hook: DenoisingQueries, targets):
    """The denoising groups' layout (which slot trains towards which gt), the same whatever the noise."""
    return denoising_groups(targets, hook.dn_number, 0.0, 0.0, hook.num_classes)


@contextmanager
def dac_cap_keys(keys: Optional[List[torch.Tensor]] = None):
    """Within: our DACMatcher's random cap key (its `torch.rand_like`, one (N, Q) draw per call, calls
    in layer order) recorded into the yielded list, or, with `keys`, replaced by them in call order (a
    key ranks the positives that survive the cap: 1 on the official choice, 0 elsewhere, keeps it)."""
    from ..modeling.dac import matcher as dac_matcher

    used: List[torch.Tensor] = []

    class KeyedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        def rand_like(self, tensor, *args, **kwargs):
            if keys is None:
                key = torch.rand_like(tensor, *args, **kwargs)
            elif len(used) < len(keys):
                key = keys[len(used)].to(tensor)
            else:
                raise RuntimeError(f"DACMatcher drew a cap key more than the {len(keys)} given")
            used.append(key)
            return key

    original = dac_matcher.torch
    dac_matcher.torch = KeyedTorch()
    try:
        yield used
    finally:
        dac_matcher.torch = original


def our_losses(parts: OurLossParts, inputs: LossInputs, cap_keys=None, assignments=None) -> Dict[str, torch.Tensor]:
    """Our model's losses of `inputs`, computed by its parts as its training forward computes them
    (meta_arch.HybridDETR.forward, dac.DACBranch, dn.DenoisingQueries). `cap_keys`: the DAC matcher's
    cap keys (None: drawn); `assignments` (a dict): filled with the DAC C-branch's per-layer assignment."""
    criterion, targets, num_boxes = parts.criterion, inputs.targets, inputs.num_boxes
    o2o = inputs.one_to_one.output()
    losses = criterion.decoder_losses(
        o2o, targets, lambda _, logits, boxes: parts.matcher(logits, boxes, targets), num_boxes, aux_loss=parts.aux_loss
    )
    if inputs.encoder is not None:
        logits, boxes = inputs.encoder
        enc_targets = targets if parts.class_aware_encoder_loss else [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        assignment = parts.matcher(logits, boxes, enc_targets)
        enc = criterion(logits, boxes, enc_targets, assignment, num_boxes, criterion.focal)
        losses.update({f"enc_{k}": v for k, v in enc.items()})
    pass_inputs = MainPassInputs(None, None, targets, num_boxes, criterion, None)
    dn_extra = None
    if inputs.denoising is not None or inputs.c_denoising is not None:
        dn_extra = ExtraQueries(None, state=noise_free_groups(parts.dn, targets))
    if inputs.denoising is not None:
        losses.update(parts.dn.losses(pass_inputs, dn_extra, inputs.denoising.output()))
    if inputs.c_branch is not None:
        branch = parts.dac

        def assign(layer, logits, boxes):
            assignment = branch.matcher(logits, o2o.boxes[layer] if branch.match_against_o_boxes else boxes, targets)
            if assignments is not None:
                assignments[layer] = assignment
            return assignment

        with dac_cap_keys(cap_keys):
            losses.update(
                criterion.decoder_losses(
                    inputs.c_branch.output(), targets, assign, num_boxes * branch.loss_norm_factor, prefix="dac_",
                    aux_loss=branch.aux_loss,
                )
            )
        if inputs.c_denoising is not None:
            c_dn = parts.dn.losses(pass_inputs, dn_extra, inputs.c_denoising.output())
            losses.update({f"dac_{k}": v for k, v in c_dn.items()})
    return losses


# --------------------------------------------------------------------------------------- official


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (isinstance(device, torch.device) and device.type == "cuda")


@contextmanager
def cuda_on_cpu():
    """Within: `Tensor.cuda()` returns the tensor itself and `Tensor.to('cuda'...)` goes to the CPU
    (the official criteria and dn_components move their index tensors to the GPU)."""
    cuda, to = torch.Tensor.cuda, torch.Tensor.to

    def cpu_cuda(self, *args, **kwargs):
        return self

    def cpu_to(self, *args, **kwargs):
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = cpu_cuda, cpu_to
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = cuda, to


@contextmanager
def _recording_calls(module, name):
    """Within: `module.name` (a function) records what it returns into the yielded list."""
    function = getattr(module, name)
    returned = []

    def recorded(*args, **kwargs):
        returned.append(function(*args, **kwargs))
        return returned[-1]

    setattr(module, name, recorded)
    try:
        yield returned
    finally:
        setattr(module, name, function)


def official_criterion(kind: str, src: str):
    """The official criterion of `kind`, from the official `build` of the source tree `src` (the
    official model is built too, on the CPU, and dropped)."""
    if kind == "dino":
        from .dino_comparison import _import_official_dino, official_dino_args

        _, criterion, _ = _import_official_dino(src)(official_dino_args(src, 4))
        return criterion
    from . import official_comparison as harness

    harness._import_official(src, dac_release=kind == "dac_detr")
    with _recording_calls(sys.modules["models.deformable_detr"], "build") as built:
        if kind == "dac_detr":
            harness.build_official_dac_detr(src)
        else:
            harness.build_official_deformable_detr(src, "plain")
    return built[0][1]


def _official_outputs(kind: str, inputs: LossInputs) -> Dict:
    """The official model's output dict for `inputs` (the keys its criterion reads)."""
    o2o, last = inputs.one_to_one, inputs.one_to_one.num_layers - 1
    c = inputs.c_branch
    out = dict(o2o.official(last))
    layers = [o2o.official(i) for i in range(last)]
    if kind == "dac_detr":
        out.update(c.official(last, "_cdecoder"))
        layers = [{**layer, **c.official(i, "_cdecoder")} for i, layer in enumerate(layers)]
    out["aux_outputs"] = layers
    if inputs.encoder is not None:
        enc = {"pred_logits": inputs.encoder[0], "pred_boxes": inputs.encoder[1]}
        if kind == "dac_detr":
            out["enc_outputs"] = {**enc, "pred_logits_cdecoder": enc["pred_logits"], "pred_boxes_cdecoder": enc["pred_boxes"]}
        elif kind == "dino":
            out["interm_outputs"] = enc
        else:
            out["enc_outputs"] = enc
    if kind in ("dac_detr", "dino"):
        out["dn_meta"] = _dn_meta(inputs.denoising, inputs, "")
    if kind == "dac_detr":
        out["dn_meta_cdecoder"] = _dn_meta(inputs.c_denoising, inputs, "_cdecoder")
    return out


def _dn_meta(dn: Optional[Predictions], inputs: LossInputs, suffix: str):
    if dn is None:
        return None
    most = max(len(t["labels"]) for t in inputs.targets)
    pad_size = dn.logits.shape[2]
    last = dn.num_layers - 1
    known = {**dn.official(last, suffix), "aux_outputs": [dn.official(i, suffix) for i in range(last)]}
    return {"pad_size": pad_size, "num_dn_group": pad_size // (2 * most), "output_known_lbs_bboxes": known}


@contextmanager
def record_dac_subsample(criterion, c_branch: Predictions):
    """Within: the release's one-to-many assigner records, per decoder layer, the positives its
    random subsample keeps in each image (onetomany.py `subsample_labels`), its positive count and
    the pairs it assigns: yields {layer: {"kept": [(P_b,) per image], "positives": [...], "indices": ...}}."""
    onetomany = sys.modules[type(criterion.one2many).__module__]
    records: Dict[int, Dict] = {}
    current = {}
    assigner = criterion.one2many
    forward = assigner.forward
    subsample = onetomany.subsample_labels

    def layer_forward(outputs, targets, *args, **kwargs):
        # The layer is told by where its C logits live (each layer's dict holds a view of c_branch.logits).
        pointer = outputs["pred_logits_cdecoder"].data_ptr()
        layer = next(i for i, t in enumerate(c_branch.logits) if t.data_ptr() == pointer)
        current["record"] = records.setdefault(layer, {"kept": [], "positives": []})
        result = forward(outputs, targets, *args, **kwargs)
        current["record"]["indices"] = result[0]
        return result

    def recorded_subsample(labels, num_samples, positive_fraction, bg_label):
        kept, negatives = subsample(labels, num_samples, positive_fraction, bg_label)
        current["record"]["kept"].append(kept.clone())
        current["record"]["positives"].append(int(((labels != -1) & (labels != bg_label)).sum()))
        return kept, negatives

    assigner.forward = layer_forward
    onetomany.subsample_labels = recorded_subsample
    try:
        yield records
    finally:
        del assigner.forward
        onetomany.subsample_labels = subsample


def keys_from_subsample(records: Dict[int, Dict], num_layers: int, num_images: int, num_queries: int) -> List[torch.Tensor]:
    """Our DACMatcher's cap keys (one (N, Q) per layer) that keep the release's subsample."""
    keys = []
    for layer in range(num_layers):
        key = torch.zeros(num_images, num_queries)
        for image, kept in enumerate(records[layer]["kept"]):
            key[image, kept] = 1.0
        keys.append(key)
    return keys


def official_losses(kind: str, criterion, inputs: LossInputs):
    """The official criterion's losses of `inputs`, weighted by its weight_dict ({name: tensor}), and
    for dac_detr the records of its random subsample (else None)."""
    criterion.num_classes = inputs.one_to_one.logits.shape[-1]  # one class count for both codes
    criterion.train()
    outputs = _official_outputs(kind, inputs)
    targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in inputs.targets]
    records = None
    with cuda_on_cpu(), torch.no_grad():
        if kind == "dac_detr":
            # engine.py: the C-branch is normalised by the boxes of `balance_targets`, the targets x 3.
            balance = copy.deepcopy(targets)
            for t in balance:
                t["boxes"] = t["boxes"].repeat(DAC_RELEASE_BALANCE, 1)
                t["labels"] = t["labels"].repeat(DAC_RELEASE_BALANCE)
            with record_dac_subsample(criterion, inputs.c_branch) as records:
                losses = criterion(outputs, targets, balance)
        else:
            losses = criterion(outputs, targets)
    weights = criterion.weight_dict
    return {k: v * weights[k] for k, v in losses.items() if k in weights}, records


_OFFICIAL_TERM = re.compile(r"(loss_ce|loss_bbox|loss_giou)(_dn)?(_\d+)?(_enc|_interm)?(_one2one)?")
_OUR_TERM = {"loss_ce": "loss_class", "loss_bbox": "loss_bbox", "loss_giou": "loss_giou"}


def official_name_to_ours(kind: str, name: str) -> Optional[str]:
    """Our loss name of an official one (None: a term we do not compare, e.g. cardinality)."""
    m = _OFFICIAL_TERM.fullmatch(name)
    if m is None:
        return None
    base, dn, layer, enc, one2one = m.groups()
    term = _OUR_TERM[base] + (layer or "")
    if enc:
        return None if one2one or dn else f"enc_{term}"
    if kind == "dac_detr":
        # The release's unsuffixed losses are its C-decoder's, "_one2one" its O-decoder's.
        return ("" if one2one else "dac_") + ("dn_" if dn else "") + term
    if one2one:
        return None
    return ("dn_" if dn else "") + term


def compare_terms(kind: str, ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor]) -> Dict:
    """{"terms": [(our name, official name, ours, theirs, |difference|)], "only_ours", "only_official"}."""
    terms, matched = [], set()
    for name in sorted(theirs):
        mine = official_name_to_ours(kind, name)
        if mine is None:
            continue
        if mine not in ours:
            terms.append((mine, name, None, float(theirs[name]), float("inf")))
            continue
        matched.add(mine)
        a, b = float(ours[mine]), float(theirs[name])
        terms.append((mine, name, a, b, abs(a - b)))
    return {"terms": terms, "only_ours": sorted(set(ours) - matched), "only_official": [t[1] for t in terms if t[2] is None]}


# ---------------------------------------------------------------------------------- denoising groups


def _official_prepare_for_cdn(kind: str):
    module = sys.modules["models.dino.dn_components" if kind == "dino" else "models.dn_components"]
    return module.prepare_for_cdn


def official_denoising_groups(kind: str, targets, hook: DenoisingQueries, num_queries: int, rng_state=None, seed=None):
    """The official `prepare_for_cdn` (DINO's, or the DAC release's) on `targets` with our hook's
    settings and class count, the global RNG set to `rng_state` (or seeded): (labels (N, P), -1 on
    padding slots; boxes (N, P, 4), the sigmoid of its `input_query_bbox`; attention mask (P + Q)^2)."""
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    else:
        torch.manual_seed(seed)

    def label_as_value(labels):  # hidden_dim 1, the value label + 1: padding slots stay 0
        return (labels + 1).float()[:, None]

    args = (targets, hook.dn_number, hook.label_noise_ratio, hook.box_noise_scale)
    with cuda_on_cpu():
        query_label, query_box, attn_mask = _official_prepare_for_cdn(kind)(
            args, True, num_queries, hook.num_classes, 1, label_as_value
        )[:3]
    return query_label[..., 0].long() - 1, query_box.sigmoid(), attn_mask


def compare_denoising_groups(ours_labels, ours_boxes, ours_mask, theirs) -> Dict:
    """Labels and attention mask: identical or not; boxes: max |difference|, and the slots where they
    differ by more than 1e-6 (`boxes_differ`), of which `boxes_differ_clipped` have a noised coordinate
    clipped to within 1e-3 of 0 or 1, the only place where the eps of an inverse sigmoid matters.
    `ours_mask` is the whole decoder mask ((P + Q)^2) or the denoising block alone (P^2)."""
    labels, boxes, mask = theirs
    p = ours_mask.shape[0]
    same_shape = boxes.shape == ours_boxes.shape
    differ = ((boxes - ours_boxes).abs().amax(-1) > 1e-6) if same_shape else torch.ones(boxes.shape[:2], dtype=torch.bool)
    clipped = ((boxes < 1e-3) | (boxes > 1 - 1e-3)).any(-1)
    return {
        "labels_identical": bool(labels.shape == ours_labels.shape and torch.equal(labels, ours_labels)),
        "boxes": (boxes - ours_boxes).abs().max().item() if same_shape else float("inf"),
        "boxes_differ": int(differ.sum()),
        "boxes_differ_clipped": int((differ & clipped).sum()),
        "mask_identical": bool(torch.equal(mask[:p, :p], ours_mask)),
        "mask_size": p,
        "num_slots": labels.shape[1],
    }


# ------------------------------------------------------------------------------------- our model


def _grid_boxes(h: int, w: int, n: int, g) -> torch.Tensor:
    """`n` distinct absolute xyxy boxes, each a two-stage proposal of the two finest levels of an
    image of h x w (the cell at stride 8 or 16, size 0.05 or 0.1 of the image): the boxes of queries
    of a model with random weights, so that many of them match a gt well."""
    cells = []
    for level in (0, 1):
        stride, size = 8 * 2**level, 0.05 * 2**level
        rows, cols = -(-h // stride), -(-w // stride)
        y, x = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
        cells.append(torch.stack((x.flatten(), y.flatten(), torch.full((rows * cols,), size), torch.full((rows * cols,), size)), 1))
    cells = torch.cat(cells)[torch.randperm(sum(len(c) for c in cells), generator=g)[:n]]
    xyxy = torch.cat((cells[:, :2] - cells[:, 2:] / 2, cells[:, :2] + cells[:, 2:] / 2), 1).clamp(0, 1)
    return xyxy * torch.tensor([w, h, w, h])


def seeded_batch(seed: int, box_counts, num_classes: int, sizes=IMAGE_SIZES, grid: bool = False) -> List[Dict]:
    """detectron2 inputs: random images of `sizes`, `box_counts` random boxes each (seeded); `grid`:
    boxes on the proposal grid (`_grid_boxes`)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for (h, w), n in zip(sizes, box_counts):
        instances = Instances((h, w))
        if grid:
            instances.gt_boxes = Boxes(_grid_boxes(h, w, n, g))
        else:
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = 6 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
            instances.gt_boxes = Boxes(torch.cat((xy, (xy + wh).minimum(torch.tensor([w, h]))), 1))
        instances.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": instances, "height": h, "width": w})
    return batch


@dataclass
class ModelCapture:
    """A training forward of our model: its loss dict, the predictions its losses saw, its DAC cap
    keys, and its denoising groups with the RNG state they were drawn from and the decoder's mask."""

    losses: Dict[str, torch.Tensor]
    inputs: LossInputs
    cap_keys: List[torch.Tensor] = field(default_factory=list)
    dn_rng_state: Optional[torch.Tensor] = None
    dn_groups: Optional[object] = None
    decoder_mask: Optional[torch.Tensor] = None


def capture_model_losses(model, batch) -> ModelCapture:
    """One training forward of `model` on `batch` (no gradients), recording what its losses see."""
    calls, encoder, dn = [], {}, {}
    criterion = model.criterion
    decoder_losses = criterion.decoder_losses

    def recorded_decoder_losses(outputs, targets, assign, normalizer, prefix="", **kwargs):
        calls.append((prefix, outputs, targets))
        return decoder_losses(outputs, targets, assign, normalizer, prefix=prefix, **kwargs)

    def record_encoder(module, args, output):  # (a hook returning None leaves the output as it is)
        encoder.setdefault("predictions", output[1])

    def record_mask(module, args):  # the first decoder pass is the one-to-one pass (with the extra queries)
        dn.setdefault("mask", args[0].self_attn_mask)

    hooks = [model.query_source.register_forward_hook(record_encoder), model.decoder.register_forward_pre_hook(record_mask)]
    dn_hook = OurLossParts.of_model(model).dn
    if dn_hook is not None:
        extra_queries = dn_hook.extra_queries

        def recorded_extra_queries(inputs):
            dn.setdefault("rng", torch.get_rng_state())
            extra = extra_queries(inputs)
            dn.setdefault("groups", extra.state if extra is not None else None)
            return extra

        dn_hook.extra_queries = recorded_extra_queries
    criterion.decoder_losses = recorded_decoder_losses
    try:
        with torch.no_grad(), dac_cap_keys() as cap_keys:
            losses = model(batch)
    finally:
        del criterion.decoder_losses
        if dn_hook is not None:
            del dn_hook.extra_queries
        for hook in hooks:
            hook.remove()
    groups: Dict[str, Predictions] = {}
    after_c = False
    for prefix, outputs, _ in calls:
        name = {"": "one_to_one", "dac_": "c_branch"}.get(prefix) or ("c_denoising" if after_c else "denoising")
        after_c |= prefix == "dac_"
        groups[name] = Predictions(outputs.logits, outputs.boxes)
    inputs = LossInputs(calls[0][2], encoder=encoder.get("predictions"), **groups)
    return ModelCapture(losses, inputs, list(cap_keys), dn.get("rng"), dn.get("groups"), dn.get("mask") if dn.get("groups") else None)


def build_our_model(kind: str, variant: str, seed: int):
    torch.manual_seed(seed)
    cfg = load_config(get_config_file(MODEL_CONFIGS[kind][variant]), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return build_model(cfg).train()


# ----------------------------------------------------------------------------------- synthetic


def synthetic_loss_inputs(kind: str, seed: int, num_classes: int, num_queries: int, box_counts, num_layers: int = 6,
                          num_tokens: int = 200, dn_number: int = 100) -> LossInputs:
    """Random predictions for the fixtures. Targets: boxes in distinct cells of a grid (no two overlap,
    so that no query is among the best of two gts of one class, see `dac_assignment_summary`); each
    layer's queries: random boxes, two thirds of them jittered copies of gt boxes (so that matching, the
    IoU-aware loss with its ranks and DAC's cap of 75 positives per image all have work); logits
    N(-2, 1.5^2). DAC: O, C and both denoising passes + encoder; DINO: O, denoising, selected
    proposals; Deformable DETR: O + encoder."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in box_counts:
        side = math.ceil(math.sqrt(n))
        cell = torch.randperm(side * side, generator=g)[:n]
        wh = (0.4 + 0.5 * torch.rand(n, 2, generator=g)) / side
        corner = torch.stack((cell % side, cell // side), 1) / side
        center = corner + wh / 2 + (1 / side - wh) * torch.rand(n, 2, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat((center, wh), 1)})

    def boxes(q):
        out = torch.empty(len(targets), q, 4)
        for i, t in enumerate(targets):
            random = torch.cat((0.1 + 0.8 * torch.rand(q, 2, generator=g), 0.02 + 0.4 * torch.rand(q, 2, generator=g)), 1)
            near = t["boxes"][torch.randint(0, len(t["boxes"]), (q,), generator=g)]
            jitter = torch.rand(q, 4, generator=g) - 0.5
            near = torch.cat((near[:, :2] + 0.2 * jitter[:, :2] * near[:, 2:], near[:, 2:] * (1 + 0.3 * jitter[:, 2:])), 1)
            out[i] = torch.where(torch.rand(q, 1, generator=g) < 2 / 3, near, random).clamp(0.005, 0.995)
        return out

    def group(q):
        return Predictions(
            torch.stack([1.5 * torch.randn(len(targets), q, num_classes, generator=g) - 2 for _ in range(num_layers)]),
            torch.stack([boxes(q) for _ in range(num_layers)]),
        )

    inputs = LossInputs(targets, group(num_queries))
    if kind in ("deformable_detr", "dac_detr"):
        inputs.encoder = (1.5 * torch.randn(len(targets), num_tokens, num_classes, generator=g) - 2, boxes(num_tokens))
    if kind == "dino":
        inputs.encoder = (1.5 * torch.randn(len(targets), num_queries, num_classes, generator=g) - 2, boxes(num_queries))
    if kind in ("dac_detr", "dino"):
        most = max(box_counts)
        inputs.denoising = group(2 * num_denoising_groups(dn_number, most) * most)
    if kind == "dac_detr":
        inputs.c_branch = group(num_queries)
        inputs.c_denoising = group(inputs.denoising.logits.shape[2])
    return inputs


# --------------------------------------------------------------------------------------- together

# The synthetic setting of each kind (the fixtures'): (config, classes, queries, boxes per image, DN.NUMBER).
# DAC: 120 queries, two thirds of them near one of 36 gts in the first image: more than 75 positives, a
# few per gt, so that the release's subsample changes how many queries some gts get.
SYNTHETIC_SETTINGS = {
    "deformable_detr": ("coco/deformable_detr_r50_two_stage_50ep.yaml", 5, 60, (5, 2), 100),
    "dac_detr": ("coco/dac_dino_r50_12ep_release.yaml", 4, 120, (36, 4), 50),
    "dino": ("coco/dino_r50_4scale_12ep.yaml", 4, 60, (5, 2), 50),
}


def synthetic_setting(kind: str, seed: int):
    """(config, opts, inputs) of `kind`'s synthetic setting: its config with a light model of the
    setting's class and query counts (`LIGHT_OPTS`), and `synthetic_loss_inputs`."""
    config, num_classes, num_queries, box_counts, dn_number = SYNTHETIC_SETTINGS[kind]
    opts = LIGHT_OPTS + ["MODEL.HYBRID_DETR.NUM_CLASSES", num_classes, "MODEL.HYBRID_DETR.NUM_QUERIES", num_queries]
    if kind != "deformable_detr":
        opts += ["MODEL.HYBRID_DETR.DN.NUMBER", dn_number]
    return config, opts, synthetic_loss_inputs(kind, seed, num_classes, num_queries, box_counts, dn_number=dn_number)


def _loss_parity(kind: str, criterion, parts: OurLossParts, inputs: LossInputs) -> Dict:
    """The official losses of `inputs` and ours (for dac_detr with the release's subsample), compared."""
    theirs, records = official_losses(kind, criterion, inputs)
    keys, assignments = None, {}
    if records is not None:
        n, q = inputs.c_branch.logits.shape[1:3]
        keys = keys_from_subsample(records, inputs.c_branch.num_layers, n, q)
    ours = our_losses(parts, inputs, cap_keys=keys, assignments=assignments)
    result = compare_terms(kind, ours, theirs)
    result["official"] = {k: float(v) for k, v in theirs.items()}
    result["scale"] = max((abs(v) for v in result["official"].values()), default=0.0)
    if records is not None:
        result["dac"] = dac_assignment_summary(records, assignments, inputs.targets, parts.dac.matcher.max_positives)
        result["cap_keys"] = keys
    return result


def compare_losses(kind: str, src: str, seed: int = 0, source: str = "model") -> Dict:
    """Our losses against the official criterion's on the same predictions (see the module
    docstring): `source` "model", our model of each setting's config (random weights, seeded) on a
    seeded batch; "synthetic", the synthetic setting (`synthetic_setting`). Returns {setting: figures}
    (`loss_report` prints them)."""
    criterion = official_criterion(kind, src)
    if source == "synthetic":
        config, opts, inputs = synthetic_setting(kind, seed)
        parts = OurLossParts.from_config(config, opts)
        result = {"config": config, "opts": opts, "inputs": inputs, "seed": seed,
                  "box_counts": [len(t["labels"]) for t in inputs.targets]}
        if parts.dn is not None:
            torch.manual_seed(seed)
            groups = parts.dn.groups(inputs.targets)
            theirs = official_denoising_groups(kind, inputs.targets, parts.dn, inputs.one_to_one.logits.shape[2], seed=seed)
            result["official_groups"] = dict(zip(("labels", "boxes", "mask"), theirs))
            result["groups"] = compare_denoising_groups(groups.labels, groups.boxes, groups.self_attn_mask, theirs)
        result.update(_loss_parity(kind, criterion, parts, inputs))
        return {"synthetic": result}
    if source != "model":
        raise ValueError(f"source must be 'model' or 'synthetic', got {source!r}")
    results = {}
    for variant, config in MODEL_CONFIGS[kind].items():
        model = build_our_model(kind, variant, seed)
        parts = OurLossParts.of_model(model)
        batch = seeded_batch(seed + 1, BOX_COUNTS[kind], model.num_classes, grid=kind == "dac_detr")
        capture = capture_model_losses(model, batch)
        inputs = capture.inputs
        # Our parts on the captured predictions (with the model's own cap keys) give the model's losses.
        replay = our_losses(parts, inputs, cap_keys=capture.cap_keys or None)
        replay_diff = max((abs(float(replay[k]) - float(capture.losses[k])) for k in capture.losses), default=0.0)
        result = {
            "config": config, "seed": seed, "box_counts": BOX_COUNTS[kind],
            "replay": {"terms": len(capture.losses), "max_diff": replay_diff, "names_equal": set(replay) == set(capture.losses)},
        }
        if capture.dn_groups is not None:
            groups = capture.dn_groups
            num_queries = capture.decoder_mask.shape[0] - groups.num_queries
            theirs = official_denoising_groups(kind, inputs.targets, parts.dn, num_queries, capture.dn_rng_state)
            result["groups"] = compare_denoising_groups(groups.labels, groups.boxes, capture.decoder_mask, theirs)
        result.update(_loss_parity(kind, criterion, parts, inputs))
        results[variant] = result
    return results


def dac_assignment_summary(records, assignments, targets, cap) -> Dict:
    """Where the release's cap decided, how many of its pairs rank below another pair of the same gt
    (rank weight < 1), whether our C-branch assignment is the release's (per layer), and how many
    (image, query, class) entries it assigns twice (a query in the top-k of two gts of one class): there
    the release's IoU-aware BCE keeps the target written last (`pos_weights[pos_idx_c] = t`, an index_put
    with repeated indices, whose winner PyTorch leaves unspecified), ours the larger one."""
    capped = sum(p > cap for r in records.values() for p in r["positives"])
    images = sum(len(r["positives"]) for r in records.values())
    same = ranked = repeated = 0
    for layer, record in records.items():
        theirs = {(b, int(q), int(g)) for b, (qs, gs) in enumerate(record["indices"]) for q, g in zip(qs, gs)}
        ranked += len(theirs) - len({(b, g) for b, _, g in theirs})
        repeated += len(theirs) - len({(b, q, int(targets[b]["labels"][g])) for b, q, g in theirs})
        a = assignments[layer]
        same += set(zip(a.batch_index.tolist(), a.query_index.tolist(), a.gt_index.tolist())) == theirs
    return {"capped": capped, "images": images, "ranked_pairs": ranked, "repeated_entries": repeated,
            "layers_identical": same, "layers": len(records)}


def _layer_split(name: str) -> Tuple[str, str]:
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
    return m.group(1), m.group(2) if m.group(2) is not None else "last"


def _groups_line(kind: str, g: Dict, tolerance: float) -> Tuple[str, bool]:
    """The denoising groups' line, and whether it passes: labels and mask identical, boxes within
    `tolerance`, except (DAC-DETR's release) on slots with a coordinate clipped to 0 or 1, where its
    inverse_sigmoid eps (1e-5, util/misc.py) is not DINO's (1e-3), which ours follows."""
    eps_only = kind == "dac_detr" and g["boxes_differ"] == g["boxes_differ_clipped"]
    ok = g["labels_identical"] and g["mask_identical"] and (g["boxes"] <= tolerance or eps_only)
    boxes = f"boxes max |diff| {g['boxes']:.3g}"
    if g["boxes_differ"]:
        boxes += f" on {g['boxes_differ']} slots, {g['boxes_differ_clipped']} of them with a coordinate clipped to 0 or 1"
        if eps_only:
            boxes += " (the release's inverse_sigmoid eps 1e-5 there, ours DINO's 1e-3)"
    line = (
        f"  denoising groups from the same RNG state ({g['num_slots']} slots, mask {g['mask_size']}^2): labels "
        f"{'identical' if g['labels_identical'] else 'DIFFER'}, {boxes}, attention mask "
        f"{'identical' if g['mask_identical'] else 'DIFFERS'}"
    )
    return line, ok


def loss_report(kind: str, results: Dict, tolerance: float = 1e-4) -> Tuple[List[str], bool]:
    """The tool's lines (a table of max |difference| per term and layer) and whether all pass."""
    lines, ok_all = [], True
    for setting, r in results.items():
        source = "synthetic predictions" if setting == "synthetic" else "our model's outputs, random weights"
        lines.append(
            f"{kind} {setting} ({r['config']}, {source}, seed {r['seed']}, {'+'.join(map(str, r['box_counts']))} gt boxes):"
        )
        ok = True
        if "replay" in r:
            replay = r["replay"]
            lines.append(
                f"  our parts on the captured predictions reproduce the model's loss dict: {replay['terms']} terms, "
                f"max |diff| {replay['max_diff']:.3g}{'' if replay['names_equal'] else ' (NAMES DIFFER)'}"
            )
            ok = replay["names_equal"] and replay["max_diff"] <= tolerance
        if "groups" in r:
            line, groups_ok = _groups_line(kind, r["groups"], tolerance)
            lines.append(line)
            ok &= groups_ok
        if "dac" in r:
            d = r["dac"]
            lines.append(
                f"  C-branch one-to-many: the release's random subsample given to our DACMatcher; it capped "
                f"{d['capped']} of {d['images']} (layer, image) positive sets; {d['ranked_pairs']} pairs ranked below "
                f"another of their gt; assignment identical on {d['layers_identical']} of {d['layers']} layers; "
                f"{d['repeated_entries']} (image, query, class) entries assigned twice"
            )
            ok &= d["layers_identical"] == d["layers"]
        table: Dict[str, Dict[str, Tuple[str, float]]] = {}
        for mine, official, _, _, diff in r["terms"]:
            base, layer = _layer_split(mine)
            table.setdefault(base, {})[layer] = (official, diff)
        columns = sorted({layer for row in table.values() for layer in row}, key=lambda c: (c == "last", c))
        lines.append("  " + f"{'ours <- official (last layer)':<46}" + "".join(f"{c:>10}" for c in columns))
        for base, row in sorted(table.items()):
            official = row.get("last", next(iter(row.values())))[0]
            cells = "".join(f"{row[c][1]:>10.2g}" if c in row else f"{'':>10}" for c in columns)
            lines.append("  " + f"{base + ' <- ' + official:<46}" + cells)
        worst = max((t[4] for t in r["terms"]), default=0.0)
        ok &= worst <= tolerance and not r["only_official"]
        if r["only_ours"]:
            lines.append(f"  ours without an official counterpart: {', '.join(r['only_ours'])}")
        if r["only_official"]:
            lines.append(f"  OFFICIAL TERMS MISSING FROM OURS: {', '.join(r['only_official'])}")
        lines.append(
            f"  max |difference| over {len(r['terms'])} terms: {worst:.3g} (weighted losses up to {r['scale']:.3g}); "
            f"tolerance {tolerance:g}: {'OK' if ok else 'FAIL'}"
        )
        ok_all &= ok
    return lines, ok_all


# ---------------------------------------------------------------------------------------- fixtures


def record_fixture(kind: str, src: str, seed: int = 0) -> Dict:
    """A fixture of the synthetic setting: its inputs, the official losses of them, for dac_detr the
    release's subsample (as our cap keys), for dac_detr / dino the official denoising groups of the
    targets with the RNG seeded by `seed`."""
    r = compare_losses(kind, src, seed, source="synthetic")["synthetic"]
    fixture = {"kind": kind, "seed": seed, "config": r["config"], "opts": r["opts"], "inputs": r["inputs"].to_dict(),
               "official": r["official"], "measured_max_diff": max(t[4] for t in r["terms"])}
    if "cap_keys" in r:
        fixture["cap_keys"] = torch.stack(r["cap_keys"]).bool()
        fixture["capped"] = r["dac"]["capped"]
        fixture["ranked_pairs"] = r["dac"]["ranked_pairs"]
    if "official_groups" in r:
        fixture["official_groups"] = r["official_groups"]
    return fixture


def fixture_parts(fixture: Dict) -> OurLossParts:
    return OurLossParts.from_config(fixture["config"], fixture["opts"])


def fixture_losses(fixture: Dict, parts: Optional[OurLossParts] = None) -> Tuple[Dict, Dict]:
    """Our losses of a fixture's inputs (with its cap keys) and its recorded official losses."""
    parts = parts or fixture_parts(fixture)
    inputs = LossInputs.from_dict(fixture["inputs"])
    keys = [k.float() for k in fixture["cap_keys"]] if "cap_keys" in fixture else None
    return our_losses(parts, inputs, cap_keys=keys), fixture["official"]


def save_fixture(fixture: Dict, path: str) -> None:
    torch.save(fixture, path)


def load_fixture(path: str) -> Dict:
    return torch.load(path, weights_only=True)
