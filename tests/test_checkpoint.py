"""Checkpoint IO: Self-Forcing .pt round trip, the Wan folder (single and sharded), the diffusers layout
(keys both ways, and equality of the forward with diffusers' WanTransformer3DModel), and clear errors."""


import json
import os
import shutil
import time

import pytest
import torch

from conftest import tiny_model
from models.wan.checkpoint import (build_model, from_diffusers, load_wan, read_self_forcing, read_wan_folder,
                               save_self_forcing, save_wan_folder, strip_prefixes, to_diffusers)
from models.errors import CheckpointError
from models.files import sha256_file
from models.wan.config import preset


@pytest.fixture
def sd():
    return tiny_model().state_dict()


def test_self_forcing_round_trip(tmp_path, sd):
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "ckpt.pt"
    save_self_forcing(path, generator=sd, generator_ema=ema, critic=sd)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"generator", "generator_ema", "critic"}
    assert all(k.startswith("model.") for k in raw["generator"])  # the wrapper's prefix, as released
    for key, want in (("generator", sd), ("generator_ema", ema), ("critic", sd)):
        got = read_self_forcing(path, key)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_wrapper_prefixes_are_stripped(sd):
    wrapped = {f"model._fsdp_wrapped_module._checkpoint_wrapped_module.{k}": v for k, v in sd.items()}
    wrapped = {k.replace("blocks.", "_orig_mod.blocks."): v for k, v in wrapped.items()}
    assert strip_prefixes(wrapped).keys() == sd.keys()


def test_load_wan_folder_with_self_forcing_checkpoint(tmp_path, sd):
    cfg = preset("tiny")
    save_wan_folder(tmp_path / "wan", cfg, sd)
    other = tiny_model(seed=5).state_dict()
    save_self_forcing(tmp_path / "sf.pt", generator=sd, generator_ema=other)
    base = load_wan(tmp_path / "wan")
    ema = load_wan(tmp_path / "wan", checkpoint=tmp_path / "sf.pt", use_ema=True)
    assert torch.equal(base.state_dict()["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.weight"])
    assert torch.equal(ema.state_dict()["blocks.0.self_attn.q.weight"], other["blocks.0.self_attn.q.weight"])
    assert base.causal and ema.config == cfg


def test_sharded_wan_folder(tmp_path, sd):
    cfg = preset("tiny")
    save_wan_folder(tmp_path / "wan", cfg, sd, shard_size=10)
    assert len(list((tmp_path / "wan").glob("*.safetensors"))) > 2
    config, loaded = read_wan_folder(tmp_path / "wan")
    assert config == cfg and loaded.keys() == sd.keys()


def test_meta_build_has_no_random_init(sd):
    model = build_model(preset("tiny"), sd)
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key])


