"""hybrid_detr.data.image_io: the image reader of the mapper and the checks of the image files.

Every file is made here, in tmp_path or in memory."""
import io

import numpy as np
import pytest
from PIL import Image

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from hybrid_detr.data.image_io import ImageFileError, decode_image, image_file_problem, read_image, stream_problem
from hybrid_detr.data.mapper import resize_problem


def _photo(w, h, seed=0):
    """Gradients and texture with a little noise: compresses like a photograph."""
    y, x = np.mgrid[0:h, 0:w]
    texture = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 5.0)
    noise = np.random.default_rng(seed).integers(-20, 20, (h, w, 3))
    return np.clip(np.stack([x * 255 / w, y * 255 / h, texture], -1) + noise, 0, 255).astype(np.uint8)


def _encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


VALID = [
    ("baseline", "JPEG", {"quality": 90}),
    ("low quality 4:2:0", "JPEG", {"quality": 10, "subsampling": 2}),
    ("optimized tables", "JPEG", {"quality": 75, "optimize": True}),
    ("progressive", "JPEG", {"quality": 75, "progressive": True}),
    ("restart markers", "JPEG", {"quality": 75, "restart_marker_blocks": 3}),
    ("png", "PNG", {}),
]


@pytest.mark.parametrize("name, fmt, options", VALID, ids=[v[0] for v in VALID])
@pytest.mark.parametrize("size", [(13, 7), (160, 120)])
def test_valid_files_decode_as_pil_decodes_them(name, fmt, options, size):
    for mode in ("RGB", "L"):
        image = Image.fromarray(_photo(*size)).convert(mode)
        data = _encoded(image, fmt, **options)
        assert stream_problem(data) is None
        np.testing.assert_array_equal(np.asarray(decode_image(data)), np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK"])
@pytest.mark.parametrize("format", ["BGR", "RGB"])
def test_read_image_gives_what_detectron2_gives(tmp_path, mode, format):
    """The mapper switched from detectron2's read_image to ours: same pixels for 8-bit images."""
    path = tmp_path / f"x_{mode}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}"
    Image.fromarray(_photo(40, 30)).convert(mode).save(path)
    np.testing.assert_array_equal(read_image(str(path), format), utils.read_image(str(path), format))


def test_exif_orientation_is_applied_as_detectron2_does(tmp_path):
    for orientation in range(1, 9):
        path = tmp_path / f"exif{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(_photo(40, 30)).save(path, exif=exif)
        ours = read_image(str(path), "RGB")
        np.testing.assert_array_equal(ours, utils.read_image(str(path), "RGB"))
        assert ours.shape[:2] == ((40, 30) if orientation >= 5 else (30, 40))
        problem, info = image_file_problem(str(path), expected_size=(ours.shape[1], ours.shape[0]))
        assert problem is None and info["size"] == (ours.shape[1], ours.shape[0])


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_grey_is_read_by_its_high_byte(tmp_path, suffix):
    values = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    path = tmp_path / f"g16.{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = read_image(str(path), "RGB")
    assert image.dtype == np.uint8 and image.shape == (2, 4, 3)
    np.testing.assert_array_equal(image[..., 0], values >> 8)
    assert (image[..., 0] == image[..., 2]).all()
    # detectron2 reads the values clipped to 255: white wherever the 16-bit value is not below 255.
    np.testing.assert_array_equal(utils.read_image(str(path), "RGB")[..., 0], np.minimum(values, 255))
    problem, info = image_file_problem(str(path), (4, 2), full_decode=True)
    assert problem is None and info["sixteen_bit"]


def test_float_pixels_are_refused(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)).save(path)
    with pytest.raises(ImageFileError, match=r"floating-point pixels \(PIL mode 'F'\) have no standard 8-bit reading"):
        read_image(str(path), "RGB")
    problem, _ = image_file_problem(str(path), (4, 3))
    assert "floating-point pixels" in problem


def test_png_with_a_damaged_byte_fails_its_crc():
    data = bytearray(_encoded(Image.fromarray(_photo(32, 32)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0x10
    assert stream_problem(bytes(data)) == f"PNG chunk 'IDAT' at byte {idat - 4} of {len(data)} fails its CRC check (corrupt data)"
    with pytest.raises(ImageFileError, match=r"unreadable or truncated image \(PNG chunk 'IDAT' .* CRC"):
        decode_image(bytes(data))


def test_jpeg_restart_markers_out_of_order():
    data = _encoded(Image.fromarray(_photo(64, 64)), "JPEG", quality=75, restart_marker_blocks=2)
    first = data.index(b"\xff\xd0")
    second = data.index(b"\xff\xd1")
    swapped = bytearray(data)
    swapped[first + 1], swapped[second + 1] = 0xD1, 0xD0
    assert stream_problem(bytes(swapped)) == (
        f"byte {first} of {len(data)}: restart marker RST1 out of sequence (corrupt data)"
    )


def test_jpeg_with_a_stray_marker_in_its_compressed_data():
    data = bytearray(_encoded(Image.fromarray(_photo(64, 64)), "JPEG"))
    middle = len(data) // 2
    data[middle:middle + 2] = b"\xff\x3f"
    assert stream_problem(bytes(data)) == f"byte {middle} of {len(data)}: invalid JPEG marker 0xff3f (corrupt data)"


def test_truncated_jpeg():
    data = _encoded(Image.fromarray(_photo(64, 64)), "JPEG")
    with pytest.raises(ImageFileError, match=r"the JPEG data ends before its end marker"):
        decode_image(data[: len(data) * 2 // 3])


def test_resize_problem_of_elongated_images():
    final = [T.ResizeShortestEdge((112, 128, 144), 192, sample_style="choice")]
    assert resize_problem(480, 640, final) is None
    assert resize_problem(2, 300, final) is None  # 192 x 1.3 px: one row left
    assert "would make it 192x0, no pixel left (an image longer than 384 times its short side" in resize_problem(2, 2000, final)
    # The crop branch's resize has no maximum size: 2000x2 -> 400000x400 at its smallest shortest side.
    crop = [T.RandomApply(T.AugmentationList([T.ResizeShortestEdge([400, 600], sample_style="choice")]), prob=0.5)]
    problem = resize_problem(2, 2000, crop)
    assert problem.startswith("the image is 2000x2: resizing it to a shortest side of 400 (no maximum) would make it "
                              "400000x400, more than PIL.Image.MAX_IMAGE_PIXELS")
    assert resize_problem(300, 400, crop) is None
