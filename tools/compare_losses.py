#!/usr/bin/env python
"""Compare HybridDETR's training losses with an official criterion's on the CPU: same predictions, same
batch, same random draws; max |difference| term by term and per decoder layer.

    python tools/compare_losses.py --official-src /path/to/Deformable-DETR deformable_detr [--seed S]
    python tools/compare_losses.py --official-src /path/to/DAC-DETR dac_detr
    python tools/compare_losses.py --official-src /path/to/DINO dino

Our model (the shipped config of each setting: Deformable DETR plain and two-stage, DAC-DETR's release
"dn+dac", DINO 4-scale; weights drawn at random, seeded) runs one training forward on two small seeded
images with seeded targets; the per-layer predictions its losses saw are given to the official
`SetCriterion` built by the official `build` of --official-src (nothing of it copied here; its `.cuda()`
calls run on the CPU), whose losses are weighted by its weight_dict and compared with the model's loss
dict. DAC-DETR: the release's random subsample of positives is recorded and given to our DACMatcher.
DINO and DAC-DETR: the official `prepare_for_cdn`, run from the RNG state our denoising hook drew its
noise from, must give the same groups (labels, boxes, attention mask). `hybrid_detr.analysis.loss_parity`
describes each setting. Exits 1 above --tolerance.

--source synthetic compares on synthetic predictions instead (small class and query counts, two thirds
of the queries near a gt: several positives per gt for DAC's ranks). --record FILE writes a fixture of
those for tests/tools/test_loss_parity.py: the predictions, the official losses, the release's subsample
(dac_detr) and the official denoising groups of the targets under --seed (dac_detr, dino).
"""
import argparse
import os
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

import torch  # noqa: E402

from hybrid_detr.analysis.loss_parity import KINDS, compare_losses, loss_report, record_fixture, save_fixture  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-src", required=True, help="a checkout of the official repository")
    parser.add_argument("model", choices=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--source", choices=["model", "synthetic"], default="model",
        help="the predictions: our model's outputs (default) or the fixtures' synthetic ones",
    )
    parser.add_argument("--record", metavar="FILE", help="write a test fixture (synthetic predictions) instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.record:
        fixture = record_fixture(args.model, args.official_src, args.seed)
        save_fixture(fixture, args.record)
        print(f"wrote {args.record}: {len(fixture['official'])} official loss terms")
        return 0
    lines, ok = loss_report(args.model, compare_losses(args.model, args.official_src, args.seed, args.source), args.tolerance)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