def test_wrong_keys_and_shapes_are_listed(sd):
    bad = dict(sd)
    bad.pop("blocks.1.ffn.0.weight")
    bad["blocks.0.extra"] = torch.zeros(1)
    bad["head.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        build_model(preset("tiny"), bad, source="test.pt")
    msg = str(err.value)
    assert "missing: blocks.1.ffn.0.weight" in msg and "unexpected: blocks.0.extra" in msg
    assert "head.head.weight: (3, 3) != (64, 64)" in msg and "test.pt" in msg


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_weights_holding_nan_are_named_at_load(sd, device, dtype):
    """A checkpoint of NaN ran a whole rollout before 'video contains NaN or infinite values', naming no file."""
    bad = dict(sd)
    bad["blocks.1.ffn.0.weight"] = bad["blocks.1.ffn.0.weight"].clone().index_fill_(0, torch.tensor([2]), float("nan"))
    bad["head.head.bias"] = torch.full_like(bad["head.head.bias"], float("inf"))
    with pytest.raises(CheckpointError, match=r"test.pt\['generator'\] holds NaN or infinite values in 2 of its "
                                              r"tensors \(blocks.1.ffn.0.weight, head.head.bias\)"):
        build_model(preset("tiny"), bad, source="test.pt['generator']", device=device, dtype=dtype)
    build_model(preset("tiny"), sd, device=device, dtype=dtype)  # (finite weights load)


def test_missing_files_and_keys(tmp_path, sd):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_self_forcing(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_wan_folder(tmp_path / "nowhere")
    save_self_forcing(tmp_path / "gen_only.pt", generator=sd)
    with pytest.raises(CheckpointError, match="no 'generator_ema' entry \\(a training run writes it in the "
                                              "checkpoints after step ema_start_step\\); it has \\['generator'\\]"):
        read_self_forcing(tmp_path / "gen_only.pt", "generator_ema")
    # a state dict alone, not under 'generator': the generator, as the researchers' trainers read generator_ckpt
    torch.save({f"model.{k}": v for k, v in sd.items()}, tmp_path / "bare.pt")
    got = read_self_forcing(tmp_path / "bare.pt")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(CheckpointError, match="is a bare state dict .*, read as the generator, with no "
                                              "'generator_ema' entry"):
        read_self_forcing(tmp_path / "bare.pt", "generator_ema")


class Evil:
    def __reduce__(self):
        return (print, ("this file ran code",))


class EvilSystem:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_pickled_code_is_refused_without_trust(tmp_path, sd):
    path = tmp_path / "evil.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}, "extra": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt' needs arbitrary unpickling, which can run code \(Unsupported "
                                              r"global: GLOBAL print .*\).*--trust-pickle"):
        read_self_forcing(path)
    torch.save({"generator": EvilSystem()}, tmp_path / "system.pt")  # (what it would run is named: it was torch's
    with pytest.raises(CheckpointError, match=r"can run code \(Trying to load unsupported GLOBAL posix.system"):
        read_self_forcing(tmp_path / "system.pt")  # paragraph on its defaults)
    assert read_self_forcing(path, trust_pickle=True).keys() == sd.keys()


def test_diffusers_key_map_both_ways(sd):
    diff = to_diffusers(sd)
    assert from_diffusers(diff).keys() == sd.keys()
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(**diffusers_kwargs(preset("tiny")))
    assert set(diff) == set(ref.state_dict())
    assert "blocks.0.norm2.weight" in diff and "blocks.0.norm3.weight" in sd  # the cross-attention norm swap


def diffusers_kwargs(cfg):
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=cfg.eps)


def test_forward_matches_diffusers_on_the_same_weights(sd):
    """Our bidirectional transformer equals diffusers' WanTransformer3DModel (float32), both load directions."""
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    cfg = preset("tiny")
    ours = build_model(cfg, sd, causal=False)
    ref = WanTransformer3DModel(**diffusers_kwargs(cfg)).eval()
    ref.load_state_dict(to_diffusers(sd), strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 5, 8, 6, generator=g)
    t = torch.tensor([937.5, 250.0])
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
        again = build_model(cfg, from_diffusers(ref.state_dict()))(x, t, ctx)  # diffusers -> ours
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, got)


def test_a_file_that_is_no_checkpoint_is_named_with_or_without_trust_pickle(tmp_path):
    """A text file (or a truncated one) as a checkpoint: one CheckpointError naming the file, never the advice to
    unpickle it and never a raw unpickling traceback; a real torch.save file still loads."""
    from models.files import load_tensors

    text = tmp_path / "g.pt"
    text.write_text("not a checkpoint")
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="g.pt' is not a PyTorch checkpoint"):
            load_tensors(text, trust_pickle=trust)
    good = tmp_path / "ok.pt"
    torch.save({"generator": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_tensors(good)["generator"]["w"], torch.ones(2))
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # a plain pickle
    assert torch.equal(load_tensors(tmp_path / "legacy.pt")["w"], torch.ones(2))
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[:100])  # a zip cut short: read as one, refused with a clear error
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_tensors(truncated)


