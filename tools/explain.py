#!/usr/bin/env python
"""What HybridDETR looks at, for one image: PNGs of the attention behind its top detections.

    python tools/explain.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \\
        --input image.jpg --output explain/ [--layer -1] [--head H] [--pixel X Y] [--top 3] \\
        [--opts MODEL.WEIGHTS model_final.pth ...]
    python tools/explain.py --config-file CONFIG --dataset hybrid_synthetic_val --index 0 --output explain/
    python tools/explain.py --config-file CONFIG --input 12 --output explain/   # image id 12 of DATASETS.TEST[0]

Views, chosen by the config's DECODER_MODE (or --views):
  decoder_sampling.png  each top detection's sampling points on every level, decoder layer --layer,
                        head --head (default all), coloured by attention weight (deformable decoders);
  encoder_sampling.png  where the encoder token under --pixel X Y (original image pixels; default
                        the top detection's centre) samples, every head and level;
  smca_query<q>.png     SMCA: each head's Gaussian prior next to the attention it modulated, with the
                        scale selection (mode smca);
  dac.png               DAC: the boxes of the queries near one object after the O- and the C-decoder,
                        and the queries above each matching-score threshold, O vs C (mode dac);
  co_detr.png           Co-DETR: each auxiliary head's positive anchors / proposals for the ground
                        truth (mode co_detr; needs an annotated image: --dataset/--index or an image id).
Everything is captured with forward hooks: the model computes exactly what it computes without them.
Prints the paths written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "HybridDETR"))

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402,F401

import hybrid_detr  # noqa: E402,F401
from hybrid_detr.analysis import explain as views  # noqa: E402
from hybrid_detr.analysis.inputs import dataset_record, load_input  # noqa: E402
from hybrid_detr.config import load_config  # noqa: E402
from hybrid_detr.data import ensure_synthetic_dataset  # noqa: E402

ALL_VIEWS = ("decoder_sampling", "encoder_sampling", "smca", "dac", "co_detr")


def default_views(model):
    """The views that apply to the model's decoder mode."""
    names = set(model.mode.names)
    chosen = ["encoder_sampling"]
    if model.mode.cross_attention == "deformable" or views._deform_attn_names(model)["decoder"]:
        chosen.insert(0, "decoder_sampling")
    if "smca" in names and not views._deform_attn_names(model)["decoder"]:
        chosen.append("smca")
    if "dac" in names:
        chosen.append("dac")
    if "co_detr" in names and getattr(model.branches["co_detr"], "num_aux_heads", 0):
        chosen.append("co_detr")
    return chosen


def resolve_input(cfg, args):
    """The input dict (with ground truth when it comes from a dataset) and the dataset used."""
    if args.dataset is not None or (args.input is not None and not os.path.exists(args.input) and args.input.isdigit()):
        name = args.dataset or cfg.DATASETS.TEST[0]
        if args.dataset is not None:
            index = args.index
        else:
            ensure_synthetic_dataset(name)
            ids = [r["image_id"] for r in DatasetCatalog.get(name)]
            if int(args.input) not in ids:
                raise SystemExit(f"{args.input} is neither a file nor an image id of {name}")
            index = ids.index(int(args.input))
        return load_input(cfg, record=dataset_record(name, index)), name
    if args.input is None:
        raise SystemExit("give --input IMAGE (or an image id), or --dataset NAME --index I")
    return load_input(cfg, path=args.input), (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)


def explain(cfg, model, input_dict, out_dir, layer=-1, head=None, pixel=None, top_k=3, chosen=None, metadata=None):
    """Writes the chosen views (default: those of the model's mode) to `out_dir`; returns
    {view: result dict with "path" (or a list of them for smca)}."""
    os.makedirs(out_dir, exist_ok=True)
    chosen = list(chosen or default_views(model))
    captured = views.run_and_capture(model, input_dict)
    image = views.display_image(input_dict["image"], cfg.INPUT.FORMAT)
    results = {}
    if "decoder_sampling" in chosen:
        results["decoder_sampling"] = views.plot_decoder_sampling(
            captured, image, os.path.join(out_dir, "decoder_sampling.png"), layer, head, top_k, metadata)
    if "encoder_sampling" in chosen:
        if pixel is None:  # the top detection's centre
            _, _, _, boxes = views.top_detections(captured.inference.output, 1)
            h, w = captured.image_size
            pixel_in = (float(boxes[0, 0]) * w, float(boxes[0, 1]) * h)
        else:  # original image pixels -> the model's input pixels
            pixel_in = (pixel[0] * input_dict["width"] / input_dict["original"].shape[1],
                        pixel[1] * input_dict["height"] / input_dict["original"].shape[0])
        results["encoder_sampling"] = views.plot_encoder_sampling(
            captured, image, os.path.join(out_dir, "encoder_sampling.png"), pixel_in, layer)
    if "smca" in chosen:
        results["smca"] = views.plot_smca(model, captured, input_dict, image, out_dir, layer, top_k, metadata=metadata)
    gt = input_dict.get("instances")
    if "dac" in chosen:
        box = label = None
        if gt is not None and len(gt):
            h, w = captured.image_size
            xyxy = gt.gt_boxes.tensor[0] / torch.tensor([w, h, w, h], dtype=torch.float32)
            box = torch.stack(((xyxy[0] + xyxy[2]) / 2, (xyxy[1] + xyxy[3]) / 2, xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]))
            label = int(gt.gt_classes[0])
        results["dac"] = views.plot_dac(model, captured, image, os.path.join(out_dir, "dac.png"), box, label,
                                        metadata=metadata)
    if "co_detr" in chosen:
        if gt is None or not len(gt):
            print("[explain] co_detr view skipped: it needs an annotated image (--dataset NAME --index I)")
        else:
            results["co_detr"] = views.plot_co_detr(model, captured, image, gt, os.path.join(out_dir, "co_detr.png"),
                                                    metadata)
    return results


def paths(results):
    out = []
    for value in results.values():
        out += [v["path"] for v in value] if isinstance(value, list) else [value["path"]]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", default=None, help="an image file, or an image id of DATASETS.TEST[0]")
    parser.add_argument("--dataset", default=None, help="a registered dataset (with --index): the image and its gt")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--output", required=True, help="directory for the PNGs")
    parser.add_argument("--layer", type=int, default=-1, help="decoder (and encoder) layer, default the last")
    parser.add_argument("--head", type=int, default=None, help="one attention head (default: all)")
    parser.add_argument("--pixel", type=float, nargs=2, default=None, metavar=("X", "Y"),
                        help="encoder view: pixel of the original image (default: top detection's centre)")
    parser.add_argument("--top", type=int, default=3, help="detections to explain")
    parser.add_argument("--views", nargs="+", choices=ALL_VIEWS, default=None)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    input_dict, dataset = resolve_input(cfg, args)
    metadata = MetadataCatalog.get(dataset) if dataset else None
    results = explain(cfg, model, input_dict, args.output, args.layer, args.head, args.pixel, args.top,
                      args.views, metadata)
    for path in paths(results):
        print(path)
    return results


if __name__ == "__main__":
    main()
