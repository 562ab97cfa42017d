"""BLIP captioner: the real transformers loader on a tiny random BLIP with a locally built tokenizer"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from annotate import build_captioner
from annotate.blip import HF_FOLDER, BlipCaptioner, ImageSpec, preprocess, read_image_spec
from annotate.weights import MissingWeightsError
from tests.tiny_weights.blip import IMAGE_SIZE, write_tiny_blip
from tests.tiny_weights.midas import write_tiny_dpt


def images() -> list[np.ndarray]:
    """Four 64 px RGB images unlike each other: black, grey, white, noise."""
    rng = np.random.default_rng(0)
    flat = [np.full((64, 64, 3), value, np.uint8) for value in (0, 128, 255)]
    return [*flat, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty HF hub cache, so a user's real cache never decides a test (and nothing is downloaded)."""
    (tmp_path / "hub").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("blip_weights")
    write_tiny_blip(folder)
    return folder


@pytest.fixture(scope="module")
def blip(weights_dir: Path) -> BlipCaptioner:
    return BlipCaptioner(weights=str(weights_dir), device="cpu", max_new_tokens=8)


def test_tiny_folder_has_the_published_layout(weights_dir: Path) -> None:
    folder = weights_dir / HF_FOLDER
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "preprocessor_config.json"):
        assert (folder / name).is_file(), name


def test_one_stripped_caption_per_image(blip: BlipCaptioner) -> None:
    captions = blip(images())
    assert len(captions) == 4
    assert all(isinstance(c, str) and c == c.strip() for c in captions)
    assert not any("[" in c for c in captions)  # special tokens ([DEC], [SEP], [PAD]) are decoded away
    assert len(set(captions)) > 1  # the captions depend on the image


def test_deterministic(blip: BlipCaptioner) -> None:
    assert blip(images()) == blip(images())


def test_batched_equals_one_at_a_time(blip: BlipCaptioner) -> None:
    batch = images()
    assert blip(batch) == [blip([image])[0] for image in batch]


def test_small_batches_split_the_work(weights_dir: Path, blip: BlipCaptioner) -> None:
    chunked = BlipCaptioner(weights=str(weights_dir), device="cpu", max_new_tokens=8, batch_size=3)
    assert chunked(images()) == blip(images())


def test_beam_search_runs(weights_dir: Path) -> None:
    beams = BlipCaptioner(weights=str(weights_dir), device="cpu", num_beams=3, max_new_tokens=8)
    captions = beams(images())
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert captions == beams(images())


def test_prompt_is_continued(weights_dir: Path) -> None:
    prompted = BlipCaptioner(weights=str(weights_dir), device="cpu", prompt="a photo of", max_new_tokens=4)
    captions = prompted(images()[:2])
    assert all(c.startswith("a photo of") for c in captions)


def test_max_new_tokens_bounds_the_caption(weights_dir: Path) -> None:
    short = BlipCaptioner(weights=str(weights_dir), device="cpu", max_new_tokens=2)
    assert all(len(c.split()) <= 2 for c in short(images()))


def test_registry_builds_it(weights_dir: Path) -> None:
    captioner = build_captioner("blip", weights=str(weights_dir), device="cpu", max_new_tokens=4)
    assert captioner.name == "blip" and len(captioner(images()[:1])) == 1


def test_preprocessing_follows_the_processor_config(weights_dir: Path) -> None:
    spec = read_image_spec(weights_dir / HF_FOLDER, image_size=999)
    assert (spec.height, spec.width) == (IMAGE_SIZE, IMAGE_SIZE) and spec.resample == Image.Resampling.BICUBIC
    x = preprocess(images()[:3], spec)
    assert x.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    # black and white land at (0 - mean) / std and (1 - mean) / std per channel
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), -np.array(spec.mean) / np.array(spec.std), rtol=1e-5)
    np.testing.assert_allclose(x[2, :, 0, 0].numpy(), (1 - np.array(spec.mean)) / np.array(spec.std), rtol=1e-5)