def test_a_sharded_folder_is_identified_by_every_shard(tmp_path, sd):
    """The sha256 that names a Wan folder's weights (stores' checkpoint_sha256 and fingerprint) covers each shard
    of a sharded folder, not only its index: a changed shard is another model."""
    from safetensors.torch import load_file, save_file

    from models.wan.checkpoint import wan_weights_file, weights_sha256

    save_wan_folder(tmp_path / "wan", preset("tiny"), sd, shard_size=10)
    index = wan_weights_file(tmp_path / "wan")
    assert index.name == "diffusion_pytorch_model.safetensors.index.json"
    before = weights_sha256(index)
    shard = sorted((tmp_path / "wan").glob("*-of-*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard)
    assert weights_sha256(index) != before
    single = tmp_path / "one"
    save_wan_folder(single, preset("tiny"), sd)
    assert weights_sha256(wan_weights_file(single)) == sha256_file(single / "diffusion_pytorch_model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no DiT weights: neither diffusion_pytorch_model.safetensors nor"):
        wan_weights_file(tmp_path / "empty")


def test_a_diffusers_transformer_folder_loads_as_the_official_one(tmp_path, sd):
    """diffusers' transformer/ folder (WanTransformer3DModel's config.json, diffusers key names) gives the same
    config and weights as the official folder; an image-conditioned one and an i2v config are refused."""
    import json

    from safetensors.torch import save_file

    from models.wan.config import WanConfig

    cfg = preset("tiny")
    folder = tmp_path / "transformer"
    folder.mkdir()
    diffusers_config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0",
                        "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
                        "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
                        "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
                        "num_layers": cfg.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
                        "eps": cfg.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
                        "pos_embed_seq_len": None}
    (folder / "config.json").write_text(json.dumps(diffusers_config))
    save_file({k: v.contiguous() for k, v in to_diffusers(sd).items()}, folder / "diffusion_pytorch_model.safetensors")
    model = load_wan(folder, causal=False)
    assert model.config == cfg.replace(text_len=512)  # (diffusers keeps the text length in its pipeline: 512)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    (folder / "config.json").write_text(json.dumps(diffusers_config | {"image_dim": 1280, "added_kv_proj_dim": 64}))
    with pytest.raises(ValueError, match="image-conditioned Wan transformer"):
        read_wan_folder(folder)
    official = tmp_path / "i2v.json"
    official.write_text(json.dumps(cfg.to_json_dict() | {"model_type": "i2v"}))
    with pytest.raises(ValueError, match="model_type 'i2v': only Wan2.1's text-to-video DiT"):
        WanConfig.from_json(official)


def test_weights_of_another_size_say_so(sd):
    """Weights of a bigger model on the tiny config: the error gives both sizes, not only hundreds of keys."""
    big = tiny_model(dim=96, ffn_dim=192, num_heads=4, num_layers=3).state_dict()
    with pytest.raises(CheckpointError) as err:
        build_model(preset("tiny"), big, source="big.pt")
    c = preset("tiny")
    assert ("the weights are a model of 3 layers of width 96 (FFN 192), the "
            f"config.json it was built from says {c.num_layers} layers of width {c.dim}") in str(err.value)
    with pytest.raises(CheckpointError) as err:  # same size, a key missing: no size hint
        build_model(c, {k: v for k, v in sd.items() if k != "head.head.bias"}, source="x.pt")
    assert "the weights are a model of" not in str(err.value)
    with pytest.raises(CheckpointError) as err:  # one tensor of another shape: that tensor, not 'a model of width 7'
        build_model(c, sd | {"patch_embedding.weight": torch.zeros(7, 7)}, source="x.pt")
    assert "the weights are a model of" not in str(err.value) and "patch_embedding.weight: (7, 7)" in str(err.value)


def test_ddp_prefix_is_stripped_and_an_lfs_pointer_is_named(tmp_path, sd):
    from models.files import load_tensors

    assert strip_prefixes({f"module.model.{k}": v for k, v in sd.items()}).keys() == sd.keys()
    pointer = tmp_path / "diffusion_pytorch_model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 5678908928\n")
    with pytest.raises(CheckpointError, match="is a Git LFS pointer .* not the weights: fetch the file itself"):
        load_tensors(pointer)


