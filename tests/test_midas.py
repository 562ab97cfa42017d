"""MiDaS annotator and model-folder resolution: the real loaders on tiny random weights in both layouts"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import cv2
import fsspec
import huggingface_hub
import numpy as np
import pytest
import torch
from transformers import DPTForDepthEstimation

from annotate import build_annotator
from annotate.midas import (
    HF_FOLDER,
    HF_REPO,
    ORIGINAL_FILE,
    MidasAnnotator,
    config_from_original,
    convert_original_state_dict,
    depth_to_map,
    dpt_hybrid_config,
    find_midas_weights,
    load_original_state_dict,
    model_from_folder,
    model_from_original,
)
from annotate.weights import MissingWeightsError, resolve_folder, sha256_folder
from tests.tiny_weights.blip import write_tiny_blip
from tests.tiny_weights.midas import (
    original_state_dict,
    tiny_dpt_config,
    write_tiny_dpt,
    write_tiny_dpt_large,
    write_tiny_midas_original,
)


def scene(size: int = 64, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 RGB: a lit gradient with a bright disc and a dark box, plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, size, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1)
    cv2.circle(image, (int(rng.integers(16, 48)), int(rng.integers(16, 48))), 12, (250, 240, 200), -1)
    cv2.rectangle(image, (4, 40), (24, 60), (20, 30, 90), -1)
    return (image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache, so a user's real cache never decides a test (and nothing is downloaded)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("midas_hf")
    write_tiny_dpt(folder)
    return folder


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("midas_original")
    write_tiny_midas_original(folder)
    return folder


@pytest.fixture(scope="module")
def midas(hf_dir: Path) -> MidasAnnotator:
    return MidasAnnotator(weights=str(hf_dir), device="cpu", detect_resolution=64)


# --- the original checkpoint layout and its mapping -------------------------------------------------------


def test_tiny_original_checkpoint_uses_the_midas_key_names(original_dir: Path) -> None:
    sd = load_original_state_dict(original_dir / ORIGINAL_FILE)
    for key in (
        "pretrained.model.cls_token",
        "pretrained.model.pos_embed",
        "pretrained.model.patch_embed.backbone.stem.conv.weight",
        "pretrained.model.patch_embed.backbone.stem.norm.weight",
        "pretrained.model.patch_embed.backbone.stages.0.blocks.0.downsample.conv.weight",
        "pretrained.model.patch_embed.backbone.stages.2.blocks.0.norm3.bias",
        "pretrained.model.patch_embed.proj.weight",
        "pretrained.model.blocks.3.attn.qkv.weight",
        "pretrained.model.blocks.0.mlp.fc2.bias",
        "pretrained.model.head.weight",
        "pretrained.act_postprocess3.0.project.0.weight",
        "pretrained.act_postprocess4.4.weight",
        "scratch.layer1_rn.weight",
        "scratch.refinenet4.resConfUnit1.conv1.weight",
        "scratch.refinenet1.out_conv.bias",
        "scratch.output_conv.0.weight",
        "scratch.output_conv.4.bias",
    ):
        assert key in sd, key
    assert not any(key.startswith(("dpt.", "neck.", "head.")) for key in sd)
    assert sd["pretrained.model.blocks.0.attn.qkv.weight"].shape == (3 * 128, 128)  # timm packs q, k, v
    assert "scratch.layer1_rn.bias" not in sd  # the neck convs have no bias


def test_config_inferred_from_the_original_shapes_is_the_tiny_config(original_dir: Path) -> None:
    inferred = config_from_original(load_original_state_dict(original_dir / ORIGINAL_FILE))
    assert inferred.to_diff_dict() == tiny_dpt_config().to_diff_dict()


def test_mapping_covers_the_published_architecture_exactly() -> None:
    """At full published size (on the meta device: shapes only): original names <-> transformers names."""
    with torch.device("meta"):
        model = DPTForDepthEstimation(dpt_hybrid_config())
    hf = model.state_dict()
    original = original_state_dict(hf, model.config)
    assert original["pretrained.model.pos_embed"].shape == (1, 577, 768)
    assert original["pretrained.model.patch_embed.proj.weight"].shape == (768, 1024, 1, 1)
    converted = convert_original_state_dict(original)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in hf.items()}
    assert config_from_original(original).to_diff_dict() == dpt_hybrid_config().to_diff_dict()


def test_unknown_keys_are_a_clear_error(original_dir: Path) -> None:
    sd = load_original_state_dict(original_dir / ORIGINAL_FILE)
    sd["scratch.something_else.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not a MiDaS DPT-Hybrid checkpoint.*something_else"):
        convert_original_state_dict(sd)


def test_original_checkpoint_gives_the_same_maps_as_the_hf_folder(
    midas: MidasAnnotator, original_dir: Path
) -> None:
    from_original = MidasAnnotator(weights=str(original_dir), device="cpu", detect_resolution=64)
    assert from_original.describe()["weights_format"] == "original"
    assert midas.describe()["weights_format"] == "hf"
    images = [scene(seed=s) for s in range(3)]
    raw_hf, raw_original = midas.predict_depth(images), from_original.predict_depth(images)
    np.testing.assert_allclose(raw_original, raw_hf, rtol=0, atol=1e-5)
    keys = ["a", "b", "c"]
    for a, b in zip(midas(images, keys), from_original(images, keys), strict=True):
        assert np.abs(a.condition.astype(int) - b.condition.astype(int)).max() <= 1


def test_a_folder_saved_in_fp16_loads_as_fp32_as_the_original_checkpoint_does(hf_dir: Path, tmp_path: Path) -> None:
    """transformers 5 loads a checkpoint in the dtype it was saved in: a dpt-hybrid-midas/ saved in fp16 (half the
    disk) loaded as fp16, and every batch failed on the CPU (float input, half weights); the original .pt is cast to
    fp32 when loaded, and so is the folder now (CUDA runs it under autocast, as the fp32 files)."""
    model = DPTForDepthEstimation.from_pretrained(hf_dir / HF_FOLDER).half()
    model.save_pretrained(tmp_path / HF_FOLDER)
    half = MidasAnnotator(weights=str(tmp_path), device="cpu", detect_resolution=64)
    assert {p.dtype for p in half._model.parameters()} == {torch.float32}
    [annotation] = half([scene()], ["a"])
    assert annotation.condition.shape == (64, 64) and annotation.condition.max() == 255


def test_checkpoint_file_itself_can_be_the_weights_argument(original_dir: Path) -> None:
    annotator = MidasAnnotator(weights=str(original_dir / ORIGINAL_FILE), device="cpu", detect_resolution=64)
    assert annotator.describe()["weights_format"] == "original"


# --- the annotator --------------------------------------------------------------------------------------------


def test_maps_are_single_channel_uint8_spanning_0_to_255(midas: MidasAnnotator) -> None:
    images = [scene(seed=s) for s in range(3)]
    out = midas(images, ["k0", "k1", "k2"])
    assert len(out) == 3
    for annotation in out:
        assert annotation.keep
        assert annotation.condition.shape == (64, 64)
        assert annotation.condition.dtype == np.uint8
        assert annotation.condition.min() == 0 and annotation.condition.max() == 255
    assert not np.array_equal(out[0].condition, out[1].condition)


def test_maps_come_back_at_the_sample_size(midas: MidasAnnotator) -> None:
    (annotation,) = midas([scene(96)[:80, :48]], ["k"])
    assert annotation.condition.shape == (80, 48)


def test_detection_resolution_other_than_the_trained_one(hf_dir: Path) -> None:
    annotator = MidasAnnotator(weights=str(hf_dir), device="cpu", detect_resolution=128)
    (annotation,) = annotator([scene()], ["k"])
    assert annotation.condition.shape == (64, 64)
    assert annotator.describe()["detect_resolution"] == 128


def test_deterministic(midas: MidasAnnotator) -> None:
    images = [scene(seed=s) for s in range(2)]
    first, second = midas(images, ["a", "b"]), midas(images, ["a", "b"])
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.condition, b.condition)


def test_batched_equals_one_at_a_time(midas: MidasAnnotator) -> None:
    images = [scene(seed=s) for s in range(4)]
    batched = midas(images, list("abcd"))
    for image, key, together in zip(images, "abcd", batched, strict=True):
        (alone,) = midas([image], [key])
        assert np.abs(alone.condition.astype(int) - together.condition.astype(int)).max() <= 1


def test_constant_depth_is_all_zeros_not_nan() -> None:
    assert not depth_to_map(np.full((8, 8), 3.0, np.float32), (16, 16)).any()


def test_registry_builds_it(hf_dir: Path) -> None:
    annotator = build_annotator("midas", weights=str(hf_dir), device="cpu", seed=3, detect_resolution=64)
    assert annotator.name == "midas" and annotator.channels == 1


def test_describe_carries_the_weights_sha256(midas: MidasAnnotator, hf_dir: Path, original_dir: Path) -> None:
    described = midas.describe()
    weights = (hf_dir / HF_FOLDER / "model.safetensors").read_bytes()
    assert described["name"] == "midas"
    assert described["sha256"] == hashlib.sha256(weights).hexdigest()
    original = MidasAnnotator(weights=str(original_dir), device="cpu", detect_resolution=64).describe()
    assert original["sha256"] == hashlib.sha256((original_dir / ORIGINAL_FILE).read_bytes()).hexdigest()


# --- weight resolution ----------------------------------------------------------------------------------------


def test_missing_weights_name_both_published_forms(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as error:
        MidasAnnotator(weights=str(tmp_path), device="cpu")
    message = str(error.value)
    assert HF_FOLDER in message and ORIGINAL_FILE in message and str(tmp_path) in message
    assert "\n" not in message


def test_resolve_folder_finds_source_name_or_source_itself(hf_dir: Path) -> None:
    assert resolve_folder(HF_FOLDER, source=str(hf_dir)) == hf_dir / HF_FOLDER
    assert resolve_folder(HF_FOLDER, source=str(hf_dir / HF_FOLDER)) == hf_dir / HF_FOLDER


def test_a_flat_folder_with_another_models_config_loads_the_checkpoint(hf_dir: Path, original_dir: Path,
                                                                     tmp_path: Path) -> None:
    """BLIP's files at the top of a --weights folder, beside the MiDaS .pt: its config.json was taken for the
    dpt-hybrid-midas folder's, and the job refused the folder. The config's model_type decides now; a remote folder's
    config is read, not the folder copied."""
    flat = Path(shutil.copytree(write_tiny_blip(tmp_path / "blip"), tmp_path / "weights"))  # BLIP's files at the top
    shutil.copy(original_dir / ORIGINAL_FILE, flat)
    annotator = MidasAnnotator(weights=str(flat), device="cpu", detect_resolution=64)
    assert annotator.describe()["weights_format"] == "original"
    assert annotator.describe()["weights_file"] == ORIGINAL_FILE
    # a folder whose own config is DPT's is still the Hugging Face folder
    assert find_midas_weights(str(hf_dir / HF_FOLDER)) == ("hf", hf_dir / HF_FOLDER)
    fs = fsspec.filesystem("memory")
    for path in flat.iterdir():
        fs.pipe(f"/flat-{tmp_path.name}/{path.name}", path.read_bytes())
    with pytest.raises(MissingWeightsError):
        resolve_folder(HF_FOLDER, f"memory://flat-{tmp_path.name}", cache_dir=tmp_path / "cache",
                       model_type="dpt")
    assert not (tmp_path / "cache").exists()
    fs.rm(f"/flat-{tmp_path.name}", recursive=True)


def test_resolve_folder_copies_a_remote_folder_once(hf_dir: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    for path in (hf_dir / HF_FOLDER).iterdir():
        fs.pipe(f"/weights-{tmp_path.name}/{HF_FOLDER}/{path.name}", path.read_bytes())
    url = f"memory://weights-{tmp_path.name}"
    local = resolve_folder(HF_FOLDER, source=url, cache_dir=tmp_path / "cache")
    assert (local / "config.json").is_file()
    assert sha256_folder(local) == sha256_folder(hf_dir / HF_FOLDER)
    assert resolve_folder(HF_FOLDER, source=url, cache_dir=tmp_path / "cache") == local
    # the weights there replaced: copied again (the copy kept by URL alone was used on, with the old weights)
    other = write_tiny_dpt(tmp_path / "other", seed=1)
    fs.pipe(f"/weights-{tmp_path.name}/{HF_FOLDER}/model.safetensors", (other / "model.safetensors").read_bytes())
    fresh = resolve_folder(HF_FOLDER, source=url, cache_dir=tmp_path / "cache")
    assert fresh != local and sha256_folder(fresh) == sha256_folder(other) != sha256_folder(local)
    fs.rm(f"/weights-{tmp_path.name}", recursive=True)


def test_a_folder_or_checkpoint_missing_weights_is_refused_not_loaded_random(hf_dir: Path, original_dir: Path,
                                                                           tmp_path: Path) -> None:
    """transformers loaded a folder whose safetensors lacked tensors, leaving them random (maps from noise, with a
    warning in an actor's log); a checkpoint with a tensor missing or not a tensor, or wrapped, was a bare
    KeyError, AttributeError or a multi-line RuntimeError."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(hf_dir / HF_FOLDER, tmp_path / "hf" / HF_FOLDER))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("neck.")}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="is not MiDaS DPT-Hybrid.*lack .* of the model's tensors"):
        model_from_folder(folder)
    original = load_original_state_dict(original_dir / ORIGINAL_FILE)
    first = next(iter(original))
    for name, state in (("missing", {k: v for k, v in original.items() if k != "scratch.layer1_rn.weight"}),
                        ("wrapped", {"state_dict": original}), ("float", {**original, first: 1.0})):
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=f"{name}.pt is not the MiDaS DPT-Hybrid checkpoint") as err:
            model_from_original(tmp_path / f"{name}.pt")
        assert "\n" not in str(err.value)


