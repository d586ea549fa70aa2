"""Sizes of the real configs (built on the meta device) and the flow-matching schedule, against the numbers
of the official Wan2.1 configs (`wan/configs/wan_t2v_1_3B.py`: 1,418,996,800 parameters at 1.3B) and
Self-Forcing's warped timesteps."""

import json
import re

import pytest
import torch

from models.common.scheduler import FlowMatchScheduler
from models.errors import ModelInputError
from models.wan.config import WanConfig, preset
from models.wan.model import WanModel


def meta_model(name):
    with torch.device("meta"):
        return WanModel(preset(name), causal=True)


def test_wan_1_3b_parameter_count_and_state_dict_names():
    model = meta_model("wan2.1-t2v-1.3b")
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800
    assert len(sd) == 825
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 46_440_704
    shapes = {
        "patch_embedding.weight": (1536, 16, 1, 2, 2),
        "text_embedding.0.weight": (1536, 4096),
        "text_embedding.2.weight": (1536, 1536),
        "time_embedding.0.weight": (1536, 256),
        "time_projection.1.weight": (9216, 1536),
        "head.modulation": (1, 2, 1536),
        "head.head.weight": (64, 1536),
        "blocks.29.modulation": (1, 6, 1536),
        "blocks.0.self_attn.norm_q.weight": (1536,),
        "blocks.0.self_attn.o.weight": (1536, 1536),
        "blocks.0.cross_attn.norm_k.weight": (1536,),
        "blocks.0.norm3.bias": (1536,),
        "blocks.0.ffn.0.weight": (8960, 1536),
        "blocks.0.ffn.2.weight": (1536, 8960),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    per_block = sorted(k.split(".", 2)[2] for k in sd if k.startswith("blocks.7."))
    assert len(per_block) == 27
    # the norms without parameters (norm1, norm2, head norm) have no keys
    assert not any(k.startswith(("blocks.0.norm1", "blocks.0.norm2", "head.norm")) for k in sd)


def test_1_3b_geometry_and_rope_split():
    cfg = preset("wan2.1-t2v-1.3b")
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.ffn_dim) == (1536, 12, 128, 30, 8960)
    assert cfg.rope_split == (44, 42, 42)
    assert cfg.tokens_per_frame(60, 104) == 1560


def test_14b_preset_builds():
    cfg = preset("wan2.1-t2v-14b")
    assert cfg.head_dim == 128 and cfg.num_layers == 40


