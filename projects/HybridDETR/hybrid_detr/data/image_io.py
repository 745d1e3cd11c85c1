"""Reading and checking one image file, with errors that say what is wrong with it.

Shared by the up-front dataset checks (`validation.check_image_files`) and the mapper
(`read_image`), so that a file refused by one is refused by the other with the same words.

- 16-bit single-channel images (PNG / TIFF mode "I;16", "I" from an older Pillow's 16-bit PNG)
  are read scaled to 8 bit by their high byte, value >> 8. detectron2's `read_image` would clip
  them to 255 (an all-white image). The high byte is what PIL itself keeps of 16-bit colour PNGs,
  what OpenCV's `imread` and torchvision's `to_dtype(uint8, scale=True)` give, so a 16-bit file
  reads as it does everywhere else. 32-bit integer or float pixels have no such convention and
  are refused.
- PIL drops libjpeg's "corrupt data" warnings and decodes what it can, so a JPEG damaged in its
  middle loads as a picture with garbage in it. `decode_image` checks the byte stream (a JPEG's
  markers: segment lengths, stray markers in the compressed data, restart-marker order; every PNG
  chunk's CRC) and that a one-scan JPEG's last pixel is decoded where its compressed data ends
  (damage throws the Huffman decoder off, so it finishes early or runs out of data). What it
  cannot see: damage after which the decoder falls back in step (often a few flipped bits or a
  zeroed stretch; within one restart interval of a JPEG with restart markers), and the scans
  before the last one of a progressive JPEG.
- A git-LFS pointer (the ~130-byte text file git leaves when the LFS content was not fetched)
  is named as such.
"""
import io
import os
import zlib

import numpy as np
from PIL import Image

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

__all__ = [
    "LFS_POINTER_PREFIX",
    "ImageFileError",
    "decode_image",
    "image_file_problem",
    "is_sixteen_bit",
    "lfs_pointer_problem",
    "read_image",
    "stream_problem",
]

# The first line of every git-LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

# PIL modes of single-channel 16-bit images; "I" is how Pillow < 10 opens a 16-bit PNG.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

_JPEG_START = b"\xff\xd8\xff"
_PNG_START = b"\x89PNG\r\n\x1a\n"

_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)


def lfs_pointer_problem(head: bytes):
    """The problem to report if `head` (the first bytes of a file) is a git-LFS pointer, else None."""
    if head.startswith(LFS_POINTER_PREFIX):
        return (
            "this is a git-LFS pointer file, not the file's content (the repository was cloned without "
            "its LFS objects): run `git lfs pull` in the repository that holds it"
        )
    return None


def is_sixteen_bit(image: Image.Image) -> bool:
    """Single-channel 16-bit pixels, which `read_image` scales to 8 bit."""
    return image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG")


def _pixel_format_problem(image: Image.Image):
    if image.mode in ("I", "F") and not is_sixteen_bit(image):
        kind = "floating-point" if image.mode == "F" else "32-bit integer"
        return (
            f"{kind} pixels (PIL mode {image.mode!r}) have no standard 8-bit reading: convert the image to "
            f"8-bit (or 16-bit) grey or RGB"
        )
    return None


# ---- byte-stream checks ---------------------------------------------------------------------
class _JpegLayout:
    """What a walk over a JPEG's markers found: `problem` (None if the structure is intact), the
    number of scans (SOS segments) and where the compressed data of the last one ends."""

    def __init__(self, problem=None, num_scans=0, scan_end=None):
        self.problem, self.num_scans, self.scan_end = problem, num_scans, scan_end


def _walk_jpeg(data: bytes) -> _JpegLayout:
    n, pos, restart_interval, num_scans, scan_end = len(data), 2, 0, 0, None
    truncated = "the JPEG data ends before its end marker (truncated or corrupt file)"
    while True:
        if pos >= n:
            return _JpegLayout(truncated, num_scans)
        if data[pos] != 0xFF:
            found = f"byte {pos} of {n}: a JPEG marker was expected, found 0x{data[pos]:02x} (corrupt data)"
            return _JpegLayout(found, num_scans)
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= n:
            return _JpegLayout(truncated, num_scans)
        marker, start = data[pos], pos - 1
        pos += 1
        if marker == 0xD9:  # EOI; what follows (a phone's appended video, ...) is not image data
            return _JpegLayout(None, num_scans, scan_end)
        # Only markers that carry a segment may come here: SOFn, DHT, DAC, DQT, DNL, DRI, SOS, APPn, COM.
        if marker < 0xC0 or 0xD0 <= marker <= 0xD8 or marker == 0xC8:
            return _JpegLayout(f"byte {start} of {n}: invalid JPEG marker 0xff{marker:02x} (corrupt data)", num_scans)
        length = int.from_bytes(data[pos:pos + 2], "big") if pos + 2 <= n else 0
        if pos + 2 > n or pos + length > n:
            return _JpegLayout(truncated, num_scans)
        if length < 2:
            found = f"byte {start} of {n}: segment 0xff{marker:02x} of impossible length {length} (corrupt data)"
            return _JpegLayout(found, num_scans)
        if marker == 0xDD and length >= 4:  # DRI: a restart marker every `restart_interval` MCUs
            restart_interval = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += length
        if marker != 0xDA:
            continue
        # SOS: compressed data up to the next marker; a 0xff byte in it is stuffed as ff00 and the
        # restart markers RST0..RST7 come in turn.
        num_scans += 1
        next_restart = 0
        while True:
            ff = data.find(b"\xff", pos)
            if ff < 0 or ff + 1 >= n:
                return _JpegLayout(truncated, num_scans)
            follower = data[ff + 1]
            if follower == 0x00:
                pos = ff + 2
            elif 0xD0 <= follower <= 0xD7:
                if restart_interval == 0 or follower - 0xD0 != next_restart:
                    return _JpegLayout(
                        f"byte {ff} of {n}: restart marker RST{follower - 0xD0} out of sequence (corrupt data)",
                        num_scans,
                    )
                next_restart = (next_restart + 1) % 8
                pos = ff + 2
            else:
                pos = scan_end = ff
                break


