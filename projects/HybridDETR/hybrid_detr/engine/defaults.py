"""Building a HybridDETR config from a YAML file and command-line overrides, with clear errors."""
import difflib

from detectron2.config import CfgNode, get_cfg

from hybrid_detr.config import add_hybrid_detr_config

__all__ = ["get_hybrid_detr_cfg", "load_config"]


def get_hybrid_detr_cfg() -> CfgNode:
    """detectron2's default config with HybridDETR's keys added."""
    cfg = get_cfg()
    add_hybrid_detr_config(cfg)
    return cfg


def _all_keys(node: CfgNode, prefix=""):
    for name, value in node.items():
        key = prefix + name
        yield key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, key + ".")


def _unknown_key_error(cfg: CfgNode, key: str, where: str) -> KeyError:
    close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    return KeyError(f"Non-existent config key {key} ({where}){hint}")


def _check_override_keys(cfg: CfgNode, opts):
    """yacs rejects an unknown key in `merge_from_list` with a bare AssertionError; we want a
    KeyError naming the key, as `merge_from_file` gives."""
    if len(opts) % 2:
        raise ValueError(f"Config overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    for key in opts[0::2]:
        if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
            continue  # yacs explains these itself
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise _unknown_key_error(cfg, key, "command-line override")
            node = node[part]


def load_config(config_file: str = "", opts=()) -> CfgNode:
    """`get_hybrid_detr_cfg()` merged with `config_file` (if given) then `opts` (KEY VALUE ...).

    An unknown key raises KeyError naming the key (and the closest existing key, if any).
    """
    cfg = get_hybrid_detr_cfg()
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            message = e.args[0] if e.args else ""
            prefix = "Non-existent config key: "
            if isinstance(message, str) and message.startswith(prefix):
                raise _unknown_key_error(cfg, message[len(prefix):], f"in {config_file}") from None
            raise
    opts = list(opts or [])
    _check_override_keys(cfg, opts)
    cfg.merge_from_list(opts)
    return cfg
