"""tools/profile_step.py: every part of a training step is timed, the op's share measured."""
from model_helpers import load_tool, synthetic_batch, tiny_cfg

profile_step = load_tool("profile_step")


def test_parts_of_a_dac_step_are_timed():
    cfg = tiny_cfg(DECODER_MODE="dac")
    result = profile_step.profile_steps(cfg, [(synthetic_batch(), 0.0)] * 2, warmup=1)
    parts = result["parts_s"]
    for name in ["backbone", "neck", "encoder", "query selection", "decoder passes", "one-to-one matcher",
                 "losses", "backward", "optimizer step", "branch dac (incl. its decoder pass)", "branch dac matcher"]:
        assert parts[name] > 0, name
    assert sum(v for k, v in parts.items() if k in ("backbone", "neck", "encoder", "backward")) < result["step_s"]
    assert 0 < result["op_s"] < result["step_s"]
    assert "our MSDeformAttn op" in profile_step.format_profile(result)


def test_conv_flops_are_twice_the_multiply_adds():
    import torch

    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    # 8 outputs x 3 inputs x 3 x 3 taps per pixel, 2 images of 5 x 7 pixels, one multiply and one add each.
    assert profile_step.backbone_conv_flops(conv, (2, 3, 5, 7)) == 2 * (8 * 3 * 9) * (2 * 5 * 7)


def test_the_convolutions_are_timed_and_set_against_a_matmul():
    cfg = tiny_cfg()
    result = profile_step.profile_steps(cfg, [(synthetic_batch(), 0.0)] * 2, warmup=1)
    assert result["conv_forward_flops"] > 0 and result["matmul_flops_per_s"] > 0
    assert 0 < result["conv_forward_s"] < result["conv_s"] < result["step_s"]
    assert "GFLOP/s" in profile_step.format_profile(result)


def test_matmuls_padding_and_the_dense_bound_are_reported():
    cfg = tiny_cfg()
    batch = synthetic_batch()  # 96 x 128 and 80 x 100 pixels: the second is padded to 96 x 128
    result = profile_step.profile_steps(cfg, [(batch, 0.0)] * 2, warmup=1)
    assert 0 < result["matmul_s"] < result["step_s"]
    assert 0 < result["conv_s"] + result["matmul_s"] < result["step_s"]
    assert abs(result["padding_share"] - (1 - (96 * 128 + 80 * 100) / (2 * 96 * 128))) < 1e-9
    text = profile_step.format_profile(result)
    assert "matrix multiplies" in text and "at most" in text and "padding: 17.4%" in text