def test_a_dpt_without_the_hybrid_backbone_is_refused_not_run_as_dpt_hybrid(tmp_path: Path) -> None:
    """Intel/dpt-large (or a DPT-BEiT) is a DPT too, and loaded under dpt-hybrid-midas/ or as --weights itself: the
    job wrote its depth maps, other than the ones ControlNet's depth model was trained on, and the manifest named
    them DPT-Hybrid."""
    large = write_tiny_dpt_large(tmp_path / "w")
    shutil.copytree(large, tmp_path / "named" / HF_FOLDER)
    for weights, folder in ((large, large), (tmp_path / "named", tmp_path / "named" / HF_FOLDER)):
        with pytest.raises(ValueError, match="is not MiDaS DPT-Hybrid.*not hybrid") as err:
            MidasAnnotator(weights=str(weights), device="cpu")
        assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_nan_or_inf_weights_are_refused_in_either_layout(hf_dir: Path, original_dir: Path, tmp_path: Path) -> None:
    """They loaded, and every map came out blank (depth_to_map's all-zeros for no information) yet marked ok."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(hf_dir / HF_FOLDER, tmp_path / "hf" / HF_FOLDER))
    weights = load_file(folder / "model.safetensors")
    weights["head.head.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"is not MiDaS DPT-Hybrid.*NaN or inf in 1 of.*head\.head\.0\.weight") as err:
        model_from_folder(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    original = load_original_state_dict(original_dir / ORIGINAL_FILE)
    original["scratch.output_conv.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(original, tmp_path / ORIGINAL_FILE)
    with pytest.raises(ValueError, match=f"{ORIGINAL_FILE} is not the MiDaS DPT-Hybrid checkpoint.*NaN or inf in 1 of"):
        MidasAnnotator(weights=str(tmp_path), device="cpu")


def test_a_folder_of_other_weights_is_our_one_line_without_transformers_report(hf_dir: Path, tmp_path: Path,
                                                                               transformers_log: list[str]) -> None:
    """transformers printed its load report (~100 lines of missing and unexpected keys) before our one line; its
    logging is as it was after."""
    shutil.copytree(write_tiny_blip(tmp_path / "blip"), tmp_path / "w" / HF_FOLDER)  # BLIP's files, MiDaS's name
    library = logging.getLogger("transformers")
    before = (library.handlers[:], library.propagate)
    with pytest.raises(ValueError, match="is not MiDaS DPT-Hybrid.*lack") as err:
        MidasAnnotator(weights=str(tmp_path / "w"), device="cpu")
    assert "\n" not in str(err.value)
    assert transformers_log == []
    assert (library.handlers, library.propagate) == before
    # other shapes than its config's: transformers' error pointed at "the above report", which is not printed now
    folder = Path(shutil.copytree(hf_dir / HF_FOLDER, tmp_path / "m" / HF_FOLDER))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "fusion_hidden_size": 32}))
    with pytest.raises(ValueError, match=r"shapes differ from its config's, e\.g\. .+: .*ckpt: torch\.Size") as err:
        model_from_folder(folder)
    assert "\n" not in str(err.value) and transformers_log == []


def test_resolve_folder_uses_the_hub_cache_without_network(hf_dir: Path, empty_hub_cache: Path) -> None:
    repo = empty_hub_cache / ("models--" + HF_REPO.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_dir / HF_FOLDER, repo / "snapshots" / commit)
    found = resolve_folder(HF_FOLDER, source=None, hub_repo=HF_REPO)
    assert found == repo / "snapshots" / commit
    annotator = MidasAnnotator(device="cpu", detect_resolution=64)  # no --weights: the hub cache
    assert annotator.describe()["weights_format"] == "hf"


def test_resolve_folder_missing_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"'some-model' not found.*hub cache \(org/some-model\)"):
        resolve_folder("some-model", source=str(tmp_path), hub_repo="org/some-model")


def test_sha256_folder_hashes_the_weights_a_loader_reads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.safetensors").write_bytes(b"a")
    (tmp_path / "pytorch_model.bin").write_bytes(b"other format, not loaded")
    assert sha256_folder(tmp_path) == hashlib.sha256(b"a").hexdigest()
    (tmp_path / "b.safetensors").write_bytes(b"b")
    sharded = sha256_folder(tmp_path)
    assert sharded == sha256_folder(tmp_path) and len(sharded) == 64
    (tmp_path / "config.json").write_text('{"changed": 1}')
    assert sha256_folder(tmp_path) == sharded
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError):
        sha256_folder(tmp_path / "empty")
