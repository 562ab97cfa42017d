"""decode any image to RGB, apply EXIF orientation, cap pixels, centre-crop and resize; encode outputs"""
from __future__ import annotations

import codecs
import io

import cv2
import numpy as np
from PIL import Image, ImageOps

# EXIF orientations 5-8 rotate by 90 degrees, so the displayed size is the stored size transposed
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


class ImageTooLarge(ValueError):
    """A decompression bomb (or just a huge image): refused from its header, before decoding."""


def open_images_up_to(max_pixels: int) -> None:
    """Let PIL open headers of up to `max_pixels` (--max-pixels) in this process. PIL refuses an image over twice its
    own cap (2 x 89 Mpx) when it opens the file, before decode_image reads the header size and applies the job's cap:
    without this, a --max-pixels above 179 Mpx would still refuse a 200 Mpx panorama. PIL's warning between its two
    caps goes quiet: decode_image checks the header against the job's cap before any pixel is decoded."""
    import warnings

    Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1: as stored). EXIF that PIL cannot parse (a PNG's eXIf chunk of garbage: 'not a TIFF
    file') says none, as in viewers, which show such a photo: it failed the sample for metadata nothing else reads."""
    try:
        return im.getexif().get(0x0112, 1)
    except Exception:
        return 1


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as a viewer shows it, after EXIF orientation. Read from the header, except for a PNG whose
    eXIf chunk is not before its pixel data (or that has none): PIL decodes it whole to look further."""
    orientation = exif_orientation(im)
    w, h = im.size
    return (h, w) if orientation in _TRANSPOSING_ORIENTATIONS else (w, h)


def _white_background(im: Image.Image) -> Image.Image:
    """Composite transparent images on white: transparent black would otherwise become black."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB. 16-bit and float images are scaled, not clipped. Transparent pixels
    are white: an alpha channel's, and a PNG's colour key (its tRNS chunk) in palette, grey or RGB images, which
    PNG optimisers (oxipng, optipng, pngcrush) write in place of an alpha channel that is only ever 0 or 255."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return np.asarray(im)
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in {"I", "F"}:
        # a float TIFF may hold NaN or infinities where it has no value: black, not whatever a cast makes of them
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if im.mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        elif im.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in {"RGBA", "LA", "PA"} or (im.mode in {"P", "L", "1", "RGB"} and "transparency" in im.info):
        return np.asarray(_white_background(im))
    return np.asarray(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _jpeg_reduction(size: tuple[int, int], resolution: int) -> int:
    """The largest of libjpeg's 1/2, 1/4, 1/8 reductions whose shorter side still covers `resolution`."""
    return next((r for r in (8, 4, 2) if min(size) // r >= resolution), 1)


_CV2_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _decode_plain_jpeg(data: bytes, reduction: int) -> np.ndarray | None:
    """OpenCV's JPEG decode: ~20% faster than PIL's for the common case (RGB, no EXIF rotation)."""
    buf = np.frombuffer(data, np.uint8)
    if reduction == 1:
        return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    bgr = cv2.imdecode(buf, _CV2_REDUCED[reduction] | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _unidentified(data: bytes) -> str:
    """Why PIL could not open `data`, the same in every run (a parquet row's error), with what the bytes begin with
    (an HTML error page saved as .jpg, a HEIC photo)."""
    return "empty file (0 bytes)" if not data else f"no image format PIL reads ({len(data)} bytes: {data[:12]!r}...)"


def decode_image(data: bytes, resolution: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> ((H, W, 3) uint8 RGB, displayed (width, height) of the original).

    The header is read first, so a decompression bomb is refused before any pixel is decoded. JPEGs are
    decoded at the largest power-of-two reduction that still covers `resolution` on the shorter side
    (libjpeg's DCT scaling): a 4000 px photo decodes 4-8x faster and the crop is unchanged.
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own, coarser cap, checked at open
        raise ImageTooLarge(f"{e} (over the cap)") from None
    except Image.UnidentifiedImageError:  # its message names the BytesIO, at an address new in every process
        raise Image.UnidentifiedImageError(_unidentified(data)) from None
    # the cap from the stored size: a rotation keeps the pixel count, and reading the orientation of a PNG without
    # an eXIf chunk before its pixel data decodes the whole image (PIL loads it to look for one further on)
    stored_width, stored_height = im.size
    if stored_width * stored_height > max_pixels:
        raise ImageTooLarge(f"image is {stored_width}x{stored_height} = {stored_width * stored_height} pixels, "
                            f"over the cap of {max_pixels}")
    width, height = displayed_size(im)
    if width == 0 or height == 0:
        raise ValueError(f"image has an empty side ({width}x{height})")
    reduction = _jpeg_reduction(im.size, resolution)
    orientation = exif_orientation(im)
    if im.format == "JPEG" and im.mode == "RGB" and orientation == 1:
        image = _decode_plain_jpeg(data, reduction)
        if image is not None:
            return image, (width, height)
    im.draft(None, (im.size[0] // reduction, im.size[1] // reduction))
    if orientation != 1:  # exif_transpose reads the EXIF again, and raises where exif_orientation said 1
        ImageOps.exif_transpose(im, in_place=True)
    return to_rgb(im), (width, height)


def reject_reason(width: int, height: int, min_size: int, max_aspect: float) -> str:
    """Why the optional size filters drop an image of this size; empty when it passes."""
    if min_size and min(width, height) < min_size:
        return f"shorter side {min(width, height)} px is below --min-size {min_size}"
    aspect = max(width, height) / min(width, height)
    if max_aspect and aspect > max_aspect:
        return f"aspect ratio {aspect:.2f} is above --max-aspect {max_aspect}"
    return ""


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """Crop the centred square of side min(H, W), then resize it to (resolution, resolution).

    Cropping first keeps memory bounded for extreme aspect ratios (a 10000x2 strip never becomes
    2.5M px wide). INTER_AREA when shrinking avoids aliasing; cubic when enlarging.
    """
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > resolution else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(square, (resolution, resolution), interpolation=interpolation))


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(condition: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) RGB uint8 -> PNG bytes. Level 1: maps are sparse, higher levels buy little."""
    if condition.ndim == 3:
        condition = cv2.cvtColor(condition, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", condition, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_caption(data: bytes) -> tuple[str, str]:
    """Caption bytes -> (text, warning). Invalid UTF-8 is kept with replacement characters and flagged.

    A byte-order mark is no part of the caption: Windows editors start UTF-8 files with one (str.strip keeps it,
    and it went on into the caption as an invisible first character), and save "Unicode" as UTF-16 behind one."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16").strip(), ""
        except UnicodeDecodeError:
            pass  # no UTF-16 after all: read as below
    try:
        return data.decode("utf-8-sig").strip(), ""
    except UnicodeDecodeError as e:
        return data.decode("utf-8-sig", errors="replace").strip(), f"caption is not valid UTF-8 ({e.reason})"
