"""Registration of the synthetic splits in detectron2's DatasetCatalog and MetadataCatalog."""
import logging

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .synthetic import STYLES, default_datasets_root, ensure_split, synthetic_split_paths
from .validation import validate_dataset_dicts

logger = logging.getLogger(__name__)

__all__ = [
    "register_synthetic_datasets",
    "register_builtin_synthetic_datasets",
    "ensure_synthetic_dataset",
    "SYNTHETIC_DATASET_NAMES",
]

SYNTHETIC_DATASET_NAMES = (
    "hybrid_synthetic_train",
    "hybrid_synthetic_val",
    "hybrid_synthetic_val1000",  # the val image stream, 1000 images (the first 200 are hybrid_synthetic_val)
    "hybrid_crowded_train",
    "hybrid_crowded_val",
)

# dataset name -> keyword arguments of `ensure_split`
_SPECS = {}


def ensure_synthetic_dataset(name):
    """Generate the files of a registered synthetic dataset if missing; return its JSON path.

    Returns None for any other dataset (COCO...), so a trainer may call it on every dataset it
    evaluates before building a COCOEvaluator, which reads `metadata.json_file` directly.
    """
    spec = _SPECS.get(name)
    if spec is None:
        return None
    return ensure_split(**spec)


def _load(name):
    json_file = ensure_synthetic_dataset(name)
    spec = _SPECS[name]
    _, _, image_root = synthetic_split_paths(spec["root"], spec["folder"] or spec["split"], spec["style"])
    dicts = load_coco_json(json_file, image_root, name)
    validate_dataset_dicts(dicts, len(STYLES[spec["style"]].classes), name)
    return dicts


def register_synthetic_dataset(name, split, root=None, num_images=None, style="shapes", folder=None, **gen_kwargs):
    """Register one synthetic split as `name` (replacing an earlier registration of that name).

    `style`: "shapes" (the quickstart's) or "crowded" (`synthetic.STYLES`); `folder`: the split's folder
    when it is not `split` (a split of another size from the same image stream). `gen_kwargs` go to
    `ensure_split` (seed, min_side, max_side, max_objects).
    """
    root = default_datasets_root() if root is None else root
    if num_images is None:
        num_images = dict(STYLES[style].split_sizes)[split]
    spec = dict(root=root, split=split, num_images=int(num_images), style=style, folder=folder, **gen_kwargs)
    _, json_file, image_root = synthetic_split_paths(root, folder or split, style)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    _SPECS[name] = spec
    DatasetCatalog.register(name, lambda name=name: _load(name))
    MetadataCatalog.get(name).set(
        thing_classes=list(STYLES[style].classes),
        # COCO category ids are 1-based in the JSON; detectron2 uses contiguous 0-based ids.
        thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(STYLES[style].classes))},
        evaluator_type="coco",
        json_file=json_file,
        image_root=image_root,
    )


def register_synthetic_datasets(
    root=None, num_train=None, num_val=None, prefix="hybrid_synthetic", style="shapes", **gen_kwargs
):
    """Register `<prefix>_train` and `<prefix>_val` (default `hybrid_synthetic_train/val`).

    Files are generated on first use (`DatasetCatalog.get` or `ensure_synthetic_dataset`), not
    here. Idempotent: calling it again re-registers the names. Returns the two names.
    """
    names = []
    for split, n in (("train", num_train), ("val", num_val)):
        name = f"{prefix}_{split}"
        register_synthetic_dataset(name, split, root=root, num_images=n, style=style, **gen_kwargs)
        names.append(name)
    return tuple(names)


def register_builtin_synthetic_datasets(root=None):
    """The embedded datasets (`SYNTHETIC_DATASET_NAMES`): the quickstart's shapes (train 2000, val 200),
    its val stream at 1000 images, and the crowded COCO-like style (train 3000, val 1000)."""
    register_synthetic_datasets(root)
    register_synthetic_dataset("hybrid_synthetic_val1000", "val", root=root, num_images=1000, folder="val1000")
    register_synthetic_datasets(root, prefix="hybrid_crowded", style="crowded")
