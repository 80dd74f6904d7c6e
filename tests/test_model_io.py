"""Model files: save/load round trips, architecture mismatches, diffusers folders, weights-only loading."""
import dataclasses
import os
import pickle
import sys

import pytest
import torch

from ppo_ddpm.config import ModelConfig
from ppo_ddpm.ddpm.diffusers_unet import DiffusersUNet, import_unet2d
from ppo_ddpm.ddpm.model import build_model, load_model, save_model
from ppo_ddpm.ddpm.unet import UNet
from ppo_ddpm.utils.checkpoint import CheckpointError, atomic_save, load_safetensors, safe_load, save_safetensors

CFG = ModelConfig(sample_size=8, base_channels=8, channel_mults=[1, 2], attention_resolutions=[4], num_classes=2)


def _inputs(B=2, S=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, S, S, generator=g), torch.tensor([3, 700][:B]), torch.tensor([1, 0][:B])


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    model = build_model(CFG)
    path = save_model(model, tmp_path / f"ddpm.{fmt}", CFG)
    assert path == tmp_path / f"ddpm.{fmt}"
    if fmt == "safetensors":
        assert (tmp_path / "ddpm.json").is_file()
    x, t, y = _inputs()
    want = model(x, t, y)
    for loaded in (load_model(path), load_model(path, CFG), build_model(dataclasses.replace(CFG, pretrained=str(path)))):
        assert isinstance(loaded, UNet)
        assert torch.equal(loaded(x, t, y), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ddpm.pth"] if fmt == "pth" else ["ddpm.json", "ddpm.safetensors"])


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_architecture_mismatch_names_file_and_keys(tmp_path, fmt):
    path = save_model(build_model(CFG), tmp_path / f"small.{fmt}", CFG)
    wider = dataclasses.replace(CFG, base_channels=16)
    with pytest.raises(CheckpointError) as e:
        load_model(path, wider)
    msg = str(e.value)
    assert str(path) in msg and "model.base_channels: file 8 vs config 16" in msg
    assert "conv_in.weight: file (8, 3, 3, 3) vs model (16, 3, 3, 3)" in msg
    # same tensor shapes, different architecture field
    with pytest.raises(CheckpointError, match="model.sample_size: file 8 vs config 16"):
        load_model(path, dataclasses.replace(CFG, sample_size=16, attention_resolutions=[8]))
    # missing keys: one more ResBlock per level
    with pytest.raises(CheckpointError, match="missing keys: .*down.0.blocks.1"):
        load_model(path, dataclasses.replace(CFG, num_res_blocks=2))


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="model.pretrained"):
        build_model(dataclasses.replace(CFG, pretrained=str(tmp_path / "nope.pth")))
    with pytest.raises(CheckpointError, match="diffusers UNet2DModel"):
        load_model(tmp_path)  # a folder without config.json
    with pytest.raises(ValueError, match=r"\.pth or \.safetensors"):
        save_model(build_model(CFG), tmp_path / "m.bin", CFG)
    atomic_save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="other.pth.*state_dict"):
        load_model(tmp_path / "other.pth")


def _tiny_unet2d(num_class_embeds=None):
    UNet2DModel = import_unet2d()
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    ).eval()


@pytest.mark.parametrize("num_classes", [0, 2])
def test_diffusers_folder_loads_and_matches(tmp_path, num_classes):
    pytest.importorskip("diffusers")
    ref = _tiny_unet2d(num_classes or None)
    folder = tmp_path / "unet"
    ref.save_pretrained(folder)
    x, t, y = _inputs()
    y = y if num_classes else None
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        cfg = dataclasses.replace(CFG, num_classes=num_classes, pretrained=str(folder))
        for model in (load_model(folder), build_model(cfg)):
            assert isinstance(model, DiffusersUNet)
            assert (model.sample_size, model.in_channels, model.num_classes) == (8, 3, num_classes)
            torch.testing.assert_close(model.eval()(x, t, y), want, atol=0, rtol=0)
        # a (fine-tuned) wrapped diffusers model saves to .pth and loads back as the same UNet2DModel
        path = save_model(model, tmp_path / "ft.pth", cfg)
        torch.testing.assert_close(load_model(path).eval()(x, t, y), want, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="model.sample_size: file 8 vs config 16"):
        load_model(folder, dataclasses.replace(cfg, sample_size=16))


def test_missing_diffusers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"\[diffusers\]"):
        import_unet2d()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": {"w": torch.zeros(1)}, "config": _Payload(marker)}
    if writer == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match="only weights") as e:
        safe_load(path)
    assert "evil.pth" in str(e.value)
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()
    # control: an unrestricted load does run the payload
    torch.load(path, weights_only=False) if writer == "torch" else pickle.loads(path.read_bytes())
    assert marker.exists()


def test_atomic_save_leaves_only_the_file(tmp_path):
    path = tmp_path / "ck.pth"
    obj = {"a": torch.arange(5), "b": [1, 2.5, None, "x", (True, torch.float16)], "c": {"d": torch.Size([2])}}
    atomic_save(obj, path)
    atomic_save({**obj, "a": torch.arange(6)}, path)  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]
    back = safe_load(path)
    assert torch.equal(back["a"], torch.arange(6)) and back["b"] == obj["b"] and back["c"] == obj["c"]


def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    atomic_save({"v": torch.ones(3)}, path)
    with pytest.raises(TypeError, match=r"obj\['bad'\] is a _Payload"):
        atomic_save({"bad": _Payload(tmp_path / "x")}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.zeros(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]
    assert torch.equal(safe_load(path)["v"], torch.ones(3))


def test_truncated_or_corrupt_files_raise_checkpoint_error(tmp_path):
    good = atomic_save({"state_dict": {"w": torch.randn(64, 64)}}, tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint at all")
    for name in ("trunc.pth", "junk.pth"):
        with pytest.raises(CheckpointError, match=name):
            safe_load(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "missing.pth")

    st = save_safetensors({"w": torch.randn(64, 64)}, tmp_path / "good.safetensors", {"k": "v"})
    tensors, meta = load_safetensors(st)
    assert tensors["w"].shape == (64, 64) and meta == {"k": "v"}
    (tmp_path / "trunc.safetensors").write_bytes(st.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_safetensors(tmp_path / "trunc.safetensors")
