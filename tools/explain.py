#!/usr/bin/env python
"""What HybridDETR looks at, for one image: PNGs of the attention behind its top detections.

    python tools/explain.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \\
        --input image.jpg --output explain/ [--layer -1] [--head H] [--pixel X Y] [--top 3] \\
        [--opts MODEL.WEIGHTS model_final.pth ...]
    python tools/explain.py --config-file CONFIG --dataset hybrid_synthetic_val --index 0 --output explain/
    python tools/explain.py --config-file CONFIG --input 12 --output explain/   # image id 12 of DATASETS.TEST[0]

Views: the generic ones, then the one of each mode in the config's DECODER_MODE (or --views):
  decoder_sampling.png  each top detection's sampling points on every level, decoder layer --layer,
                        head --head (default all), coloured by attention weight (deformable decoders);
  encoder_sampling.png  where the encoder token under --pixel X Y samples, every head and level, drawn
                        on the original image: X Y are its pixels (x right, y down, before the
                        test-time resize), as the star and the points; default the top detection's centre;
  smca_query<q>.png     SMCA: each head's Gaussian prior next to the attention it modulated, with the
                        scale selection (mode smca);
  dac.png               DAC: the boxes of the queries near one object after the O- and the C-decoder,
                        and the queries above each matching-score threshold, O vs C (mode dac);
  co_detr.png           Co-DETR: each auxiliary head's positive anchors / proposals for the ground
                        truth (mode co_detr; needs an annotated image: --dataset/--index or an image id).
A view that does not apply to the model or image is reported as skipped. Everything is captured with
forward hooks: the model computes exactly what it computes without them. Prints the paths written.
The work is done by `hybrid_detr.analysis.explain` (`explain_image`).
"""
import argparse
import sys

try:
    from hybrid_detr.analysis import explain as explain_lib
    from hybrid_detr.analysis.inputs import InputError
    from hybrid_detr.config import load_config
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")


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
                        help="encoder view: pixel of the original image, before the test-time resize "
                             "(default: top detection's centre)")
    parser.add_argument("--top", type=int, default=3, help="detections to explain")
    parser.add_argument("--views", nargs="+", choices=explain_lib.view_names(), default=None,
                        help="default: the generic views and those of the config's DECODER_MODE")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    try:
        results = explain_lib.explain_image(
            cfg, args.output, image=args.input, dataset=args.dataset, index=args.index, layer=args.layer,
            head=args.head, pixel=args.pixel, top_k=args.top, views=args.views,
        )
    except InputError as error:
        sys.exit(str(error))
    for name, result in results.items():
        if result is None:
            print(f"[explain] {name} view skipped: it does not apply to this model or image (a view that draws "
                  "the ground truth needs an annotated image: --dataset NAME --index I)")
    for path in explain_lib.paths(results):
        print(path)
    return results


if __name__ == "__main__":
    main()
