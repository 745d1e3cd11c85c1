"""projects/HybridDETR/demo.py: several images (globs), a video, and clear errors for bad input or no weights."""
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

import demo
from model_helpers import tiny_cfg

SIZES = [(96, 128), (112, 96), (100, 100)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config file, a full checkpoint of its model, a backbone-only one, and three images."""
    root = tmp_path_factory.mktemp("demo")
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 160
    config = root / "tiny.yaml"
    config.write_text(cfg.dump())
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # untrained box heads end in zeros: spread the boxes so that they are drawn apart
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight.normal_(std=0.05)
    DetectionCheckpointer(model, save_dir=str(root)).save("model_full")
    backbone_only = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": backbone_only}, root / "backbone_only.pth")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.jpg")
    return dict(root=root, config=str(config), weights=str(root / "model_full.pth"),
                backbone=str(root / "backbone_only.pth"), images=images, cfg=cfg)


def run(setup, *args, weights=None):
    """demo.main on the tiny config, threshold 0, with `weights` (default: the full checkpoint)."""
    weights = setup["weights"] if weights is None else weights
    return demo.main(["--config-file", setup["config"], "--confidence-threshold", "0.0", *map(str, args),
                      "--opts", "MODEL.WEIGHTS", str(weights)])


def error_of(capsys, fn):
    with pytest.raises(SystemExit) as exit_info:
        fn()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]  # argparse: usage, then "demo.py: error: <message>"


def test_glob_and_explicit_inputs_draw_one_png_each_in_a_folder(setup, tmp_path):
    out_dir = tmp_path / "drawn"
    images = setup["images"]
    results = run(setup, "--input", str(images / "img[01].jpg"), str(images / "img2.jpg"), "--output", out_dir)
    assert sorted(results) == [str(out_dir / f"img{i}.png") for i in range(3)]
    # each drawing is its image's size and shows the detections the model gives on that image
    predictor = DefaultPredictor(setup["cfg"].clone())
    DetectionCheckpointer(predictor.model).load(setup["weights"])
    for i, (h, w) in enumerate(SIZES):
        path = out_dir / f"img{i}.png"
        with Image.open(path) as drawn:
            assert drawn.format == "PNG" and drawn.size == (w, h)
            drawn = np.asarray(drawn.convert("RGB"))
        image = cv2.imread(str(images / f"img{i}.jpg"))
        expected = predictor(image)["instances"]
        got = results[str(path)]
        assert len(got) == len(expected) > 0
        torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor)
        assert not np.array_equal(drawn, image[:, :, ::-1])  # boxes were drawn on it


def test_one_input_to_a_file(setup, tmp_path):
    output = tmp_path / "one" / "out.png"
    results = run(setup, "--input", setup["images"] / "img1.jpg", "--output", output)
    assert list(results) == [str(output)] and output.is_file()


def test_threshold_filters_the_drawn_detections(setup, tmp_path):
    image = setup["images"] / "img0.jpg"
    all_scores = run(setup, "--input", image, "--output", tmp_path / "a.png")[str(tmp_path / "a.png")].scores
    threshold = float(all_scores.median())
    kept = demo.main(["--config-file", setup["config"], "--confidence-threshold", str(threshold), "--input",
                      str(image), "--output", str(tmp_path / "b.png"), "--opts", "MODEL.WEIGHTS", setup["weights"]])
    kept_scores = kept[str(tmp_path / "b.png")].scores
    assert len(kept_scores) == int((all_scores >= threshold).sum()) < len(all_scores)
    assert (kept_scores >= threshold).all()


def test_video_in_video_out(setup, tmp_path):
    source = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (128, 96), True)
    assert writer.isOpened(), "OpenCV cannot write the test clip"
    rng = np.random.default_rng(1)
    for _ in range(3):
        writer.write(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    writer.release()
    out_dir = tmp_path / "video_out"
    out_dir.mkdir()
    results = run(setup, "--video-input", source, "--output", out_dir)
    output = out_dir / "clip.mp4"
    assert list(results) == [str(output)] and len(results[str(output)]) == 3
    video = cv2.VideoCapture(str(output))
    frames = 0
    while video.read()[0]:
        frames += 1
    assert frames == 3
    assert (video.get(cv2.CAP_PROP_FRAME_WIDTH), video.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (128, 96)
    video.release()


def test_no_weights_is_refused_unless_allowed(setup, tmp_path, capsys):
    image = setup["images"] / "img0.jpg"
    message = error_of(capsys, lambda: run(setup, "--input", image, "--output", tmp_path / "x.png", weights=""))
    assert "MODEL.WEIGHTS is empty" in message and "--allow-random-weights" in message
    assert not (tmp_path / "x.png").exists()
    results = run(setup, "--allow-random-weights", "--input", image, "--output", tmp_path / "x.png", weights="")
    assert (tmp_path / "x.png").is_file() and len(results) == 1


def test_a_backbone_only_checkpoint_is_refused(setup, tmp_path, capsys):
    message = error_of(capsys, lambda: run(setup, "--input", setup["images"] / "img0.jpg",
                                           "--output", tmp_path / "x.png", weights=setup["backbone"]))
    assert setup["backbone"] in message and "no weights for" in message and "outside the backbone" in message


@pytest.mark.parametrize("case,expected", [
    ("missing_file", "--input '{images}/nope.jpg' does not exist"),
    ("empty_glob", "--input '{images}/*.bmp' matches no file"),
    ("missing_weights", "MODEL.WEIGHTS '{root}/nope.pth' does not exist"),
    ("missing_video", "--video-input '{root}/nope.mp4' does not exist"),
    ("not_an_image", "cannot read image '{root}/tiny.yaml'"),
    ("several_to_a_file", "is a file but there are 3 inputs: give a folder"),
    ("both_inputs", "give either --input (images) or --video-input (a video)"),
])
def test_bad_input_is_one_line_naming_it(setup, tmp_path, capsys, case, expected):
    images, root = setup["images"], setup["root"]
    existing_file = tmp_path / "exists.png"
    existing_file.write_bytes(b"")
    args = {
        "missing_file": ["--input", images / "img0.jpg", images / "nope.jpg", "--output", tmp_path],
        "empty_glob": ["--input", images / "*.bmp", "--output", tmp_path],
        "missing_video": ["--video-input", root / "nope.mp4", "--output", tmp_path],
        "not_an_image": ["--input", root / "tiny.yaml", "--output", tmp_path / "x.png"],
        "several_to_a_file": ["--input", images / "*.jpg", "--output", existing_file],
        "both_inputs": ["--input", images / "img0.jpg", "--video-input", root / "nope.mp4", "--output", tmp_path],
    }.get(case, ["--input", images / "img0.jpg", "--output", tmp_path / "x.png"])
    weights = root / "nope.pth" if case == "missing_weights" else None
    message = error_of(capsys, lambda: run(setup, *args, weights=weights))
    assert ": error: " in message
    assert expected.format(images=images, root=root) in message, message
    assert "Traceback" not in capsys.readouterr().err


def test_colliding_names_in_a_folder_are_refused(setup, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "img0.jpg").write_bytes((setup["images"] / "img0.jpg").read_bytes())
    message = error_of(capsys, lambda: run(setup, "--input", setup["images"] / "img0.jpg", other / "img0.jpg",
                                           "--output", tmp_path / "out"))
    assert "would both be drawn to 'img0.png'" in message
    assert not os.path.exists(tmp_path / "out")
