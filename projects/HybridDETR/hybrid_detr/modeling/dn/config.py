"""Config keys of DINO's contrastive denoising (`DECODER_MODE: "dn"`): `add_dn_config` adds them
to a config that has MODEL.HYBRID_DETR. Defaults from the official DINO (IDEA-Research/DINO):
config/DINO/DINO_4scale.py lines 97-103 and the released training script scripts/DINO_train.sh."""
from detectron2.config import CfgNode as CN

__all__ = ["add_dn_config"]


def add_dn_config(cfg):
    """DINO: noised ground-truth queries in positive and negative groups in the one-to-one pass."""
    model = cfg.MODEL.HYBRID_DETR
    model.DN = CN()
    dn = model.DN
    # dn_number 100 (DINO_4scale.py:99; the script's dn_scalar=100): with G gt boxes in the batch's
    # fullest image there are max(1, NUMBER // G) groups, each of G positive and G negative queries
    # per image (dn_components.py:35-47); an image with more than NUMBER boxes gets one group of all.
    # As the official code, NUMBER < 50 gives 2 x NUMBER groups whatever the box count.
    dn.NUMBER = 100
    # Half of this fraction of the labels is replaced by a random class (dn_label_noise_ratio 0.5,
    # DINO_4scale.py:101; dn_components.py:63-67).
    dn.LABEL_NOISE_RATIO = 0.5
    # Box corners move by up to BOX_NOISE_SCALE x (w/2, h/2): positives by less than that, negatives
    # by 1-2 times it (dn_components.py:75-92). 1.0 is what the released checkpoints were trained with
    # (scripts/DINO_train.sh passes dn_box_noise_scale=1.0); the config file says 0.4.
    dn.BOX_NOISE_SCALE = 1.0
    # Rows of the label embedding minus one (dn_labelbook_size, DINO_4scale.py:103: 91 for COCO's
    # category ids; the extra row is never used); 0 means NUM_CLASSES, what our contiguous classes need.
    dn.LABELBOOK_SIZE = 0
