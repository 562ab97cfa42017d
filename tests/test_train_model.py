"""the paper's model properties (Sec. 3, Eqs. 3-10) on the tiny SD: zero convolutions, locking, modes"""
import shutil
from pathlib import Path

import pytest
import torch

from train.model import (
    ControlledUNet,
    build_controlnet,
    decoder_parameters,
    diffusion_loss,
    encode_prompts,
    freeze_for_training,
    load_base_model,
    to_model_space,
    unlock_decoder,
    zero_convolutions,
)
from train.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd_path(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture
def sd(tiny_sd_path):
    return load_base_model(str(tiny_sd_path))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    condition = (torch.rand(2, 3, 64, 64, generator=g) > 0.8).float()
    return pixels, condition


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def train_steps(sd, model, params, steps=1, lr=1e-3, seed=0):
    optimizer = torch.optim.AdamW(params, lr=lr)
    text = encode_prompts(sd, ["a photo of a cat", ""], torch.device("cpu"))
    for i in range(steps):
        pixels, condition = batch(seed + i)
        loss = diffusion_loss(sd, model, pixels, condition, text, torch.Generator().manual_seed(i))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_fresh_controlnet_leaves_the_unet_output_exactly_unchanged(sd):
    controlnet = build_controlnet(sd.unet)
    assert all((p == 0).all() for zc in zero_convolutions(controlnet) for p in zc.parameters())
    latents = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    text = encode_prompts(sd, ["a cat", ""], torch.device("cpu"))
    _, condition = batch()
    with torch.no_grad():
        plain = sd.unet(latents, timesteps, encoder_hidden_states=text).sample
        controlled = ControlledUNet(sd.unet, controlnet)(latents, timesteps, text, condition)
    assert torch.equal(plain, controlled)


def test_one_step_makes_zero_convolutions_nonzero_and_sd_stays_locked(sd):
    controlnet = build_controlnet(sd.unet)
    freeze_for_training(sd, controlnet, middle_only=False)
    locked = {name: snapshot(m) for name, m in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder))}
    hint_out = controlnet.controlnet_cond_embedding.conv_out  # zero-initialised too, but upstream
    assert (hint_out.weight == 0).all()
    trainable = [p for p in controlnet.parameters() if p.requires_grad]
    train_steps(sd, ControlledUNet(sd.unet, controlnet), trainable)
    for zc in zero_convolutions(controlnet):
        assert zc.weight.abs().sum() > 0  # Eq. 8: the gradient w.r.t. a zero conv's weight is not zero
    # ... while everything behind the zero convs got a zero gradient at step 1, and learns from step 2 on
    assert (hint_out.weight == 0).all()
    train_steps(sd, ControlledUNet(sd.unet, controlnet), trainable, steps=2, seed=1)
    assert hint_out.weight.abs().sum() > 0
    for name, module in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder)):
        assert changed(locked[name], module) == set(), name
    assert all(p.grad is None for p in sd.unet.parameters())


def test_after_unlocking_the_decoder_trains_and_the_encoder_does_not(sd):
    controlnet = build_controlnet(sd.unet)
    freeze_for_training(sd, controlnet, middle_only=False)
    before = snapshot(sd.unet)
    params = [p for p in controlnet.parameters() if p.requires_grad] + unlock_decoder(sd.unet)
    train_steps(sd, ControlledUNet(sd.unet, controlnet), params, steps=2)
    moved = changed(before, sd.unet)
    decoder = {id(p) for p in decoder_parameters(sd.unet)}
    names = {n for n, p in sd.unet.named_parameters() if id(p) in decoder}
    assert moved and moved <= names
    assert not any(n.startswith(("down_blocks", "mid_block", "conv_in", "time_embedding")) for n in moved)


