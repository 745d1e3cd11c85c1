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