def test_safetensors_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    """The safetensors library writes a header's metadata in a hash map's order, which changed between processes,
    so two generate runs of the same sample gave files of other sha256. `safetensors_bytes`: sorted keys, the
    same bytes for any insertion order, and a file the library reads back (tensors and metadata)."""
    from safetensors import safe_open

    from models.files import safetensors_bytes

    tensors = {"latents": torch.arange(24, dtype=torch.float32).view(2, 3, 4), "b": torch.ones(3, dtype=torch.int64)}
    meta = {f"key{i}": f"value {i} ü" for i in range(12)}
    a = safetensors_bytes(tensors, meta)
    b = safetensors_bytes(tensors, dict(reversed(list(meta.items()))))
    assert a == b
    header = int.from_bytes(a[:8], "little")
    assert header % 8 == 0 and a[8 + header - 1:8 + header] in (b"}", b" ")
    (tmp_path / "x.safetensors").write_bytes(a)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == meta
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_damaged_weights_files_are_named_before_any_work_or_at_load(tmp_path, sd):
    """`check_weights_file` (cheap, before any work): a truncated torch.save zip, a truncated safetensors file and
    a Git LFS pointer are named; whole files pass. `load_tensors` checks the zip's CRC-32s, which torch.load does
    not: a checkpoint with changed bytes loaded silently, with wrong weights."""
    import zipfile

    from safetensors.torch import save_file

    from models.files import check_weights_file, load_tensors

    pt, st = tmp_path / "sf.pt", tmp_path / "dit.safetensors"
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, pt)
    save_file(sd, str(st))
    for path in (pt, st):
        assert check_weights_file(path, "x") == path
    data = pt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:-100])
    (tmp_path / "lfs.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 5\n")
    for name, words in (("cut.pt", "is a truncated or damaged zip"), ("cut.safetensors", "is not a whole safetensors"),
                        ("lfs.pt", "is a Git LFS pointer")):
        with pytest.raises(CheckpointError, match=f"--checkpoint '.*{name}' {words}"):
            check_weights_file(tmp_path / name, "--checkpoint")
    with zipfile.ZipFile(pt) as z:  # flip bytes inside one tensor's record: the zip stays readable
        info = max(z.infolist(), key=lambda i: i.file_size)
    bad, h = bytearray(data), info.header_offset  # the record's data follows its local header (30 bytes, name, extra)
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    bad[start:start + 16] = bytes(b ^ 0xFF for b in bad[start:start + 16])
    (tmp_path / "bad.pt").write_bytes(bytes(bad))
    check_weights_file(tmp_path / "bad.pt", "x")  # (its structure is whole)
    with pytest.raises(CheckpointError, match=r"bad.pt' is corrupt: its record '.*' does not match the checksum"):
        load_tensors(tmp_path / "bad.pt")
    assert "generator" in load_tensors(pt)
    old = (tmp_path / "bad.pt").stat()
    shutil.copyfile(pt, tmp_path / "bad.pt")  # copied again, with the old file's mtime (`cp -p`, `rsync -a`):
    os.utime(tmp_path / "bad.pt", ns=(old.st_atime_ns, old.st_mtime_ns))  # read again, not "corrupt" from memory
    assert "generator" in load_tensors(tmp_path / "bad.pt")


def test_the_memo_of_file_hashes_sees_a_replaced_file_and_keeps_every_writers_keys(tmp_path):
    """The memo keyed files by (path, size, mtime): a file replaced with one of the same size and mtime (`cp -p`,
    `rsync -a`) kept its old sha256, and a store then took samples of other weights under it. Its file holding
    JSON that is no object (`null`) failed every run; processes updating it at once lost each other's keys."""
    import multiprocessing

    memo, weights = tmp_path / "memo", tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    stat = weights.stat()
    first = sha256_file(weights, memo)
    time.sleep(0.02)  # (kernels before Linux 6.13 move a ctime in ticks of 1-10 ms: the rewrite gets its own)
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # (same size, same mtime: another file)
    assert sha256_file(weights, memo) != first and sha256_file(weights, memo) == sha256_file(weights, None)
    (memo / "file_hashes.json").write_text("null")
    assert sha256_file(weights, memo) == sha256_file(weights, None)  # (and the file is an object again)
    assert isinstance(json.loads((memo / "file_hashes.json").read_text()), dict)
    files = [tmp_path / f"f{i}.bin" for i in range(24)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    with multiprocessing.get_context("spawn").Pool(3) as pool:  # (three writers at once, eight files each)
        pool.starmap(sha256_file, [(f, memo) for f in files])
    kept = json.loads((memo / "file_hashes.json").read_text())
    assert all(any(k.startswith(f"{os.path.realpath(f)}|") for k in kept) for f in files)