def test_middle_only_mode_feeds_no_skip_connection(sd):
    controlnet = build_controlnet(sd.unet)
    for zc in zero_convolutions(controlnet):  # as if trained: the residuals are now non-zero
        torch.nn.init.normal_(zc.weight, std=0.1)
    seen = {}

    def capture(module, args, kwargs):
        seen["down"] = kwargs["down_block_additional_residuals"]
        seen["mid"] = kwargs["mid_block_additional_residual"]

    hook = sd.unet.register_forward_pre_hook(capture, with_kwargs=True)
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([5, 500])
    text = encode_prompts(sd, ["a", "b"], torch.device("cpu"))
    _, condition = batch()
    with torch.no_grad():
        middle = ControlledUNet(sd.unet, controlnet, middle_only=True)(latents, timesteps, text, condition)
        assert all((r == 0).all() for r in seen["down"]) and seen["mid"].abs().sum() > 0
        full = ControlledUNet(sd.unet, controlnet)(latents, timesteps, text, condition)
        assert any((r != 0).any() for r in seen["down"])
        hook.remove()
        plain = sd.unet(latents, timesteps, encoder_hidden_states=text).sample
    assert not torch.equal(middle, plain) and not torch.equal(middle, full)

    freeze_for_training(sd, controlnet, middle_only=True)
    trainable = {n for n, p in controlnet.named_parameters() if p.requires_grad}
    assert not any(n.startswith("controlnet_down_blocks") for n in trainable)
    assert any(n.startswith("controlnet_mid_block") for n in trainable)


def test_latents_of_a_half_precision_vae_are_noised_in_fp32(sd):
    """On a GPU the trainer casts the frozen VAE to its autocast dtype (bf16 on A100/H100), and its latents were
    noised in bf16, where the scheduler's alphas_cumprod rounds to 1 at t = 0: those steps trained on latents with no
    noise in them. Two train timesteps here, so that some rows draw t = 0."""
    from diffusers import DDPMScheduler

    torch.nn.Module.to(sd.vae, dtype=torch.bfloat16)  # as Trainer casts the frozen modules under bf16 autocast
    sd.noise_scheduler = DDPMScheduler.from_config(sd.noise_scheduler.config, num_train_timesteps=2)
    seen = {}

    def model(noisy, timesteps, text, condition):
        seen.update(noisy=noisy, t=timesteps)
        return noisy

    pixels = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    diffusion_loss(sd, model, pixels, None, None, torch.Generator().manual_seed(0))
    clean = to_model_space(sd, pixels, torch.Generator().manual_seed(0)).double()  # the loss's first draw
    alpha = sd.noise_scheduler.alphas_cumprod.double()[seen["t"]].view(-1, 1, 1, 1)
    noise = (seen["noisy"].double() - alpha.sqrt() * clean) / (1 - alpha).sqrt()  # unit Gaussian, row by row
    assert (seen["t"] == 0).any()
    stds = noise.flatten(1).std(dim=1)
    assert ((stds > 0.8) & (stds < 1.2)).all(), stds  # bf16: 0 where t = 0
    assert seen["noisy"].dtype == torch.float32


def save_fp16_only(sd, tiny_sd_path, folder):
    """The tiny SD as `from_pretrained(..., variant="fp16")` downloads it: only `<name>.fp16.safetensors`."""

    shutil.copytree(tiny_sd_path, folder)
    for name in ("text_encoder", "unet", "vae"):
        for weights in (folder / name).glob("*.safetensors"):
            weights.unlink()
        getattr(sd, name).to(torch.float16).save_pretrained(folder / name, variant="fp16")
    return folder


def test_a_base_downloaded_as_its_fp16_variant_loads_as_fp32(tiny_sd_path, sd, tmp_path):
    """`from_pretrained(..., variant="fp16")` downloads only `<name>.fp16.safetensors`: the trainer and the dataset
    job's --latents load such a folder (the fp16 weights, as fp32), where from_pretrained alone finds no weights."""
    from annotate.latents import LatentEncoder
    from annotate.weights import weights_variant

    fp16 = save_fp16_only(sd, tiny_sd_path, tmp_path / "fp16-base")
    assert weights_variant(str(fp16), "unet") == "fp16" and weights_variant(str(tiny_sd_path), "unet") is None
    assert weights_variant("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet") is None  # hub ids: the library's

    loaded = load_base_model(str(fp16))
    for name in ("text_encoder", "unet", "vae"):
        module, original = getattr(loaded, name), getattr(sd, name).to(torch.float32)
        assert module.dtype == torch.float32
        rounded = {k: v.to(torch.float16).float() for k, v in original.state_dict().items()}
        assert all(torch.equal(v, rounded[k]) for k, v in module.state_dict().items())  # fp16 weights, upcast
    encoder = LatentEncoder(str(fp16), device="cpu")
    assert encoder.vae.dtype == torch.float32


