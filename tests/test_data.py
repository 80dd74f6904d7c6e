"""Image folders: bad input named, modes and sizes normalised, values checked by hand."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ppo_ddpm.data import (
    DataError,
    load_image,
    load_images,
    make_procedural_dataset,
    procedural_images,
    save_grid,
    save_images,
)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_missing_folder_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_images(missing, 8)


def test_folder_is_a_file_named(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load_images(f, 8)


def test_empty_folder_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images .* in folder .*empty"):
        load_images(tmp_path / "empty", 8)


def test_folder_with_only_non_images_is_empty(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("hi")
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="no images"):
        load_images(tmp_path, 8)
    assert f"skipped 1 non-image files in {tmp_path}" in caplog.text


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_corrupt_image_names_the_file(tmp_path, content):
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "a_ok.png")
    bad = tmp_path / "b_bad.png"
    if content is None:  # a truncated real PNG
        Image.fromarray(_rgb(32, 32)).save(bad)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match="corrupt or unreadable image: .*b_bad.png"):
        load_images(tmp_path, 4)


def test_non_image_files_skipped_and_counted(tmp_path, caplog):
    for i in range(2):
        Image.fromarray(_rgb(4, 4, i)).save(tmp_path / f"img{i}.png")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "labels.csv").write_text("a,b")
    (tmp_path / "model.pt").write_bytes(b"\0")
    (tmp_path / "sub").mkdir()  # folders are neither loaded nor counted
    with caplog.at_level(logging.WARNING, logger="ppo_ddpm.data.images"):
        x = load_images(tmp_path, 4)
    assert x.shape == (2, 3, 4, 4)
    assert f"skipped 3 non-image files in {tmp_path}" in caplog.text


def test_known_tiny_image_by_hand(tmp_path):
    pixels = np.array([[[0, 128, 255], [10, 20, 30]], [[255, 255, 255], [1, 2, 3]]], np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "t.png")
    x = load_images(tmp_path, 2)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 2, 2)
    expected = torch.tensor(pixels, dtype=torch.float64).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(x[0].double(), expected, rtol=0, atol=1e-6)
    # 8-bit images survive load -> save exactly
    save_images(x, tmp_path / "out", "r")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "r_00000.png")), pixels)


def test_modes_converted_by_hand(tmp_path):
    grey = np.array([[0, 51], [102, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "a_L.png")
    rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0]], [[0, 0, 255, 128], [10, 20, 30, 51]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b_RGBA.png")
    g16 = np.array([[0, 1000], [30000, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "c_16bit.png")
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "d_P.png")
    la = np.stack([grey, np.full_like(grey, 255)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "e_LA.png")
    assert Image.open(tmp_path / "c_16bit.png").mode.startswith("I")

    x = load_images(tmp_path, 2).double()
    assert x.shape == (5, 3, 2, 2)

    def to_x(v01):  # [H, W, 3] in [0, 1] -> [3, H, W] in [-1, 1]
        return torch.as_tensor(v01, dtype=torch.float64).permute(2, 0, 1) * 2 - 1

    tol = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(x[0], to_x(np.repeat(grey[..., None], 3, 2) / 255.0), **tol)
    a = rgba[..., 3:] / 255.0
    torch.testing.assert_close(x[1], to_x(rgba[..., :3] / 255.0 * a + (1 - a)), **tol)
    torch.testing.assert_close(x[2], to_x(np.repeat(g16[..., None], 3, 2) / 65535.0), **tol)
    rgb = np.array([[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [0, 1, 0]]], np.float64)
    torch.testing.assert_close(x[3], to_x(rgb), **tol)
    torch.testing.assert_close(x[4], x[0], **tol)


def test_cmyk_jpeg_and_other_formats(tmp_path):
    Image.fromarray(_rgb(6, 6)).convert("CMYK").save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(_rgb(6, 6)).save(tmp_path / "b.BMP")
    Image.fromarray(_rgb(6, 6)).save(tmp_path / "c.webp", lossless=True)
    Image.fromarray(_rgb(6, 6)).save(tmp_path / "d.jpeg")
    x = load_images(tmp_path, 6)
    assert x.shape == (4, 3, 6, 6)
    assert x.min() >= -1 and x.max() <= 1
    # lossless webp and bmp are exact
    exact = torch.tensor(_rgb(6, 6), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(x[1], exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(x[2], exact, rtol=0, atol=1e-6)


def test_mixed_sizes_center_crop_then_bicubic(tmp_path):
    wide = _rgb(8, 12, 1)  # H=8, W=12: crop columns 2..9, then 8 -> 4
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    Image.fromarray(_rgb(3, 3, 2)).save(tmp_path / "b_small.png")  # upsampled 3 -> 4
    Image.fromarray(_rgb(4, 4, 3)).save(tmp_path / "c_exact.png")
    x = load_images(tmp_path, 4).double()
    assert x.shape == (3, 3, 4, 4)
    assert x.min() >= -1 and x.max() <= 1
    crop = torch.tensor(wide[:, 2:10], dtype=torch.float64).permute(2, 0, 1)[None] / 255.0
    ref = F.interpolate(crop, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(x[0], ref.clamp(0, 1) * 2 - 1, rtol=0, atol=1e-6)
    # the crop is the centre: the black side bands of a 8x16 image are cut away exactly
    block = np.kron(np.array([[0, 255], [255, 0]], np.uint8), np.ones((4, 4), np.uint8))
    framed = np.zeros((8, 16), np.uint8)
    framed[:, 4:12] = block
    Image.fromarray(framed, "L").save(tmp_path / "d_framed.png")
    y = load_image(tmp_path / "d_framed.png", 8)
    torch.testing.assert_close(y[0], torch.tensor(block, dtype=torch.float32) / 127.5 - 1, rtol=0, atol=1e-6)


def test_save_grid_layout(tmp_path):
    x = torch.linspace(-1, 1, 5)[:, None, None, None].expand(5, 3, 2, 3)
    path = save_grid(x, tmp_path / "g" / "grid.png", nrow=2, padding=1)
    g = np.asarray(Image.open(path))
    assert g.shape == (3 * 3 + 1, 2 * 4 + 1, 3)
    expected = np.round((np.linspace(-1, 1, 5) + 1) * 127.5).astype(np.uint8)
    for i, v in enumerate(expected):
        r, c = divmod(i, 2)
        assert (g[1 + r * 3 : 3 + r * 3, 1 + c * 4 : 4 + c * 4] == v).all()
    assert (g[0] == 0).all()
    with pytest.raises(DataError, match=r"shape \(3, 2, 3\)"):
        save_grid(x[0], tmp_path / "bad.png")


def test_procedural_dataset_deterministic_and_idempotent(tmp_path):
    a = make_procedural_dataset(tmp_path / "a", 12, 16, seed=3)
    b = make_procedural_dataset(tmp_path / "b", 12, 16, seed=3)
    c = make_procedural_dataset(tmp_path / "c", 12, 16, seed=4)
    xa, xb, xc = (load_images(d / "real", 16) for d in (a, b, c))
    assert xa.shape == (12, 3, 16, 16)
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    torch.testing.assert_close(xa, procedural_images(12, 16, 3), rtol=0, atol=0.5 / 127.5 + 1e-6)
    # the images are not trivial: varied, saturated foreground on a plain background
    assert xa.std(dim=(1, 2, 3)).min() > 0.05
    assert not torch.equal(xa[0], xa[1])

    first = (a / "real" / "real_00000.png").stat().st_mtime_ns
    make_procedural_dataset(a, 12, 16, seed=3)  # same request: nothing rewritten
    assert (a / "real" / "real_00000.png").stat().st_mtime_ns == first
    make_procedural_dataset(a, 5, 16, seed=4)  # different request: old set replaced
    assert torch.equal(load_images(a / "real", 16), xc[:5])