def test_config_json_round_trip_and_unknown_key(tmp_path):
    cfg = preset("tiny")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_json_dict()))
    assert WanConfig.from_json(path) == cfg
    raw = cfg.to_json_dict() | {"num_layerz": 3}
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelInputError, match="num_layerz"):
        WanConfig.from_json(path)
    # Wan's own WanModel keys: at Wan2.1's values read, at others refused (they loaded and did nothing: a token
    # window of [1, 1] ran global attention, norms said off stayed on)
    wan = {"window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}
    path.write_text(json.dumps(cfg.to_json_dict() | wan))
    assert WanConfig.from_json(path) == cfg
    for key, value, words in [("window_size", [1, 1], "window_size [1, 1]: this model is Wan2.1's with window_size "
                                                      "[-1, -1] only (a token window"),
                              ("qk_norm", False, "qk_norm False: this model is Wan2.1's with qk_norm True only"),
                              ("qk_norm", None, "qk_norm None: this model is Wan2.1's with qk_norm True only"),
                              ("cross_attn_norm", False, "cross_attn_norm False: this model is Wan2.1's with "
                                                         "cross_attn_norm True only (false: no LayerNorm (norm3)")]:
        path.write_text(json.dumps(cfg.to_json_dict() | {key: value}))
        with pytest.raises(ModelInputError, match=re.escape(f"{path}: {words}")):
            WanConfig.from_json(path)


@pytest.mark.parametrize("change, words", [
    ({"num_layers": 100_000_000}, "num_layers 100000000: give a whole number from 1 to 1024"),  # (it built for minutes)
    ({"dim": 1_000_000_000}, "dim 1000000000: give a whole number from 1 to 65536"),  # (a traceback from torch)
    ({"num_heads": 0}, "num_heads 0: give a whole number"), ({"dim": "abc"}, "dim 'abc': give a whole number"),
    ({"num_layers": True}, "num_layers True"), ({"patch_size": [0, 0, 0]}, "patch_size [0, 0, 0]: give 3 whole"),
    ({"patch_size": 2}, "patch_size 2: give 3"), ({"eps": "x"}, "eps 'x'"),
    ({"dim": 65536, "ffn_dim": 1 << 20, "num_layers": 1024}, "parameters, past the 200B"),
    ({"sink_size": "x"}, "sink_size 'x': give a whole number of frames"), ({"local_attn_size": 2.5}, "local_attn_size"),
])
def test_a_config_json_of_impossible_sizes_is_one_line_naming_the_file(tmp_path, change, words):
    """A config.json from elsewhere: each impossible or absurd size is refused before anything is built, naming
    the file and the setting (some gave tracebacks, 10^8 layers built until memory ran out)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset("tiny").to_json_dict() | change))
    with pytest.raises(ModelInputError, match=re.escape(f"{path}: ") + ".*" + re.escape(words)):
        WanConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ModelInputError, match="a config holds a JSON object"):
        WanConfig.from_json(path)
    diffusers = dict(_class_name="WanTransformer3DModel", num_attention_heads=40.0, attention_head_dim=128,
                     in_channels=16)  # (its sizes are checked before dim = heads x head_dim is made of them)
    path.write_text(json.dumps(diffusers))
    with pytest.raises(ModelInputError, match="num_attention_heads 40.0: give a whole number from 1 to 65536"):
        WanConfig.from_json(path)


def test_config_infers_sizes_from_state_dict():
    cfg = preset("tiny")
    with torch.device("meta"):
        sd = WanModel(cfg).state_dict()
    assert WanConfig.from_state_dict(sd, num_heads=cfg.num_heads, text_len=cfg.text_len) == cfg
    with pytest.raises(ModelInputError, match="heads"):
        WanConfig.from_state_dict(sd)  # dim 64 is no known size: heads must be given


def test_schedule_numbers():
    s = FlowMatchScheduler(shift=5.0)
    assert len(s.timesteps) == 1000
    assert s.timesteps[0].item() == 1000.0
    assert s.timesteps[-1].item() == pytest.approx(4.98, abs=5e-3)
    assert s.sigmas[-1].item() == pytest.approx(0.00498, abs=5e-5)
    warped = s.warp([1000, 750, 500, 250])
    assert warped.dtype == torch.float32
    assert warped.tolist() == [1000.0, 937.5, pytest.approx(833.3333, abs=1e-4), 625.0]
    assert warped[2].item() == 833.3333129882812
    assert s.sigma(warped).tolist() == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-6)
    # shift 8 gives the timesteps Self-Forcing's ODE-pair script (`scripts/generate_ode_pairs.py`) stores
    assert FlowMatchScheduler(8.0).warp([1000, 750, 500, 250]).tolist() == pytest.approx(
        [1000.0, 960.0, 888.9, 727.3], abs=0.05)


def test_flow_conversions_are_inverse():
    s = FlowMatchScheduler(5.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    t = torch.tensor([937.5, 625.0])
    xt = s.add_noise(x0, noise, t)
    flow = s.training_target(x0, noise)
    torch.testing.assert_close(s.x0_from_flow(flow, xt, t), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(s.flow_from_x0(x0, xt, t), flow, rtol=0, atol=1e-5)
    # add_noise snaps t = 0 to the last grid point (sigma 0.00498): training's context noise is not zero
    assert not torch.equal(s.add_noise(x0, noise, torch.zeros(2)), x0)


def test_training_weight_peak():
    s = FlowMatchScheduler(5.0)
    assert s.training_weight(s.timesteps).max().item() == pytest.approx(2.076, abs=1e-3)


def test_bad_shift_and_steps():
    with pytest.raises(ModelInputError, match="shift"):
        FlowMatchScheduler(0)
    with pytest.raises(ModelInputError, match="1001"):
        FlowMatchScheduler(5).warp([1001])
    with pytest.raises(ModelInputError, match=r"\[-1\.0\] must lie in 0..1000"):
        FlowMatchScheduler(5).denoising_timesteps([-1], warp=False)


def test_a_step_list_ending_in_0_and_unwarped_steps():
    """Their configs may end the list in 0 (the 0 appended after the grid, t = 0: `cat(timesteps, [0])[1000 - s]`);
    unwarped (`warp_denoising_step: false`, default_config.yaml's value) the steps are the timesteps."""
    s = FlowMatchScheduler(5.0)
    assert s.warp([1000, 750, 500, 250, 0]).tolist() == s.warp([1000, 750, 500, 250]).tolist() + [0.0]
    unwarped = s.denoising_timesteps([1000, 750, 500, 250], warp=False)
    assert unwarped.dtype == torch.float32 and unwarped.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert torch.equal(s.denoising_timesteps([1000, 500]), s.warp([1000, 500]))


def test_the_multi_step_solver_runs_on_wans_sigmas():
    """Wan's FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py, set_timesteps(N, shift=s) as the
    researchers' multi-step pipelines and Wan's text2video call it) spaces its sigmas from 0.999 (its training
    grid's largest, in float32), not diffusers' 1.0: its 4 steps at shift 5 are 999, 937, 833, 624 (diffusers'
    default grid: ..., 625). The values and a 6-step solve of a linear flow were taken from Wan's scheduler."""
    import torch

    from models.common.rollout import MultiStepSolver

    s = MultiStepSolver("unipc", 4, 5.0)
    assert s.timesteps == [999.0, 937.0, 833.0, 624.0]
    assert s._s.sigmas.tolist() == [0.9997998476028442, 0.9372654557228088, 0.8330553770065308, 0.6246873736381531, 0.0]
    s = MultiStepSolver("unipc", 6, 3.0)
    x = torch.tensor([1.0, -0.5, 0.25, 2.0]).reshape(1, 1, 4)
    for i in range(6):
        x = s.step(i, 0.3 * x - 0.2, x)
    assert x.flatten().tolist() == [0.9119299650192261, -0.1917549967765808, 0.360087513923645, 1.647720217704773]


def test_video_sizes_past_any_model_are_refused_before_allocating(tmp_path):
    """A config.json's video_size of 32000 x 32000 made generate allocate 21 GB of noise before failing."""
    from models.wan.config import default_video_size, latent_size

    with pytest.raises(ModelInputError, match="--height 32000: at most 4096 pixels"):
        latent_size(32000, 832, preset("tiny"))
    assert latent_size(720, 1280, preset("tiny")) == (90, 160)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_json_dict() | {"video_size": [32000, 32000]}))
    with pytest.raises(ModelInputError, match=r"video_size \[32000, 32000\] must be \[height, width\] in pixels, each "
                                              "at most 4096"):
        default_video_size(tmp_path)