def test_a_hub_id_whose_cache_holds_only_the_fp16_variant_loads_offline(tiny_sd_path, sd, tmp_path, monkeypatch):
    """`--base-model org/name` (and `--latents org/name`) with HF_HUB_OFFLINE=1 and a hub cache holding only the fp16
    files: loaded from the cached snapshot as a local folder, the variant as fp32. Given the id, from_pretrained
    looked for the plain weights, and the run ended in 'does not appear to have a file named model.safetensors'.
    An id that is not cached is one line naming the option and the cache."""
    from huggingface_hub import constants

    from annotate.latents import LatentEncoder
    from annotate.weights import MissingWeightsError

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-fp16"  # huggingface_hub's cache layout
    save_fp16_only(sd, tiny_sd_path, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no folder org/tiny-fp16 here: the id is a hub id

    loaded = load_base_model("org/tiny-fp16")
    rounded = {k: v.to(torch.float16).float() for k, v in sd.unet.to(torch.float32).state_dict().items()}
    assert loaded.unet.dtype == torch.float32
    assert all(torch.equal(v, rounded[k]) for k, v in loaded.unet.state_dict().items())
    assert LatentEncoder("org/tiny-fp16", device="cpu").vae.dtype == torch.float32

    with pytest.raises(MissingWeightsError, match=r"^--base-model org/absent: not a local folder, nor in the Hugging "
                       r"Face hub cache \(.*hub\), and HF_HUB_OFFLINE=1 forbids downloading it$"):
        load_base_model("org/absent")
    with pytest.raises(MissingWeightsError, match=r"^--latents org/absent: not a local folder, .* forbids"):
        LatentEncoder("org/absent", device="cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, an id is left to the libraries, as before
    from train.model import local_model_folder

    assert local_model_folder("org/tiny-fp16") == "org/tiny-fp16"


def test_a_folder_with_several_variants_and_no_plain_weights_is_left_to_the_library(tmp_path):
    from annotate.weights import weights_variant

    (tmp_path / "unet").mkdir()
    for name in ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bf16.safetensors"):
        (tmp_path / "unet" / name).write_bytes(b"")
    assert weights_variant(str(tmp_path), "unet") is None
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert weights_variant(str(tmp_path), "unet") is None
    (tmp_path / "vae").mkdir()
    for shard in ("diffusion_pytorch_model.fp16-00001-of-00002.safetensors",  # as diffusers shards a variant
                  "diffusion_pytorch_model.safetensors.index.fp16.json", "config.json"):
        (tmp_path / "vae" / shard).write_bytes(b"")
    assert weights_variant(str(tmp_path), "vae") == "fp16"
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "model-00001-of-00002.fp16.safetensors").write_bytes(b"")  # the older order
    assert weights_variant(str(tmp_path), "text_encoder") == "fp16"


def test_loading_the_models_warns_about_nothing_missing(tiny_sd_path, sd, tmp_path):
    """diffusers asks for `accelerate` (not a dependency) on every load unless told which loading to use: six
    lines each, twice per training run, per dataset worker with --latents, per export. A base saved as .bin files
    only (an older save) loaded with an error line and 'Defaulting to unsafe serialization' for each component."""
    import logging

    from annotate.latents import LatentEncoder

    loaded = load_base_model(str(tiny_sd_path))
    build_controlnet(loaded.unet).save_pretrained(tmp_path / "controlnet")
    pickled = tmp_path / "bin-only-base"
    shutil.copytree(tiny_sd_path, pickled)
    for name in ("unet", "vae"):
        for weights in (pickled / name).glob("*.safetensors"):
            weights.unlink()
        getattr(sd, name).save_pretrained(pickled / name, safe_serialization=False)
    warnings: list[str] = []
    seen = logging.Handler(logging.WARNING)
    seen.emit = lambda record: warnings.append(record.getMessage())
    library = logging.getLogger("diffusers")  # its own handler prints to stderr; it does not propagate
    library.addHandler(seen)
    try:
        build_controlnet(loaded.unet, pretrained=tmp_path / "controlnet")
        load_base_model(str(tiny_sd_path))
        LatentEncoder(str(tiny_sd_path), device="cpu")
        assert torch.equal(load_base_model(str(pickled)).unet.conv_in.weight, sd.unet.conv_in.weight)
        LatentEncoder(str(pickled), device="cpu")
    finally:
        library.removeHandler(seen)
    assert warnings == []


@pytest.mark.parametrize("component, dropped", [("unet", "mid_block."), ("text_encoder", "layers.1."),
                                                ("vae", "decoder.")])
def test_a_base_whose_weights_lack_tensors_is_refused_not_trained_on_random_ones(tiny_sd_path, tmp_path, component,
                                                                                 dropped):
    """diffusers and transformers filled the tensors a component's file lacks with their random init, with a warning
    in the log, and the run trained its ControlNet on that base."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(tiny_sd_path, tmp_path / "base"))
    [weights] = (base / component).glob("*.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if dropped not in k}, weights)
    with pytest.raises(ValueError, match=rf"{base} is not the {component}/ \(\w+\) of a base model: its weights lack "
                                         rf"\d+ of the model's tensors") as err:
        load_base_model(str(base))
    assert "\n" not in str(err.value)


def test_a_base_predicting_another_target_is_refused_not_trained_against_the_noise(tiny_sd_path, tmp_path):
    """A scheduler may say prediction_type "sample" (x0): the loss took every type but v_prediction for epsilon and
    trained the ControlNet against the noise, which that base does not predict (diffusers' training scripts refuse
    it, as validation's sampler, reading the same config, then decodes x0)."""
    import json
    import shutil

    base = Path(shutil.copytree(tiny_sd_path, tmp_path / "base"))
    config = base / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match=r"scheduler/ predicts 'sample'.*epsilon or v_prediction") as err:
        load_base_model(str(base))
    assert str(base) in str(err.value) and "\n" not in str(err.value)


def test_a_remote_base_is_copied_once_per_version_and_copies_that_killed_processes_abandoned_are_removed(
        s3_endpoint, tmp_path, monkeypatch, python):
    """Each worker copies an s3:// base into a partial copy of its own, renamed into place once whole: one killed
    mid-copy (a stop as the run starts, a preemption) left its partial for good, gigabytes at SD scale, as did an
    actor's copy of a remote --weights. The next copy removes those whose process is gone (its lock free); one being
    written now, and another host's, stay. The base was also kept by URL alone: replaced there, it went on being
    used."""
    import signal
    import socket
    import subprocess

    import fsspec

    from tests.conftest import REPO
    from train.model import local_model_folder

    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-base-copy")
    fs.pipe({"cnd-base-copy/base/model_index.json": b'{"v": 1}', "cnd-base-copy/base/unet/config.json": b"{}"})
    monkeypatch.setattr("annotate.weights.DEFAULT_CACHE", tmp_path / "cache")
    folder = Path(local_model_folder("s3://cnd-base-copy/base"))
    assert (folder / "model_index.json").read_text() == '{"v": 1}' and [p.name for p in folder.parent.iterdir()] \
        == [folder.name]  # nothing beside the whole copy

    copying = ("import sys, time\nfrom pathlib import Path\nfrom annotate.weights import claimed\n"
               "with claimed(Path(sys.argv[1])):\n    (Path(sys.argv[1]) / 'unet').mkdir(parents=True)\n"
               "    print('copying', flush=True)\n    time.sleep(600)\n")
    here = f"{folder.name}.partial@{socket.gethostname()}@"
    killed, live, elsewhere = (folder.with_name(name) for name in (f"{here}dead", f"{here}live",
                                                                   f"{folder.name}.partial@another-host@gone"))
    processes = [subprocess.Popen([python, "-c", copying, str(partial)], cwd=REPO, stdout=subprocess.PIPE, text=True)
                 for partial in (killed, live)]
    try:
        assert [p.stdout.readline() for p in processes] == ["copying\n"] * 2
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait()
        elsewhere.mkdir()
        elsewhere.with_name(elsewhere.name + ".lock").touch()  # its holder cannot be seen from this host
        shutil.rmtree(folder)
        assert Path(local_model_folder("s3://cnd-base-copy/base")) == folder and folder.is_dir()
        assert sorted(p.name for p in folder.parent.iterdir()) == sorted(
            [folder.name, live.name, live.name + ".lock", elsewhere.name, elsewhere.name + ".lock"])
    finally:
        processes[1].kill()
        processes[1].wait()

    fs.pipe_file("cnd-base-copy/base/model_index.json", b'{"v": 2}')  # the base replaced at the same URL
    fs.invalidate_cache()
    assert (Path(local_model_folder("s3://cnd-base-copy/base")) / "model_index.json").read_text() == '{"v": 2}'
