"""One normalisation for every picture: upright, on white, 8-bit, decoded reduced when large, the same
for prepare, predict and the served model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from classifier import config
from classifier.data import cleaning, pictures

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    """A picture whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """A 60x40 JPEG, red on the left and blue on the right, whose EXIF says to rotate it to display it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    halves((60, 40), RED, BLUE).save(path, "JPEG", quality=95, exif=exif)
    return path


def transparent_png(path: Path) -> Path:
    """A 40x30 PNG: the left half fully transparent (black as stored), the right half opaque green."""
    halves((40, 30), (0, 0, 0, 0), (*GREEN, 255), "RGBA").save(path, "PNG")
    return path


def near(pixel: tuple[int, ...], colour: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, RED, BLUE), (8, BLUE, RED)])
def test_an_exif_rotated_photo_is_turned_upright(tmp_path, orientation, top, bottom):
    """Orientation 6 (rotate 90° clockwise to display) puts the left half on top; 8 puts it below."""
    image = pictures.normalise(rotated_jpeg(tmp_path / "phone.jpg", orientation), max_side=100)
    assert image.mode == "RGB" and image.size == (40, 60), "portrait, as the phone showed it"
    assert near(image.getpixel((20, 10)), top) and near(image.getpixel((20, 50)), bottom)


def test_transparency_becomes_white_not_black(tmp_path):
    image = pictures.normalise(transparent_png(tmp_path / "logo.png"), max_side=100)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((5, 15)) == (255, 255, 255)
    assert image.getpixel((35, 15)) == GREEN


@pytest.mark.parametrize("size", [(60, 30), (1200, 600)], ids=["as is", "decoded reduced"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, size):
    """0, 30000 and 65535 of 65535 become 0, about 117 and 255 of 255 (convert("RGB") made them 0, 255, 255)."""
    width, height = size
    values = np.zeros((height, width), dtype=np.uint16)
    values[:, width // 3 : 2 * width // 3] = 30000
    values[:, 2 * width // 3 :] = 65535
    Image.fromarray(values).save(tmp_path / "scan.png")
    with Image.open(tmp_path / "scan.png") as opened:
        assert opened.mode == "I;16"
    image = pictures.normalise(tmp_path / "scan.png", max_side=60)
    assert image.mode == "RGB" and max(image.size) == 60
    row = np.asarray(image)[image.height // 2, :, 0]
    third = image.width // 3
    assert row[third // 2] == 0
    assert abs(int(row[third + third // 2]) - 117) <= 1
    assert row[-third // 2] == 255


def test_a_large_jpeg_is_decoded_reduced_by_the_decoder(tmp_path, monkeypatch):
    """A 4000x3000 photo for max_side 500: the JPEG decoder scales the DCT by 1/4 (Image.draft), so
    the 12-megapixel picture is never in memory; then LANCZOS takes it to 500x375."""
    ramp = np.linspace(0, 255, 4000, dtype=np.float32)
    pixels = np.stack([np.broadcast_to(ramp, (3000, 4000))] * 3, axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    drafts = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(draft(self, mode, size))
        return drafts[-1]

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)

    decoded = pictures.decode(tmp_path / "big.jpg", max_side=500)
    assert decoded.original_size == (4000, 3000)
    assert drafts == [("RGB", (0, 0, 1000, 750))], "the decoder scaled the DCT by 1/4"
    assert decoded.image.size == (1000, 750), "decoded at a quarter: no 4000x3000 image was made"
    image = pictures.normalise(tmp_path / "big.jpg", max_side=500)
    assert image.size == (500, 375)
    assert abs(int(image.getpixel((250, 200))[0]) - 128) <= 3, "the same picture, only smaller"


def test_a_large_transparent_png_is_reduced_before_compositing(tmp_path):
    """A 3000x2000 RGBA PNG for max_side 250 is reduced by 12 right after loading. Transparency is
    averaged premultiplied: a block half transparent black, half red comes out light red on white,
    not dark red (which averaging the stored black would give)."""
    image = Image.new("RGBA", (3000, 2000), (0, 0, 0, 0))
    image.paste((*RED, 255), (1506, 0, 3000, 2000))  # the block of columns 1500..1511 is half red
    image.save(tmp_path / "big.png", compress_level=1)
    decoded = pictures.decode(tmp_path / "big.png", max_side=250)
    assert decoded.original_size == (3000, 2000)
    assert decoded.image.size == (250, 167), "reduced by 12 before anything else: no full-size copy"
    assert decoded.image.getpixel((10, 80)) == (255, 255, 255)
    assert decoded.image.getpixel((200, 80)) == RED
    assert near(decoded.image.getpixel((125, 80)), (255, 128, 128), 2)


def test_too_small_is_judged_on_the_size_in_the_file(tmp_path):
    """A 2000x40 banner decodes reduced to 500x10, yet is kept with min_side 32; 2000x20 is dropped."""
    params = config.parse({"data": {"image_size": 32, "min_side": 32, "max_side": 500}}).data
    raw, staging = tmp_path / "raw", tmp_path / "staging"
    (raw / "c").mkdir(parents=True)
    staging.mkdir()
    Image.new("RGB", (2000, 40), GREEN).save(raw / "c" / "banner.png")
    Image.new("RGB", (2000, 20), GREEN).save(raw / "c" / "thin.png")
    kept = cleaning.clean_file(raw / "c" / "banner.png", "c", raw, staging, params)
    assert kept.reason is None
    with Image.open(staging / f"{kept.sha256}.jpg") as written:
        assert written.size == (500, 10)
    assert cleaning.clean_file(raw / "c" / "thin.png", "c", raw, staging, params).reason == "too_small"


def test_files_that_are_no_picture_say_why(tmp_path):
    with pytest.raises(pictures.Unusable, match="the file is empty") as empty:
        pictures.decode(b"", max_side=100)
    with pytest.raises(pictures.Unusable, match="not a picture in a format read here") as text:
        pictures.decode(b"not a picture at all", max_side=100)
    assert (empty.value.reason, text.value.reason) == ("empty", "not_an_image")


#: How far apart the scores of evaluate, predict and the served model may be, by the precision all
#: three compute in: float32 gives the same bits; bfloat16 (native on some CPUs, emulated elsewhere)
#: keeps 8 bits of mantissa, and a batch of another size may round otherwise.
AGREE = {"float32": 1e-6, "bfloat16": 1e-2}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_prepare_predict_and_the_served_model_give_a_picture_the_same_input(tmp_path, monkeypatch, capsys, precision):
    """The EXIF-rotated photo and the transparent PNG reach the model identically through prepare's
    JPEG read by evaluate's pipeline, `images.model_input` (predict) and the served pyfunc model,
    where decoding the raw bytes (what predict and the served model did) gives another input; and
    predict and the served model decide with the threshold, as evaluate does, all three computing in
    the `precision` forced here (so on any CPU, whatever `auto` would pick)."""
    import keras
    import pandas as pd
    import yaml

    from classifier import inference
    from classifier.metrics import scores
    from classifier.model import devices, images
    from ops import predict
    from ops.serving import pyfunc, registry

    params = config.parse({"data": {"image_size": [32, 32], "min_side": 16, "max_side": 48}}).data
    raw, staging = tmp_path / "raw", tmp_path / "staging"
    (raw / "c").mkdir(parents=True)
    staging.mkdir()
    sources = [rotated_jpeg(raw / "c" / "phone.jpg"), transparent_png(raw / "c" / "logo.png")]

    prepared = []
    for path in sources:
        cleaned = cleaning.clean_file(path, "c", raw, staging, params)
        prepared.append(staging / f"{cleaned.sha256}.jpg")
        assert prepared[-1].read_bytes() == pictures.normalised_jpeg(path.read_bytes(), params.max_side)
    read_by_evaluate = [images.decode_tf(str(path), params.image_size).numpy() for path in prepared]
    for path, expected in zip(sources, read_by_evaluate, strict=True):
        given = images.model_input(path.read_bytes(), params.image_size, params.max_side)
        assert given.dtype == np.float32 and given.shape == (32, 32, 3)
        np.testing.assert_array_equal(given, expected)
        raw_decode = images.decode_bytes(path.read_bytes(), params.image_size).numpy()
        assert np.abs(raw_decode - expected).max() > 100, "sideways or black: not what the model was measured on"

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.save(tmp_path / "model.keras")
    spec = registry.model_spec(["cat", "dog"], 0.5, params.max_side, precision)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    served = pyfunc.ImageClassifier()
    served.load_context(SimpleNamespace(artifacts={"model": tmp_path / "model.keras", "spec": tmp_path / "spec.json"}))
    out = served.predict(None, pd.DataFrame({"image": [path.read_bytes() for path in sources]}))

    computing = devices.computing_in(model, devices.precision_policy(precision))  # as evaluate's main does
    scored = inference.class_probabilities(computing, [str(p) for p in prepared], params.image_size, 2)
    np.testing.assert_allclose(out[["p.cat", "p.dog"]].to_numpy(), scored, rtol=0, atol=AGREE[precision])
    assert list(out["label"]) == [["cat", "dog"][i] for i in scores.predicted_classes(scored, 0.5)]
    assert abs(scored[0, 1] - scored[1, 1]) > 1e-4, "the model tells the two pictures apart"
    exact = inference.class_probabilities(model, [str(p) for p in prepared], params.image_size, 2)
    assert (precision == "float32") == np.array_equal(scored, exact), "it computed in the precision asked for"

    # predict, with a threshold that decides the less likely class for the photo: printed first.
    dog = scored[0, 1]
    threshold = float(dog / 2 if dog < 0.5 else (dog + 1) / 2)
    written = {"precision": precision, "data": {"image_size": [32, 32], "max_side": 48, "min_side": 16}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(written))
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
    args = ["--model", "model.keras", "--classes", "classes.json", "--threshold", str(threshold), "--top", "2"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["predict", *map(str, sources), *args])
    predict.main()
    decided = scores.predicted_classes(scored, threshold)
    assert decided[0] != scored[0].argmax()
    names = ["cat", "dog"]
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in printed] == [str(path) for path in sources]
    for i, (line, d) in enumerate(zip(printed, decided, strict=True)):
        shown = [part.split(" ") for part in line.split(": ", 1)[1].split(", ")]
        assert [name for name, _ in shown] == [names[d], names[1 - d]]
        said = np.array([float(p) for _, p in shown])
        np.testing.assert_allclose(said, [scored[i, d], scored[i, 1 - d]], rtol=0, atol=5e-4 + AGREE[precision])


def test_normalising_a_prepared_picture_again_changes_nothing(tmp_path):
    """A prepared picture sent to predict or the served model reaches the model as evaluate read it."""
    for source in (rotated_jpeg(tmp_path / "phone.jpg", 6), transparent_png(tmp_path / "logo.png")):
        once = pictures.normalised_jpeg(source, max_side=100)
        assert pictures.normalised_jpeg(once, max_side=100) == once
    small = pictures.jpeg_bytes(Image.new("RGB", (80, 50), (10, 200, 30)))
    assert pictures.normalised_jpeg(small, max_side=100) == small, "already as prepare writes it: kept as it is"
    assert pictures.normalised_jpeg(small, max_side=60) != small, "too large: shrunk and re-encoded"


def test_the_pixel_limit_holds_for_every_thread_decoding_at_once(tmp_path):
    """The served model decodes requests in threads: a picture over `max_pixels` is refused in every
    one of them, from its header, however the threads interleave (each with its own limit)."""
    import concurrent.futures

    over = pictures.jpeg_bytes(Image.new("RGB", (3000, 2000), (10, 20, 30)))  # 6 MP
    small = pictures.jpeg_bytes(Image.new("RGB", (64, 64), (10, 20, 30)))

    def attempt(i: int) -> str:
        data, limit = (over, 5_000_000) if i % 2 == 0 else (small, 100_000_000)
        try:
            pictures.decode(data, max_side=64, max_pixels=limit)
        except pictures.Unusable as err:
            return err.reason
        return "decoded"

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns every few bytecodes: every interleaving is tried
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(attempt, range(400)))
    finally:
        sys.setswitchinterval(switch)
    assert outcomes[0::2] == ["decompression_bomb"] * 200
    assert outcomes[1::2] == ["decoded"] * 200
    with pytest.raises(pictures.Unusable, match=r"3000x2000 = 6000000 pixels, over 5000000"):
        pictures.decode(over, max_side=64, max_pixels=5_000_000)


@pytest.mark.parametrize("kind", ["ICO", "PPM", "TGA", "PCX", "SGI", "IM"])
def test_formats_outside_the_documented_ones_are_never_decoded(tmp_path, kind):
    """Pillow reads dozens of formats; each of its other decoders is code a picture from anywhere
    could reach (an ICO can hide a huge PNG behind a small header): they are refused unread."""
    from PIL import Image

    path = tmp_path / f"picture.{kind.lower()}"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path, format=kind)
    with pytest.raises(pictures.Unusable, match=r"not a picture in a format read here \(JPEG, PNG, GIF, BMP, WebP"):
        pictures.decode(path, 64)
    assert pictures.header_size(path.read_bytes()) is None


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_the_documented_formats_are_decoded(tmp_path, kind):
    from PIL import Image

    path = tmp_path / f"picture.{kind.lower()}"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path, format=kind)
    assert pictures.decode(path, 64).original_size == (40, 30)
    assert pictures.header_size(path.read_bytes()) == (40, 30)
