import codecs
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from pipeline.preprocess import (
    ImageTooLarge,
    center_crop_resize,
    decode_caption,
    decode_image,
    encode_jpeg,
    encode_png,
    open_images_up_to,
    reject_reason,
)
from tests.corpus import bomb_png, encode, exif_rotated_jpeg, mode_images, photo


@pytest.mark.parametrize("mode", sorted(mode_images()))
def test_every_mode_becomes_rgb_uint8(mode):
    image, size = decode_image(mode_images()[mode], resolution=32, max_pixels=10**8)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert size == (96, 64)
    assert image.std() > 1  # not blanked or saturated by the conversion


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    image, _ = decode_image(encode(Image.fromarray(values), "PNG"), 1, 10**6)
    np.testing.assert_array_equal(image[0, :, 0], [0, 100, 255])


def test_float_images_without_a_value_become_black_and_the_rest_keeps_its_scale():
    values = np.array([[np.nan, np.inf, -np.inf, 0.5, 1.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns when it casts NaN: the value would be the platform's
        image, _ = decode_image(encode(Image.fromarray(values), "TIFF"), 1, 10**6)
    np.testing.assert_array_equal(image[0, :, 0], [0, 0, 0, 128, 255])


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    image, _ = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 4, 10**6)
    assert (image == 255).all()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_pngs_colour_key_is_transparent_as_an_alpha_channel_is(mode):
    # PNG optimisers store an alpha of only 0 and 255 as a tRNS colour key in an RGB or grey PNG: its transparent
    # pixels (black ones here) stayed black, where the same image with alpha or a palette came out white
    pixels = np.full((4, 4, 3), 90, np.uint8)
    pixels[:, :2] = 0
    image = Image.fromarray(pixels).convert(mode)
    key = (0, 0, 0) if mode == "RGB" else 0
    decoded, _ = decode_image(encode(image, "PNG", transparency=key), 4, 10**6)
    assert (decoded[:, :2] == 255).all()
    assert (decoded[:, 2:] == 90).all()


def test_exif_orientation_is_applied():
    image, size = decode_image(exif_rotated_jpeg(), resolution=64, max_pixels=10**6)
    assert size == (64, 96)  # displayed width x height
    assert image.shape[:2] == (96, 64)



def test_a_png_whose_exif_is_unreadable_is_decoded_as_stored():
    """A PNG whose eXIf chunk PIL cannot parse failed with 'SyntaxError: not a TIFF file', though viewers show it."""
    pixels = np.zeros((6, 4, 3), np.uint8)
    pixels[0] = 255  # the top row white: as stored, not turned
    data = encode(Image.fromarray(pixels), "PNG", exif=b"Exif\x00\x00" + bytes(range(7, 107)))
    image, size = decode_image(data, 4, 10**6)
    assert size == (4, 6) and image.shape == (6, 4, 3) and (image[0] == 255).all() and (image[1:] == 0).all()

def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageTooLarge, match="over the cap"):
        decode_image(bomb_png(20000), resolution=512, max_pixels=89_478_485)


def test_a_pixel_cap_above_pils_own_is_the_one_applied(monkeypatch):
    """PIL refuses, at open, images over twice its own cap; the actors raise it to --max-pixels, so a larger cap
    lets larger images through and the job's own check (and message) applies. PIL's cap is lowered here to stand
    in for its 179 Mpx without decoding that many pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    allowed = encode(Image.fromarray(photo(800, 600)), "PNG")
    with pytest.raises(ImageTooLarge, match="exceeds limit"):  # PIL's refusal, under the job's cap of 10**6
        decode_image(allowed, resolution=64, max_pixels=10**6)
    open_images_up_to(10**6)
    image, size = decode_image(allowed, resolution=64, max_pixels=10**6)
    assert size == (800, 600) and image.shape == (600, 800, 3)
    with pytest.raises(ImageTooLarge, match="over the cap of 400000"):  # the job's cap, from the header
        decode_image(allowed, resolution=64, max_pixels=400_000)


def test_jpeg_draft_decode_matches_a_full_decode():
    big = encode(Image.fromarray(photo(1600, 1200)), "JPEG", quality=95)
    fast, size = decode_image(big, resolution=256, max_pixels=10**8)
    assert size == (1600, 1200)
    assert min(fast.shape[:2]) >= 256 and fast.shape[1] < 1600  # decoded reduced, still covers 256
    full = np.asarray(Image.open(io.BytesIO(big)).convert("RGB"))
    a, b = center_crop_resize(fast, 256), center_crop_resize(full, 256)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


@pytest.mark.parametrize("shape", [(2, 3), (4, 2000), (2000, 4), (64, 96), (512, 512), (1024, 700)])
def test_center_crop_resize_gives_the_square(shape):
    out = center_crop_resize(photo(shape[1], shape[0]), 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_center_crop_takes_the_middle():
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, 10:20] = 255  # the central square is white, the sides black
    assert (center_crop_resize(image, 10) == 255).all()


def test_reject_reasons():
    assert reject_reason(100, 100, 0, 0) == ""
    assert "min-size" in reject_reason(100, 50, 64, 0)
    assert "aspect" in reject_reason(300, 100, 0, 2.0)
    assert reject_reason(200, 100, 64, 2.0) == ""


def test_captions_keep_invalid_utf8_and_say_so():
    assert decode_caption(b" a cat \n") == ("a cat", "")
    text, warning = decode_caption("café".encode("latin-1"))
    assert text.startswith("caf") and "\ufffd" in text and "UTF-8" in warning


def test_a_captions_byte_order_mark_is_dropped_and_utf16_is_read():
    """Notepad's UTF-8 starts with a byte-order mark, which went into the caption as an invisible first character;
    its "Unicode" is UTF-16 behind one, which was kept as replacement characters and NULs."""
    assert decode_caption(codecs.BOM_UTF8 + "a red café\r\n".encode()) == ("a red café", "")
    assert decode_caption("a red café\r\n".encode("utf-16")) == ("a red café", "")  # BOM first, little-endian
    assert decode_caption(codecs.BOM_UTF16_BE + "猫".encode("utf-16-be")) == ("猫", "")
    text, warning = decode_caption(codecs.BOM_UTF8 + "café".encode("latin-1"))
    assert text.startswith("caf") and "\ufeff" not in text and "UTF-8" in warning


def test_encoders_round_trip():
    import cv2

    image = photo(32, 32)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(encode_jpeg(image), np.uint8), 1), cv2.COLOR_BGR2RGB)
    assert np.abs(decoded.astype(int) - image).mean() < 4
    edge = (photo(32, 32)[:, :, 0] > 128).astype(np.uint8) * 255
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(encode_png(edge), np.uint8), 0), edge)
    rgb = photo(16, 16)
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(encode_png(rgb), np.uint8), 1), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)


def test_a_png_over_the_cap_is_refused_before_its_pixels_are_decoded():
    """Reading a PNG's EXIF orientation decodes the whole image when no eXIf chunk precedes its pixel data (PIL
    loads it to look further on): the cap was checked after that, so a 170 Mpx PNG under PIL's own cap was decoded
    in full, whatever the --max-pixels. A PNG cut right after its first pixel bytes stands in for the pixels: were
    they decoded, it would fail as truncated, not as over the cap."""
    png = encode(Image.fromarray(photo(3000, 2000)), "PNG")
    header_and_a_little = png[: png.index(b"IDAT") + 64]
    with pytest.raises(ImageTooLarge, match="image is 3000x2000 = 6000000 pixels, over the cap of 1000000"):
        decode_image(header_and_a_little, resolution=64, max_pixels=10**6)
    with pytest.raises(OSError, match="truncated"):  # under the cap, its pixels are read
        decode_image(header_and_a_little, resolution=64, max_pixels=10**7)


def test_bytes_that_are_no_image_fail_with_the_same_words_in_every_run():
    """PIL's message named the BytesIO object at its address, so each run's parquet said it otherwise."""
    with pytest.raises(Image.UnidentifiedImageError, match=r"^empty file \(0 bytes\)$"):
        decode_image(b"", resolution=64, max_pixels=10**6)
    html = b"<html><body>404 Not Found</body></html>"
    with pytest.raises(Image.UnidentifiedImageError) as error:
        decode_image(html, resolution=64, max_pixels=10**6)
    assert str(error.value) == f"no image format PIL reads ({len(html)} bytes: b'<html><body>'...)"
