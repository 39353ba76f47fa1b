"""Encoded picture in, normalised picture out: the one definition of the pictures the model sees.

`prepare` writes every kept picture of the data set through here, and `images.model_input` (used by
`predict` and the served MLflow model) sends every new picture through here too. So a picture is
turned upright, flattened on white, sized and re-encoded the same way whether it is scored by
`evaluate` or sent to the model in production.

Normalising is: open (with the decompression-bomb guard), decode (reduced for large pictures, see
below), apply the EXIF orientation, scale 16-bit greyscale to 8 bits, composite transparency on
white, shrink to `max_side` (LANCZOS) and, for the files, encode as JPEG of quality `JPEG_QUALITY`.

Memory stays bounded: a picture at least twice `max_side` is decoded reduced, straight toward
`max_side`: a JPEG by DCT scaling in the decoder (`Image.draft`: 1/2, 1/4 or 1/8, keeping both
sides at least `max_side`), any other format (and a JPEG too narrow for that) by `Image.reduce`
right after loading, by the largest whole factor that keeps its longest side at least `max_side`,
before any conversion or compositing copies it. `fit` then shrinks it to `max_side` (LANCZOS).

Pillow and numpy only, no TensorFlow: `prepare` runs this in one spawned process per core.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

#: The formats read, as Pillow names them, and no other: each of Pillow's other decoders (PSD, ICO,
#: EPS through Ghostscript, JPEG 2000, ...) is more code a picture from anywhere could reach, and an ICO
#: can hide a huge PNG behind a small header, decoded whole as it is opened.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
#: The same, as people name them.
FORMAT_NAMES = "JPEG, PNG, GIF, BMP, WebP or TIFF"

#: Quality of the JPEG files `prepare` writes, and of the re-encoding `images.model_input` does.
JPEG_QUALITY = 95
#: Greyscale modes Pillow gives 16-bit (and 32-bit integer) pictures: values 0..65535, not 0..255.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
#: What a transparent area becomes.
BACKGROUND = (255, 255, 255)
# Rows converted at a time when a large picture must change mode to be reduced (see `_reduced`).
_STRIP_ROWS = 256

#: Why a file cannot be used, by the reason `prepare` counts it under.
REASONS = {
    "empty": "the file is empty",
    "truncated": "the image data ends early",
    "not_an_image": f"not a picture in a format read here ({FORMAT_NAMES})",
    "undecodable": "an image format whose data is corrupt",
    "decompression_bomb": "more pixels than allowed (a possible decompression bomb)",
    "too_small": "smaller than data.min_side, below which prepare drops pictures",
}

# ImageOps.exif_transpose's mapping from the EXIF orientation to the transposition that turns the
# picture upright; applied here after the reduction, whose copy may not carry the file's EXIF tags.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Unusable(Exception):
    """The file is no picture that can be used; `reason` is one of REASONS' keys."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{REASONS[reason]} ({detail})" if detail else REASONS[reason])
        self.reason = reason


@dataclass(frozen=True)
class Decoded:
    """A decoded picture before it is shrunk to `max_side`."""

    image: Image.Image  # RGB, upright, transparency on white; decoded reduced when at least twice max_side
    original_size: tuple[int, int]  # (width, height) as the file stores it, before any reduction
    as_is: bool = False  # the file already is a JPEG as `prepare` writes them: RGB, upright, within max_side


def decode(source: Path | bytes, max_side: int, max_pixels: int | None = None) -> Decoded:
    """Decode a picture (a file or its bytes) completely, as RGB upright on white, reduced when large.

    Every pixel is decoded, so truncated or corrupt data shows here, not later. A picture of more
    than `max_pixels` pixels (None: Pillow's limit, Image.MAX_IMAGE_PIXELS) is refused from its
    header, before anything is decoded: a check of this call's own, which threads decoding at once
    (the served model's) cannot loosen for each other, as they could Pillow's process-wide warning
    filter. Raises `Unusable` with the reason `prepare` drops such a file for.
    """
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if size == 0:
        raise Unusable("empty")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS) as opened:
            width, height = opened.size
            if limit is not None and width * height > limit:
                raise Unusable("decompression_bomb", f"{width}x{height} = {width * height} pixels, over {limit}")
            return _decode_opened(opened, max_side)
    except Image.DecompressionBombError as err:  # Pillow's own limit, at twice its MAX_IMAGE_PIXELS
        raise Unusable("decompression_bomb", str(err)) from err
    except Unusable:
        raise
    except UnidentifiedImageError as err:
        raise Unusable("not_an_image", str(err)) from err
    except OSError as err:
        raise Unusable("truncated" if "truncated" in str(err) else "undecodable", str(err)) from err
    except Exception as err:  # a corrupt file can make any decoder raise anything
        raise Unusable("undecodable", f"{type(err).__name__}: {err}") from err


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the picture's header gives them, nothing decoded; None when `data` has no
    header Pillow reads. Raises `Unusable` for one so large that Pillow refuses to open it."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
            return opened.size
    except Image.DecompressionBombError as err:
        raise Unusable("decompression_bomb", str(err)) from err
    except Exception:  # noqa: BLE001  not a picture: decoding it says why
        return None