def _png_stream_problem(data: bytes):
    """None if every PNG chunk is complete with a correct CRC up to IEND, else the first bad one."""
    n, pos = len(data), 8
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunk_type = data[pos + 4:pos + 8]
        end = pos + 8 + length + 4
        name = chunk_type.decode("latin-1")
        if end > n:
            return f"the PNG data ends inside chunk {name!r} at byte {pos} (truncated file)"
        crc = int.from_bytes(data[end - 4:end], "big")
        if zlib.crc32(data[pos + 4:end - 4]) != crc:
            return f"PNG chunk {name!r} at byte {pos} of {n} fails its CRC check (corrupt data)"
        if chunk_type == b"IEND":
            return None
        pos = end
    return "the PNG data ends before its IEND chunk (truncated file)"


def stream_problem(data: bytes):
    """What is broken in the bytes of a JPEG or PNG file that PIL would decode without an error;
    None when intact or of another format (for which the decoder's own checks are all there is)."""
    if data.startswith(_JPEG_START):
        return _walk_jpeg(data).problem
    if data.startswith(_PNG_START):
        return _png_stream_problem(data)
    return None


# ---- decoding --------------------------------------------------------------------------------
# A JPEG whose compressed data ends more than this many bytes after the last pixel is decoded, or
# later than its end marker, is corrupt. (libjpeg reads at most 8 bytes ahead of what it decodes.)
_JPEG_END_SLACK = 16
_JPEG_LOOKAHEAD = 16


def _decode_jpeg_to_its_end(image: Image.Image, data: bytes, end: int) -> None:
    """Decode `image` (opened on `data`, one scan whose data ends at `end`), raising OSError when
    the last pixel is not decoded where the compressed data ends.

    Damaged bytes in the middle of a scan usually throw the Huffman decoder off the code
    boundaries: it then decodes garbage and finishes too early or runs into the end marker, which
    libjpeg reports only as a warning that PIL drops. PIL's incremental decoder (what its
    ImageFile.Parser uses) tells where it finished. Where a Pillow version lacks that interface the
    image is loaded as usual, without this check."""
    try:
        image.load_prepare()
        codec, extents, offset, args = image.tile[0]
        decoder = Image._getdecoder(image.mode, codec, args, image.decoderconfig)
        decoder.setimage(image.im, extents)
    except Exception:  # another Pillow's internals: decode without the check
        image.load()
        return
    corrupt = "corrupt compressed data (damaged in the middle of the file?)"
    try:
        split = max(offset, end - _JPEG_END_SLACK)
        consumed, err = decoder.decode(data[offset:split])
        if consumed < 0:
            if err < 0:
                raise OSError(f"libjpeg cannot decode it (PIL error {err})")
            raise OSError(f"{corrupt}: the last pixel is decoded more than {end - split} bytes before the data ends")
        consumed, err = decoder.decode(data[offset + consumed:end] + bytes(_JPEG_LOOKAHEAD))
        if consumed >= 0:
            raise OSError(f"{corrupt}: the data ends before the last pixel is decoded, although the file is complete")
        if err < 0:
            raise OSError(f"libjpeg cannot decode it (PIL error {err})")
    finally:
        decoder.cleanup()
    image.tile = []  # decoded: `load` has nothing left to do


class ImageFileError(OSError):
    """A problem of an image file; its message says what is wrong and what to do."""


