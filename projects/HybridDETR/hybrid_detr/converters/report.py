"""A conversion as tools/convert_official.py reports it: what was written, the converter's notes, the
command that evaluates the result; an error as one line on stderr."""
import sys

from .common import CONVERTERS, ConversionError, convert_file

__all__ = ["converter_summary", "convert_and_report"]


def converter_summary(name: str) -> str:
    """The first line of the converter's docstring (its name when it has none)."""
    return (CONVERTERS[name].__doc__ or name).strip().split("\n")[0]


def convert_and_report(model: str, input_path: str, output_path: str) -> int:
    """Converts `input_path` with the converter `model` into `output_path` and prints the report;
    returns the exit status (0, or 1 with the error printed on stderr)."""
    try:
        conversion = convert_file(model, input_path, output_path)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {output_path}: {conversion.description}, {len(conversion.state_dict)} tensors")
    for note in conversion.notes:
        print(f"  - {note}")
    print(
        f"evaluate with: python projects/HybridDETR/train_net.py --config-file configs/{conversion.config_name} "
        f"--eval-only MODEL.WEIGHTS {output_path}"
    )
    return 0
