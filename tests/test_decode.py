"""The DALI decode stage: order, exactly-once, seeded views, image kinds and bad files."""

import numpy as np
import pytest
import torch
from conftest import encode
from PIL import Image

from stages.backbones import Preprocessing
from stages.decode import Augmentation, ImageDecoder, view_params
from stages.files import BadImage, vet_image_bytes

PP = Preprocessing(size=32, resize=36, mean=(127.5,) * 3, std=(127.5,) * 3)


def picture(seed: int, size=(64, 48)) -> Image.Image:
    """A blocky image with few colours, so lossless formats and palettes hold it exactly."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, size=(size[1] // 8, size[0] // 8, 3)) * 80
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8))


def items_of(blobs: dict[str, bytes]):
    def loader(data: bytes):
        def load():
            vet_image_bytes(data)
            return np.frombuffer(data, np.uint8)

        return load

    return [(key, loader(data)) for key, data in blobs.items()]


def decode_all(blobs: dict[str, bytes], **kwargs):
    decoder = ImageDecoder(PP, **kwargs)
    keys, images, failed = [], [], []
    for batch in decoder.decode(items_of(blobs)):
        keys += batch.keys
        images.append(batch.images)
        failed += batch.failed
    return keys, torch.cat(images), dict(failed)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 11, 64])
def test_every_image_once_in_order(batch_size):
    blobs = {f"k{i:02d}": encode(picture(i), "PNG") for i in range(11)}
    keys, images, failed = decode_all(blobs, batch_size=batch_size)
    assert keys == list(blobs) and not failed
    assert images.shape == (11, 1, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_views_are_seeded_per_image_not_per_batch():
    blobs = {f"k{i}": encode(picture(i), "PNG") for i in range(7)}
    _, a, _ = decode_all(blobs, batch_size=3, views=3, seed=5)
    _, b, _ = decode_all(blobs, batch_size=7, views=3, seed=5)
    _, c, _ = decode_all(blobs, batch_size=7, views=3, seed=6)
    _, plain, _ = decode_all(blobs, batch_size=2, views=0)
    assert a.shape == (7, 4, 3, 32, 32)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], plain[:, 0]) and torch.equal(c[:, 0], plain[:, 0])
    assert not torch.equal(a[:, 1:], c[:, 1:])
    assert not torch.equal(a[:, 1], a[:, 0])


def test_view_params_stay_inside_the_image():
    aug = Augmentation()
    for view in range(1, 50):
        anchor, shape, mirror = view_params(0, "x.jpg", view, aug)
        assert (anchor >= 0).all() and (anchor + shape <= 1 + 1e-6).all() and mirror in (0, 1)
        assert aug.scale[0] - 1e-6 <= shape[0] * shape[1] <= 1 + 1e-6


def test_image_kinds_come_out_as_the_right_rgb():
    rgb = picture(1)
    gray = rgb.convert("L")
    gray16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    blobs = {
        "rgb": encode(rgb, "PNG"),
        "palette": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "rgba": encode(rgb.convert("RGBA"), "PNG"),
        "gray": encode(gray.convert("RGB"), "PNG"),
        "gray_png": encode(gray, "PNG"),
        "gray_alpha": encode(gray.convert("LA"), "PNG"),
        "gray16": encode(gray16, "PNG"),
        "rgb_jpeg": encode(rgb, "JPEG", quality=98, subsampling=0),
        "cmyk_jpeg": encode(rgb.convert("CMYK"), "JPEG", quality=98, subsampling=0),
        "gray_jpeg": encode(gray, "JPEG", quality=98, subsampling=0),
        "rotated": encode(rgb.transpose(Image.Transpose.ROTATE_270), "PNG"),
        "exif_jpeg": encode(rgb, "JPEG", quality=98, subsampling=0, exif=exif.tobytes()),
    }
    keys, images, failed = decode_all(blobs, batch_size=5)
    assert not failed
    out = dict(zip(keys, images[:, 0]))
    for lossless in ("palette", "rgba"):
        assert torch.equal(out[lossless], out["rgb"]), lossless
    for lossless in ("gray_png", "gray_alpha", "gray16"):
        assert torch.equal(out[lossless], out["gray"]), lossless
    for lossy, reference in (
        ("rgb_jpeg", "rgb"),
        ("cmyk_jpeg", "rgb"),
        ("gray_jpeg", "gray"),
        ("exif_jpeg", "rotated"),
    ):
        assert (out[lossy] - out[reference]).abs().mean() < 0.05, lossy
    assert (out["exif_jpeg"] - out["rgb"]).abs().mean() > 0.2  # orientation really was applied


def test_bad_files_are_reported_and_cost_their_batch_mates_nothing():
    good = {f"good{i}": encode(picture(i), "JPEG", quality=95) for i in range(6)}
    jpeg = good["good0"]
    bad = {
        "zero": b"",
        "text": b"this is not an image",
        "truncated": jpeg[: len(jpeg) * 2 // 3],
        "garbled": jpeg[:200] + bytes(len(jpeg) - 200),
    }
    blobs = {}
    for i, key in enumerate(good):
        blobs[key] = good[key]
        if i < len(bad):
            name = list(bad)[i]
            blobs[name] = bad[name]
    keys, images, failed = decode_all(blobs, batch_size=3)
    assert keys == list(good)
    assert set(failed) == set(bad)
    assert "empty" in failed["zero"] and "not an image" in failed["text"]
    assert "cannot decode" in failed["truncated"] and "cannot decode" in failed["garbled"]
    _, clean, _ = decode_all(good, batch_size=3)
    assert torch.equal(images, clean)


def test_loader_errors_become_failures():
    def broken():
        raise BadImage("cannot read: Permission denied")

    decoder = ImageDecoder(PP, batch_size=2)
    batches = list(decoder.decode([("a", broken), ("b", lambda: np.frombuffer(encode(picture(0), "PNG"), np.uint8))]))
    assert [b.keys for b in batches] == [["b"]] and batches[0].failed == [("a", "cannot read: Permission denied")]


def test_the_interpolation_is_the_preprocessings_and_part_of_its_identity():
    """Bicubic and bilinear resize the same photo differently; a set records bicubic, and bilinear (what every set
    was made with before it was recorded) is left out of its identity, so older sets keep their names."""
    from dataclasses import replace

    blob = {"p": encode(picture(3, (90, 70)), "PNG")}
    crops = {}
    for interpolation in ("bilinear", "bicubic"):
        decoder = ImageDecoder(replace(PP, interpolation=interpolation))
        [batch] = list(decoder.decode(items_of(blob)))
        crops[interpolation] = batch.images[0, 0]
    difference = (crops["bilinear"] - crops["bicubic"]).abs()
    assert difference.max() > 0.01 and difference.mean() < 0.1  # the same photo, resampled otherwise
    assert "interpolation" not in PP.to_dict() and Preprocessing.from_dict(PP.to_dict()) == PP
    bicubic = replace(PP, interpolation="bicubic")
    assert bicubic.to_dict()["interpolation"] == "bicubic" and Preprocessing.from_dict(bicubic.to_dict()) == bicubic
    with pytest.raises(Exception, match="interpolation 'nearest' is not one of bilinear, bicubic"):
        Preprocessing.from_crop_pct(32, 0.875, PP.mean, PP.std, "nearest")