def decode_image(data: bytes) -> Image.Image:
    """The fully decoded PIL image of an image file's bytes; ImageFileError saying what is wrong: a
    git-LFS pointer, a broken JPEG / PNG byte stream (`stream_problem`), a JPEG whose compressed
    data does not end with its last pixel, a decompression bomb, what PIL cannot read."""
    problem = lfs_pointer_problem(data)
    if problem:
        raise ImageFileError(problem)
    layout = _walk_jpeg(data) if data.startswith(_JPEG_START) else None
    problem = layout.problem if layout else stream_problem(data)
    if problem:
        raise ImageFileError(_UNREADABLE.format(problem))
    try:
        image = Image.open(io.BytesIO(data))
        if layout is not None and layout.num_scans == 1 and image.format == "JPEG" and len(image.tile) == 1:
            _decode_jpeg_to_its_end(image, data, layout.scan_end)
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageFileError(_bomb_problem(e)) from e
    except Image.UnidentifiedImageError as e:
        raise ImageFileError(_UNREADABLE.format(_UNIDENTIFIED)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what PIL raises for broken files
        raise ImageFileError(_UNREADABLE.format(e)) from e
    return image


def _bomb_problem(error):
    return (
        f"{error} PIL refuses images of more than 2 x PIL.Image.MAX_IMAGE_PIXELS pixels. Downscale the "
        f"image (training resizes it to at most INPUT.MAX_SIZE_TRAIN anyway), or, if you trust the file, "
        f"raise PIL's limit before training: `PIL.Image.MAX_IMAGE_PIXELS = None` at the top of train_net.py"
    )


# EXIF orientation -> the transposition that shows the image upright (detectron2's read_image applies it).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(image: Image.Image) -> int:
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: detectron2's reader ignores it too
        return 1


def _oriented_size(image: Image.Image):
    """(width, height) after the EXIF orientation."""
    w, h = image.size
    return (h, w) if _exif_orientation(image) in _ORIENTATIONS_SWAPPING_SIDES else (w, h)


def _complete(path, fmt):
    """Cheap end-of-file check: JPEG ends with EOI (FFD9), PNG with an IEND chunk."""
    if fmt not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 32, 0))
        tail = f.read()
    if fmt == "JPEG":
        return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    return b"IEND" in tail


# ---- one file ---------------------------------------------------------------------------------
_UNIDENTIFIED = "PIL cannot identify it as an image (not an image file, or a format PIL does not read)"
_UNREADABLE = "unreadable or truncated image ({}): replace the file (re-export or re-download it)"


def image_file_problem(path, expected_size=None, full_decode=False):
    """(problem, info) for the image file `path`: problem is None when it is usable, else what is
    wrong and how to fix it; info = {"size": (w, h) after EXIF orientation, "sixteen_bit": bool},
    None when the file could not be read.

    Always: exists, not a git-LFS pointer, PIL knows its format, not a decompression bomb, pixels
    that `read_image` reads, (w, h) after EXIF orientation == `expected_size` (what detectron2's
    mapper requires). `full_decode`: the whole file is read and decoded (`decode_image`); else only
    the header, with a cheap end-of-file check for JPEG / PNG.
    """
    if not path or not os.path.isfile(path):
        return "image file not found", None
    try:
        with open(path, "rb") as f:
            data = f.read() if full_decode else f.read(len(LFS_POINTER_PREFIX))
    except OSError as e:
        return f"cannot be read ({e})", None
    lfs = lfs_pointer_problem(data)
    if lfs:
        return lfs, None
    try:
        image = decode_image(data) if full_decode else Image.open(path)
        with image:
            if not full_decode and not _complete(path, image.format):
                image.load()  # the cheap end-of-file check failed: decode to be sure
            info = {"size": _oriented_size(image), "sixteen_bit": is_sixteen_bit(image)}
            problem = _pixel_format_problem(image)
    except ImageFileError as e:
        return str(e), None
    except Image.DecompressionBombError as e:
        return _bomb_problem(e), None
    except Image.UnidentifiedImageError:
        return _UNREADABLE.format(_UNIDENTIFIED), None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return _UNREADABLE.format(e), None
    if problem is None and expected_size is not None and info["size"] != tuple(expected_size):
        w, h = info["size"]
        problem = (
            f"image is {w}x{h} but the annotations say {expected_size[0]}x{expected_size[1]} (width x height, "
            f"after the EXIF orientation, as detectron2 reads it): correct the image's 'width'/'height' in the "
            f"annotation file"
        )
    return problem, info


def read_image(file_name, format=None):
    """detectron2's `read_image` (EXIF orientation applied, HWC uint8 in `format`), and: 16-bit grey
    scaled to 8 bit, the file checked by `decode_image`, every problem of the file an ImageFileError
    (an OSError) that says what is wrong with it (the caller adds which record it belongs to)."""
    with PathManager.open(file_name, "rb") as f:
        image = decode_image(f.read())
    problem = _pixel_format_problem(image)
    if problem:
        raise ImageFileError(problem)
    sixteen_bit = is_sixteen_bit(image)
    upright = _UPRIGHT.get(_exif_orientation(image))
    if upright is not None:
        image = image.transpose(upright)
    if sixteen_bit:
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
    return utils.convert_PIL_to_numpy(image, format)