def _decode_opened(opened: Image.Image, max_side: int) -> Decoded:
    original = opened.size
    if min(original) >= 2 * max_side:
        # JPEG: the decoder scales the DCT by 1/2, 1/4 or 1/8, keeping both sides >= max_side.
        # Other formats ignore it (Image.draft does nothing) and are reduced below.
        opened.draft("RGB", (max_side, max_side))
    opened.load()  # decodes every pixel: truncation shows here, not in the header
    orientation = opened.getexif().get(ExifTags.Base.Orientation)
    # Reduce what the decoder did not: the LANCZOS of `fit` is sharper than reducing a drafted JPEG again.
    image = _reduced(opened, max_side) if opened.size == original else opened
    transpose = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    if transpose is not None:
        image = image.transpose(transpose)
    if image.mode in SIXTEEN_BIT_MODES:
        image = _to_8_bit(image)
    as_is = opened.format == "JPEG" and opened.mode == "RGB" and max(original) <= max_side and transpose is None
    return Decoded(to_rgb(image), original, as_is)  # to_rgb always copies: `opened` is closed after this


def _reduced(image: Image.Image, max_side: int) -> Image.Image:
    """`image` reduced by the largest whole factor that keeps its longest side >= max_side (itself if < 2).

    Never a full-size copy: a mode `Image.reduce` averages as it is (L, RGB, CMYK, I, ...) is
    reduced directly; one it must first convert (RGBA and LA, which it averages premultiplied, as
    compositing needs; palettes, bilevel and 16-bit, which it cannot average) is converted and
    reduced a strip of rows at a time, which gives the same pixels as doing it in one piece.
    """
    factor = max(image.size) // max_side
    if factor < 2:
        return image
    if image.mode in ("P", "PA"):
        mode = "RGBA" if image.has_transparency_data else "RGB"
    elif image.mode == "1":
        mode = "L"
    elif image.mode in SIXTEEN_BIT_MODES:
        mode = "I"
    else:
        mode = image.mode
    if mode == image.mode and mode not in ("RGBA", "LA"):
        return image.reduce(factor)
    width, height = image.size
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, _STRIP_ROWS // factor)  # a whole number of factor-high blocks
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(top + rows, height))).convert(mode).reduce(factor)
        out.paste(strip, (0, top // factor))
    return out


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (0..65535) -> 8-bit "L" (0..255), rounded; `convert` would clip to 255 instead."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image, with any transparency composited on white (a plain convert makes it black)."""
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink `image` in place (LANCZOS, aspect kept) so its longest side is at most `max_side`; return it."""
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def normalise(source: Path | bytes, max_side: int, max_pixels: int | None = None) -> Image.Image:
    """The picture as `prepare` keeps it: decoded (see `decode`) and shrunk to `max_side`."""
    return fit(decode(source, max_side, max_pixels).image, max_side)


def jpeg_bytes(image: Image.Image) -> bytes:
    """The JPEG file `prepare` writes for a normalised picture (quality JPEG_QUALITY)."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def jpeg_file(source: Path | bytes, decoded: Decoded, max_side: int) -> bytes:
    """The JPEG file `prepare` writes for a `decoded` picture: the file's own bytes when it already
    is such a JPEG (RGB, upright, within `max_side`), else the picture shrunk and re-encoded.

    Keeping such a file as it is makes normalising idempotent: a prepared picture sent again (to
    `predict` or the served model) reaches the model exactly as evaluate read it, with no second
    JPEG encoding to shift its pixels.
    """
    if decoded.as_is:
        return source if isinstance(source, bytes) else Path(source).read_bytes()
    return jpeg_bytes(fit(decoded.image, max_side))


def normalised_jpeg(source: Path | bytes, max_side: int, max_pixels: int | None = None) -> bytes:
    """The very bytes `prepare` writes for this picture (see `jpeg_file`)."""
    return jpeg_file(source, decode(source, max_side, max_pixels), max_side)


def sha256(image: Image.Image) -> str:
    """A decoded picture's identity: the hash of its size and RGB pixels (duplicates, the split)."""
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