def test_preprocessing_follows_a_processor_config_as_transformers_5_saves_it(tmp_path: Path) -> None:
    """BlipProcessor.save_pretrained writes processor_config.json (the image processor nested in it), no
    preprocessor_config.json: its mean, std and size were ignored for the defaults, while transformers reads them."""
    from transformers import BlipImageProcessor, BlipProcessor

    from tests.tiny_weights.blip import write_tokenizer

    processor = BlipImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2] * 3)
    BlipProcessor(image_processor=processor, tokenizer=write_tokenizer(tmp_path / "tok")).save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    spec = read_image_spec(tmp_path, image_size=384)
    assert spec == ImageSpec(24, 24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    expected = BlipImageProcessor.from_pretrained(tmp_path)(images(), return_tensors="pt").pixel_values
    np.testing.assert_allclose(preprocess(images(), spec).numpy(), expected.numpy(), atol=1e-5)


def test_image_spec_without_a_processor_file_uses_the_vision_size(tmp_path: Path) -> None:
    assert read_image_spec(tmp_path, image_size=384) == ImageSpec(384, 384)


def test_describe_carries_the_weights_sha256(blip: BlipCaptioner, weights_dir: Path) -> None:
    described = blip.describe()
    weights = (weights_dir / HF_FOLDER / "model.safetensors").read_bytes()
    assert described["name"] == "blip"
    assert described["sha256"] == hashlib.sha256(weights).hexdigest()
    assert described["num_beams"] == 1 and described["max_new_tokens"] == 8


def test_missing_weights_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as error:
        BlipCaptioner(weights=str(tmp_path), device="cpu")
    message = str(error.value)
    assert HF_FOLDER in message and str(tmp_path) in message and "Salesforce/" in message
    assert "\n" not in message


def test_the_base_checkpoint_serves_where_the_large_is_not_there(tmp_path: Path) -> None:
    """Users also run Salesforce/blip-image-captioning-base: a --weights folder holding it (and not the large) was
    'model folder not found'. With both there, the large is used, as before."""
    base = write_tiny_blip(tmp_path, seed=1, name="blip-image-captioning-base")
    captioner = BlipCaptioner(weights=str(tmp_path), device="cpu", max_new_tokens=4)
    assert captioner.describe()["weights_file"] == "blip-image-captioning-base"
    assert captioner.sha256 == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert len(captioner(images()[:2])) == 2
    write_tiny_blip(tmp_path, seed=0)
    assert BlipCaptioner(weights=str(tmp_path), device="cpu").describe()["weights_file"] == HF_FOLDER


def test_neither_checkpoint_is_one_line_naming_both(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as error:
        BlipCaptioner(weights=str(tmp_path), device="cpu")
    message = str(error.value)
    assert message.startswith("model folder 'blip-image-captioning-large' or 'blip-image-captioning-base' not found")
    for looked in (f"{tmp_path}/blip-image-captioning-large/config.json",
                   f"{tmp_path}/blip-image-captioning-base/config.json",
                   "hub cache (Salesforce/blip-image-captioning-large)",
                   "hub cache (Salesforce/blip-image-captioning-base)"):
        assert looked in message, looked
    assert "\n" not in message


def test_a_damaged_weight_file_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    """safetensors' own message ('invalid header length') says nothing of which file."""
    folder = write_tiny_blip(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match="does not load as the BLIP captioner") as error:
        BlipCaptioner(weights=str(tmp_path), device="cpu")
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


class RunsCode:
    """A pickled call of a blocked module's function (os.getpid: harmless, were it ever run), as a malicious
    pytorch_model.bin holds os.system."""

    def __reduce__(self):
        import os

        return (os.getpid, ())


def test_a_bin_that_pickles_code_is_refused_naming_what_it_holds(tmp_path: Path) -> None:
    """Older hub folders hold pytorch_model.bin; transformers reads it weights-only and refuses code, in torch's
    paragraph that opens with its advice to load it with weights_only=False (cut at 200 characters, before what
    it found)."""
    import torch

    folder = write_tiny_blip(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"vision_model.embeddings.class_embedding": RunsCode()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="does not load as the BLIP captioner") as error:
        BlipCaptioner(weights=str(tmp_path), device="cpu")
    message = str(error.value)
    assert "refused unread: Trying to load unsupported GLOBAL" in message and "getpid" in message
    assert "weights_only" not in message and str(folder) in message and "\n" not in message


def test_a_folder_saved_in_fp16_loads_as_fp32(weights_dir: Path, tmp_path: Path) -> None:
    """transformers 5 loads a checkpoint in the dtype it was saved in: a folder saved in fp16 captioned in fp16 on
    the CPU, and on CUDA without autocast's fp32 master copy; the captioner holds fp32 weights, as from fp32 files."""
    from transformers import BlipForConditionalGeneration

    shutil.copytree(weights_dir / HF_FOLDER, tmp_path / HF_FOLDER)
    BlipForConditionalGeneration.from_pretrained(tmp_path / HF_FOLDER).half().save_pretrained(tmp_path / HF_FOLDER)
    half = BlipCaptioner(weights=str(tmp_path), device="cpu", max_new_tokens=4)
    assert {p.dtype for p in half._model.parameters()} == {torch.float32}


def test_a_vqa_checkpoint_is_refused_not_run_as_the_captioner(tmp_path: Path) -> None:
    """Salesforce/blip-vqa-base holds a vision model and a text decoder under the captioner's names (beside a
    question encoder): it loaded whole, and its answer decoder wrote every caption."""
    from transformers import BertTokenizer, BlipForQuestionAnswering

    from tests.tiny_weights.blip import tiny_blip_config

    folder = write_tiny_blip(tmp_path)
    (folder / "model.safetensors").unlink()
    BlipForQuestionAnswering(tiny_blip_config(BertTokenizer.from_pretrained(folder))).save_pretrained(folder)
    with pytest.raises(ValueError, match="holds BlipForQuestionAnswering, not BlipForConditionalGeneration") as error:
        BlipCaptioner(weights=str(tmp_path), device="cpu")
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_nan_or_inf_weights_are_refused_in_one_line(weights_dir: Path, tmp_path: Path) -> None:
    """They loaded, and every caption came out ''."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(weights_dir / HF_FOLDER, tmp_path / HF_FOLDER))
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.startswith("vision_model.") and k.endswith(".weight"))
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="is not the BLIP captioner: NaN or inf in 1 of") as error:
        BlipCaptioner(weights=str(tmp_path), device="cpu")
    assert str(folder) in str(error.value) and name in str(error.value) and "\n" not in str(error.value)


def test_a_folder_of_other_weights_is_our_one_line_without_transformers_report(tmp_path: Path,
                                                                               transformers_log: list[str]) -> None:
    """transformers printed its load report (~100 lines of missing and unexpected keys) before our one line."""
    write_tiny_dpt(tmp_path / "dpt").rename(tmp_path / HF_FOLDER)  # MiDaS's files under BLIP's name
    with pytest.raises(ValueError, match="is not the BLIP captioner: its weights lack") as error:
        BlipCaptioner(weights=str(tmp_path), device="cpu")
    assert "\n" not in str(error.value) and transformers_log == []


def test_a_folder_missing_weights_or_its_tokenizer_is_refused_not_run_random(weights_dir: Path,
                                                                           tmp_path: Path) -> None:
    """A safetensors lacking tensors loaded with them random ('large large large ...'); a folder without its
    tokenizer files made a 5-token one from the config, and every caption was ''."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(weights_dir / HF_FOLDER, tmp_path / "a" / HF_FOLDER))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "text_decoder" not in k}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="is not the BLIP captioner: its weights lack"):
        BlipCaptioner(weights=str(tmp_path / "a"), device="cpu")
    folder = Path(shutil.copytree(weights_dir / HF_FOLDER, tmp_path / "b" / HF_FOLDER))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="holds no tokenizer for BLIP"):
        BlipCaptioner(weights=str(tmp_path / "b"), device="cpu")
