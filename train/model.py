"""the ControlNet model (paper Sec. 3): a locked base model, its trainable copy, and the Eq. 10 loss"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

PACKAGED = Path(__file__).resolve().parent
PACKAGED_MODELS = ("toy_base",)  # base models committed inside train/, found from any working directory
# diffusers' default condition embedding: 3 stride-2 convs bring a 512 px map to SD's 64 px latents (8x)
LATENT_EMBEDDING_CHANNELS = (16, 32, 96, 256)


@dataclass
class BaseModel:
    """The locked parts: tokenizer, text encoder, UNet, the training noise scheduler, and the VAE of a latent
    diffusion model (Stable Diffusion); `vae` is None for a pixel-space base, whose UNet denoises pixels."""

    tokenizer: Any
    text_encoder: nn.Module
    unet: nn.Module
    noise_scheduler: Any
    vae: nn.Module | None = None

    @property
    def downsampling(self) -> int:
        """Image pixels per UNet sample along a side: 8 for SD's VAE, 1 in pixel space."""
        return vae_downsampling(self.vae.config if self.vae is not None else None)

    @property
    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.vae, self.unet) if m is not None]


def load_base_model(base_model: str) -> BaseModel:
    """A base in diffusers layout (hub id, or a local/S3 folder): tokenizer/, text_encoder/, unet/, scheduler/,
    and vae/ when it is a latent model; model_index.json says whether it has one."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from annotate.weights import diffusers_loading, load_complete_model, pickle_only

    source = local_model_folder(base_model)
    components = DiffusionPipeline.load_config(source)
    has_vae = components.get("vae") not in (None, [None, None])

    def complete(model_class: Any, subfolder: str, dtype_arg: str = "torch_dtype", **kwargs: Any) -> nn.Module:
        # a file lacking some of the component's tensors is refused in one line: diffusers and transformers leave
        # those at their random init with a warning in the log, and the run trained on that base
        load = partial(model_class.from_pretrained, **component_weights(source, subfolder, dtype_arg), **kwargs)
        return load_complete_model(load, source, f"the {subfolder}/ ({model_class.__name__}) of a base model")

    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    refuse_prediction_type(noise_scheduler.config.prediction_type, source)
    return BaseModel(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
        text_encoder=complete(CLIPTextModel, "text_encoder", dtype_arg="dtype"),
            unet=complete(UNet2DConditionModel, "unet", **diffusers_loading(), **pickle_only(source, "unet")),
        noise_scheduler=noise_scheduler,
        vae=complete(AutoencoderKL, "vae", **diffusers_loading(), **pickle_only(source, "vae")) if has_vae else None,
    )


TRAINED_PREDICTIONS = ("epsilon", "v_prediction")  # the targets diffusion_loss trains against


def refuse_prediction_type(prediction_type: str, source: str) -> None:
    """A base whose UNet predicts another target (diffusers' "sample", x0) is refused in one line, as diffusers'
    training scripts refuse it: the loss trained it against the noise."""
    if prediction_type not in TRAINED_PREDICTIONS:
        raise ValueError(f"{source}: its scheduler/ predicts {prediction_type!r}; the trainer trains bases that "
                         f"predict {' or '.join(TRAINED_PREDICTIONS)}")


def component_weights(source: str, subfolder: str, dtype_arg: str = "torch_dtype") -> dict[str, Any]:
    """from_pretrained's arguments for one component: where a local base holds only a variant's weights (an fp16
    download), that variant, loaded as fp32 (the trainer casts the frozen parts to its autocast dtype itself, and
    the ControlNet copied from the UNet keeps fp32 master weights). `dtype_arg`: transformers calls it dtype."""
    from annotate.weights import weights_variant

    variant = weights_variant(source, subfolder)
    return {"subfolder": subfolder, **({"variant": variant, dtype_arg: torch.float32} if variant else {})}


def local_model_folder(base_model: str) -> str:
    """Hub ids and local folders pass through (offline, a hub id is its cached snapshot: offline_hub_folder); other
    URLs (s3://...) are copied to the local cache once per version of the folder (annotate.weights.fetch_folder,
    as a remote --weights or --controlnet is: a copy kept by URL alone went on being used once the base there was
    replaced).

    The debug preset's tiny SD is rebuilt where it is missing (on another node of a cluster): it is
    deterministic, so every node gets the same weights.
    """
    from annotate.weights import fetch_folder, offline_hub_folder

    if "://" not in base_model or base_model.startswith("file://"):
        local = base_model.removeprefix("file://")
        packaged = PACKAGED / Path(local).name
        if Path(local).name in PACKAGED_MODELS and not Path(local).exists():  # another cwd or another node:
            return str(packaged)  # this process's own copy of the model shipped in train/
        if Path(local).name == "tiny-sd" and not (Path(local) / "model_index.json").exists():
            from train.tiny_sd import build_tiny_sd

            build_tiny_sd(Path(local))
        return offline_hub_folder(local, "--base-model")
    return str(fetch_folder(base_model))


def check_local_base_model(base_model: str) -> None:
    """A --base-model given as a local path (absolute, ./, ../, ~, file://, or in a folder here) must be a diffusers
    model folder: a typo is one line on the driver, not a hub lookup in every worker after Ray starts. Hub ids
    ("org/name") and other URLs are left to the loader, as are the models local_model_folder builds or ships
    (tiny-sd, toy_base)."""
    if "://" in base_model and not base_model.startswith("file://"):
        return
    local = Path(base_model.removeprefix("file://")).expanduser()
    if local.name == "tiny-sd" or local.name in PACKAGED_MODELS:
        return
    if not names_local_path(base_model):
        return  # a hub id ('org/name'); a folder of that name here is what diffusers would load, and is checked
    if not (local / "model_index.json").is_file():
        raise FileNotFoundError(f"--base-model {base_model}: no model_index.json there (a local base is a folder in "
                                "diffusers layout; hub ids and s3:// URLs also work)")
    try:
        missing = missing_components(local)
    except json.JSONDecodeError as e:
        raise ValueError(f"--base-model {base_model}: model_index.json is not JSON ({e})") from None
    if missing:
        raise FileNotFoundError(f"--base-model {base_model}: {'; '.join(missing)} (the trainer loads the tokenizer, "
                                "text encoder, UNet, scheduler and, for a latent model, the VAE)")
    unfit = [refusal for name in weighted_components(local) if (refusal := weights_refusal(local, name))]
    if unfit:
        raise ValueError(f"--base-model {base_model}: {'; '.join(unfit)}")
    try:  # diffusers' default, where the config leaves it out, is epsilon
        scheduler = json.loads((local / "scheduler" / "scheduler_config.json").read_text())
    except ValueError as e:
        raise ValueError(f"--base-model {base_model}: scheduler/scheduler_config.json is not JSON ({e})") from None
    refuse_prediction_type(scheduler.get("prediction_type", "epsilon"), f"--base-model {base_model}")


def names_local_path(model: str) -> bool:
    """Whether a model argument names a local path (absolute, ./, ../, ~, file://, a path here, or one in a folder
    here: 'data/nope' is a typo, not the hub's org 'data') rather than a hub id ('org/name') or a remote URL."""
    if "://" in model:
        return model.startswith("file://")
    local = Path(model).expanduser()
    in_a_folder_here = len(local.parts) > 1 and local.parent.is_dir()
    return local.is_absolute() or model.startswith((".", "~")) or local.exists() or in_a_folder_here


# what load_base_model reads from each component's folder: a file it needs, and whether it holds weights
BASE_COMPONENTS = {"tokenizer": (None, False), "text_encoder": ("config.json", True), "unet": ("config.json", True),
                   "scheduler": ("scheduler_config.json", False), "vae": ("config.json", True)}


def missing_components(folder: Path) -> list[str]:
    """What a local base lacks of what load_base_model reads ('unet/: no config.json'), found before Ray starts
    rather than in a worker's traceback once per restart. The VAE only where model_index.json names one."""
    index = json.loads((folder / "model_index.json").read_text())
    missing = []
    for name, (needed_file, has_weights) in BASE_COMPONENTS.items():
        if name == "vae" and index.get("vae") in (None, [None, None]):
            continue
        component = folder / name
        if not component.is_dir():
            missing.append(f"no {name}/ folder")
        elif needed_file and not (component / needed_file).is_file():
            missing.append(f"{name}/: no {needed_file}")
        elif has_weights and not any(p.suffix in (".safetensors", ".bin") for p in component.iterdir()):
            missing.append(f"{name}/: no weights (.safetensors or .bin)")
    return missing


# the class load_base_model builds each weighted component as, whatever model_index.json names
BASE_CLASSES = {"text_encoder": ("transformers", "CLIPTextModel"), "unet": ("diffusers", "UNet2DConditionModel"),
                "vae": ("diffusers", "AutoencoderKL")}


def weighted_components(folder: Path) -> list[str]:
    """The components of a (structurally whole: missing_components) local base whose weights load_base_model loads."""
    index = json.loads((folder / "model_index.json").read_text())
    return [name for name in BASE_CLASSES if name != "vae" or index.get("vae") not in (None, [None, None])]


def weights_refusal(folder: Path, name: str) -> str | None:
    """Why a local base's component would not load whole ('unet/diffusion_pytorch_model.safetensors does not read
    (...)', 'vae/: its weights lack 2 of the AutoencoderKL's tensors (...)'), or None, from the files' indexes alone:
    the tensor names a model built from its config.json on the meta device holds (no memory, ~0.1 s for SD 1.5's
    UNet) against those its weight files name (safetensors' headers; a .bin's zip index). The workers load the
    base after Ray starts: a file cut short or lacking tensors failed there, in a traceback, and each of Ray
    Train's --max-failures restarts loaded the base again. NaN needs the tensors read: the workers find it
    (load_complete_model) and end the run at its first attempt (RunRefused)."""
    import importlib

    from annotate.weights import load_failure, one_line

    library, class_name = BASE_CLASSES[name]
    model_class = getattr(importlib.import_module(library), class_name)
    try:
        with torch.device("meta"):
            if library == "transformers":
                model = model_class._from_config(model_class.config_class.from_pretrained(folder / name))
            else:
                model = model_class.from_config(model_class.load_config(folder / name))
    except Exception as e:
        return f"{name}/config.json does not build a {class_name} ({type(e).__name__}: {one_line(e)})"
    files = component_weight_files(folder, name)
    if not files:
        return f"{name}/: no weight file of the names from_pretrained reads (e.g. diffusion_pytorch_model.safetensors)"
    found: set[str] = set()
    for path in files:
        try:
            names = tensor_names(path)
        except Exception as e:  # SafetensorError, RuntimeError (a zip cut short), UnpicklingError (code in a .bin)
            return f"{name}/{path.name} does not read ({type(e).__name__}: {load_failure(e)})"
        if names is None:
            return None  # a legacy .bin: the workers read it
        found |= names
    missing = sorted(set(model.state_dict()) - loaded_names(model, found))
    if missing:
        return f"{name}/: its weights lack {len(missing)} of the {class_name}'s tensors (e.g. {missing[:3]})"
    return None


def component_weight_files(folder: Path, name: str) -> list[Path]:
    """The weight files from_pretrained reads for a component: its variant's where it holds only those
    (weights_variant), its safetensors where it has any (diffusers and transformers prefer them), else its .bin;
    every shard of a sharded one."""
    from annotate.weights import _PLAIN_WEIGHTS, _VARIANT_WEIGHTS, weights_variant

    variant = weights_variant(str(folder), name)

    def read(file: str) -> bool:
        match = _VARIANT_WEIGHTS.fullmatch(file) if variant else _PLAIN_WEIGHTS.fullmatch(file)
        return bool(match) and (not variant or match.group(2) == variant)

    files = sorted(p for p in (folder / name).iterdir() if read(p.name))
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def tensor_names(path: Path) -> set[str] | None:
    """The names of the tensors a weight file holds, without reading them. safetensors' safe_open refuses a file
    shorter than its header's last tensor ends (cut short); a .bin (torch's zip) is read as its index, mmapped, its
    tensors on the meta device: one cut short has no central directory, one holding code is refused unrun
    (weights_only). None for a .bin in torch's legacy format (before 1.6), which cannot be mmapped: reading it whole
    here would load a multi-GB UNet twice, so the workers check it."""
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # a zip's first bytes; a legacy file is a pickle
            return None
    return set(torch.load(path, map_location="meta", mmap=True, weights_only=True))


def loaded_names(model: nn.Module, found: set[str]) -> set[str]:
    """The model's tensor names that a file naming `found` fills, as from_pretrained maps them: diffusers renames a
    VAE's attention weights saved under their old names (query -> to_q, ...); transformers fills a model from a
    file saved with its base model's prefix ('clip.') or without the one it has."""
    renamed = dict.fromkeys(found)
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix is not None:
        fix(renamed)
    names = set(renamed)
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        names |= {n.removeprefix(f"{prefix}.") for n in names} | {f"{prefix}.{n}" for n in names}
    return names


def plain_attention_on_cpu(device: torch.device, *modules: nn.Module) -> None:
    """On CPU, diffusers' plain attention (batched matmuls) instead of PyTorch's SDPA, whose CPU flash kernel is
    slow for small heads: a toy ControlNet step (32 px, batch 32) takes 17% less time. It holds the whole
    attention matrix (at SD 1.5's 4096 latent tokens, ~0.5 GB per sample); CUDA keeps SDPA."""
    if device.type != "cpu":
        return
    from diffusers.models.attention_processor import AttnProcessor

    for module in modules:
        module.set_attn_processor(AttnProcessor())


class ControlledUNet(nn.Module):
    """The locked UNet with its ControlNet: what DDP wraps, so an unlocked SD decoder syncs too.

    `middle_only` is the paper's small-scale mode: the ControlNet feeds the middle block only. Zeros, not
    None, go to the skip connections: diffusers drops the middle residual too when the skip list is None.
    Without a ControlNet it is the base alone (base pretraining, and the unconditional CFG branch).
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module | None, middle_only: bool = False):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.middle_only = middle_only

    def forward(self, noisy, timesteps, text_embeddings, condition=None) -> torch.Tensor:
        if self.controlnet is None:
            return self.unet(noisy, timesteps, encoder_hidden_states=text_embeddings).sample
        down_residuals, mid_residual = self.controlnet(
            noisy, timesteps, encoder_hidden_states=text_embeddings, controlnet_cond=condition, return_dict=False,
        )
        if self.middle_only:
            down_residuals = [torch.zeros_like(r) for r in down_residuals]
        return self.unet(
            noisy, timesteps, encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
        ).sample


def vae_downsampling(vae_config: Any) -> int:
    """Image pixels per latent along a side, from a VAE's (complete) config: one halving per encoder block after
    the first (8 for SD's); 1 without a VAE (pixel space)."""
    return 1 if vae_config is None else 2 ** (len(vae_config["block_out_channels"]) - 1)


def condition_embedding_channels(downsampling: int) -> tuple[int, ...]:
    """diffusers' condition embedding downsamples 2x per entry after the first: SD's (16, 32, 96, 256) for 8x
    latents, (16,) at full resolution for a pixel-space base."""
    stages = int(math.log2(downsampling))
    if 2**stages != downsampling or stages >= len(LATENT_EMBEDDING_CHANNELS):
        raise ValueError(f"no condition embedding for a {downsampling}x downsampling base (1, 2, 4 or 8)")
    return LATENT_EMBEDDING_CHANNELS[: stages + 1]


def build_controlnet(unet: nn.Module, downsampling: int = 8, pretrained: str | Path | None = None) -> nn.Module:
    """The trainable copy: encoder + middle block copied from the UNet, zero convolutions initialised to 0, and a
    condition embedding that brings the map to the UNet's sample size (`downsampling`: BaseModel.downsampling).
    `pretrained` (--controlnet): start from that ControlNet's weights instead (load_pretrained_controlnet)."""
    from diffusers import ControlNetModel

    if pretrained is not None:
        return load_pretrained_controlnet(str(pretrained), unet.config, downsampling)
    channels = condition_embedding_channels(downsampling)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)


CONDITION_CHANNELS = 3  # the condition maps reach the ControlNet as RGB (train.data repeats a 1-channel map)
# a ControlNet's settings that must be its base UNet's: it denoises the UNet's input, attends to the same text
# states, and its residuals are added to the UNet's skip connections and middle block, block by block
FITS_THE_UNET = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                 "class_embed_type", "addition_embed_type")


class NotAControlNet(ValueError):
    """A diffusers folder of another model (a UNet, a VAE): from_pretrained would build a random ControlNet of it."""


def with_defaults(model_class: Any, config: dict[str, Any]) -> dict[str, Any]:
    """A config.json's settings with the class's defaults for those it leaves out (as from_pretrained fills them)."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(model_class.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def controlnet_misfit(controlnet: dict[str, Any], unet: dict[str, Any], downsampling: int) -> list[str]:
    """Why a ControlNet's config cannot train on a base whose UNet has `unet` config and whose samples are
    1/`downsampling` of the image: 'block_out_channels [4, 8] (the base UNet's: [32, 64])', one per setting;
    empty when it fits. Both configs complete (with_defaults, or a loaded model's .config)."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value  # JSON's lists, a model's tuples

    misfit = [f"{name} {plain(controlnet.get(name))} (the base UNet's: {plain(unet.get(name))})"
              for name in FITS_THE_UNET if plain(controlnet.get(name)) != plain(unet.get(name))]
    if controlnet.get("conditioning_channels") != CONDITION_CHANNELS:
        misfit.append(f"conditioning_channels {controlnet.get('conditioning_channels')} (the condition maps train as "
                      f"{CONDITION_CHANNELS}-channel RGB)")
    embedding = controlnet.get("conditioning_embedding_out_channels") or ()
    brought_down = 2 ** max(len(embedding) - 1, 0)  # one stride-2 conv per entry after the first
    if brought_down != downsampling:
        misfit.append(f"conditioning_embedding_out_channels {plain(embedding)} bring the condition map down "
                      f"{brought_down}x (the base's samples are 1/{downsampling} of the image: "
                      f"{len(condition_embedding_channels(downsampling))} entries)")
    return misfit


def controlnet_class_refusal(config: dict[str, Any], folder: str | Path) -> None:
    """A config.json of another model's folder refused (NotAControlNet)."""
    kind = config.get("_class_name")
    if kind not in (None, "ControlNetModel"):
        raise NotAControlNet(f"{folder} holds {kind} weights, not a ControlNetModel's")


def load_controlnet(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The ControlNet in a diffusers folder, refused in one line (ValueError) when the folder holds another model
    (NotAControlNet) or weights that lack some of its tensors, hold NaN or inf, or do not read (a file cut short):
    from_pretrained built a ControlNet of random weights from the former. A folder holding only a variant's
    weights (fp16, as the published ControlNets are offered) loads as `dtype` too."""
    from diffusers import ControlNetModel

    from annotate.weights import diffusers_loading, load_complete_model, pickle_only, weights_variant

    controlnet_class_refusal(json.loads((Path(folder) / "config.json").read_text()), folder)
    # from_pretrained looks for the plain files unless told the variant
    load = partial(ControlNetModel.from_pretrained, variant=weights_variant(str(folder), ""), torch_dtype=dtype,
                   **diffusers_loading(), **pickle_only(str(folder), ""))
    return load_complete_model(load, folder, "a ControlNetModel")


def local_controlnet_folder(controlnet: str) -> Path:
    """--controlnet as a local folder holding config.json: a path as it is (or file://), a URL (s3://...) copied to
    a local cache (annotate.weights.fetch_folder, as a remote --weights folder is), a hub id
    ('lllyasviel/sd-controlnet-canny') from the Hugging Face hub's local cache only (the trainer never downloads
    weights); else a one-line FileNotFoundError."""
    if "://" in controlnet and not controlnet.startswith("file://"):
        from annotate.weights import fetch_folder

        # a copy per version of the folder (its listing's sizes and ETags), not per URL as a remote base's: an
        # export replaced at the same URL would otherwise start the next run from the old weights
        return fetch_folder(controlnet)
    local = Path(controlnet.removeprefix("file://")).expanduser()
    if not names_local_path(controlnet):
        from annotate.weights import hub_snapshot

        local = hub_snapshot(controlnet)
        if local is None:
            raise FileNotFoundError(f"{controlnet} is neither a folder here nor in the Hugging Face hub's local cache "
                                    f"(the trainer downloads nothing: `hf download {controlnet}` first)")
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{controlnet}: no config.json there (a ControlNet is a diffusers ControlNetModel "
                                "folder, as python -m train.export --format diffusers writes)")
    return local


def load_pretrained_controlnet(controlnet: str, unet: dict[str, Any], downsampling: int) -> nn.Module:
    """The ControlNet a run starts from (--controlnet), checked whole and finite (load_controlnet) and fitting the
    base (controlnet_misfit), in fp32 master weights; else a one-line ValueError or FileNotFoundError."""
    from diffusers import ControlNetModel

    model = load_controlnet(local_controlnet_folder(controlnet))
    refuse_misfit(controlnet, with_defaults(ControlNetModel, dict(model.config)), dict(unet), downsampling)
    return model


def refuse_misfit(controlnet: str, config: dict[str, Any], unet: dict[str, Any], downsampling: int) -> None:
    misfit = controlnet_misfit(config, unet, downsampling)
    if misfit:
        raise ValueError(f"{controlnet} does not fit the base model: {'; '.join(misfit)}")


def base_architecture(base_model: str) -> tuple[dict[str, Any], int] | None:
    """The base's UNet config (complete) and its downsampling, read from its config files where they are on this
    machine (a local folder, the packaged toy base); None for a hub id or a URL, whose files only a worker fetches,
    and for the debug preset's tiny SD before it is built (building it here printed the build's output above the
    check's one line)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if "://" in base_model and not base_model.startswith("file://"):
        return None
    folder = Path(base_model.removeprefix("file://")).expanduser()
    if folder.name in PACKAGED_MODELS and not folder.exists():
        folder = PACKAGED / folder.name  # as local_model_folder finds it
    elif not names_local_path(base_model):
        return None  # a hub id
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text()) if (folder / "vae").is_dir() else None
    except (OSError, ValueError):  # not built yet, or broken configs: check_local_base_model's to say
        return None
    downsampling = vae_downsampling(with_defaults(AutoencoderKL, vae) if vae is not None else None)
    return with_defaults(UNet2DConditionModel, unet), downsampling


def check_controlnet(controlnet: str, base_model: str) -> None:
    """--controlnet checked on the driver before Ray starts, each refusal a line: a folder (or URL) holding a
    ControlNet's config.json, fitting a base whose config is here; a local one (or one in the hub cache) is loaded
    too, so missing tensors or NaN weights are found here rather than by every worker after Ray starts. A remote
    one's weights are checked where the workers load them."""
    from diffusers import ControlNetModel

    architecture = base_architecture(base_model)
    if "://" in controlnet and not controlnet.startswith("file://"):
        fs, path = fsspec.core.url_to_fs(controlnet)
        try:
            config = json.loads(fs.cat_file(path.rstrip("/") + "/config.json"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{controlnet}: no config.json there (a ControlNet is a diffusers ControlNetModel "
                                    "folder)") from None
        controlnet_class_refusal(config, controlnet)
        if architecture:
            refuse_misfit(controlnet, with_defaults(ControlNetModel, config), *architecture)
        return
    if architecture:
        load_pretrained_controlnet(controlnet, *architecture)
    else:
        load_controlnet(local_controlnet_folder(controlnet))


def zero_convolutions(controlnet: nn.Module) -> list[nn.Module]:
    """The 1x1 convs joining ControlNet to SD (Eqs. 3-8), one per skip connection and one for the middle."""
    return [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]


def decoder_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The SD 'decoder' the paper unlocks for large-scale training: the UNet's up blocks and output head."""
    return [p for m in (unet.up_blocks, unet.conv_norm_out, unet.conv_out) for p in m.parameters()]


def freeze_for_training(base: BaseModel, controlnet: nn.Module, middle_only: bool) -> None:
    """The base locked; the ControlNet trains, except the skip zero-convs in middle-only mode (they feed nothing)."""
    for module in base.frozen_modules:
        module.requires_grad_(False)
        module.eval()
    controlnet.requires_grad_(True)
    controlnet.train()
    if middle_only:
        controlnet.controlnet_down_blocks.requires_grad_(False)


def unlock_decoder(unet: nn.Module) -> list[nn.Parameter]:
    params = decoder_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    unet.up_blocks.train()
    return params


def encode_prompts(base: BaseModel, captions: list[str], device: torch.device, grad: bool = False) -> torch.Tensor:
    """Captions -> text-encoder hidden states (B, L, D); "" is the empty prompt of prompt dropout and CFG.
    `grad`: keep the graph, for base pretraining, where the text encoder learns too."""
    ids = base.tokenizer(
        captions, padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device, non_blocking=True)  # a fresh tensor: without it the copy waits for the previous step's
    # kernels to finish on a GPU, a host sync every step
    with torch.set_grad_enabled(grad):
        return base.text_encoder(ids)[0]


class FrozenPromptEncoder:
    """encode_prompts for the locked text encoder of ControlNet training: each distinct caption of a batch is
    encoded once, and the empty prompt once per run. Prompt dropout empties about half of every batch (the paper's
    50%), so the text encoder runs on half the rows; a row's states do not depend on the other rows."""

    def __init__(self, base: BaseModel, device: torch.device):
        self.base, self.device = base, device
        self.empty: torch.Tensor | None = None  # (L, D), encoded on first use (in the text encoder's dtype)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        distinct = list(dict.fromkeys(c for c in captions if c))
        states = encode_prompts(self.base, distinct, self.device) if distinct else []
        encoded = dict(zip(distinct, states, strict=True))
        if self.empty is None and "" in captions:
            self.empty = encode_prompts(self.base, [""], self.device)[0]
        return torch.stack([encoded[c] if c else self.empty for c in captions])


def to_model_space(base: BaseModel, pixel_values: torch.Tensor | None, generator: torch.Generator,
                   latent_dist: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> what the UNet denoises: scaled VAE latents (B, 4, H/8, W/8) sampled from
    the encoder's distribution, or the pixels themselves in pixel space. `latent_dist` (B, 2, 4, H/8, W/8): that
    distribution's mean and std, stored by the dataset job, sampled here as the VAE's own sample() would."""
    if latent_dist is not None:
        mean, std = latent_dist[:, 0], latent_dist[:, 1]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * base.vae.config.scaling_factor
    if base.vae is None:
        return pixel_values
    with torch.no_grad():
        latents = base.vae.encode(pixel_values.to(base.vae.dtype)).latent_dist.sample(generator)
    return latents * base.vae.config.scaling_factor


def from_model_space(base: BaseModel, samples: torch.Tensor) -> torch.Tensor:
    """The inverse: UNet samples -> images (B, 3, H, W) in [-1, 1] (VAE-decoded in latent space)."""
    if base.vae is None:
        return samples
    return base.vae.decode(samples / base.vae.config.scaling_factor).sample


def diffusion_loss(
    base: BaseModel,
    model: nn.Module,
    pixel_values: torch.Tensor,
    condition: torch.Tensor | None,
    text_embeddings: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    latent_dist: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 10: || eps - eps_theta(z_t, t, c_t, c_f) ||^2 (v-prediction when the scheduler says so).

    pixel_values: (B, 3, H, W) in [-1, 1] (None with latent_dist, the stored latent distribution of those images);
    condition: (B, 3, H, W) in [0, 1], or None for the base alone.
    snr_gamma: Min-SNR loss weighting (Hang et al. 2023), which speeds up pretraining a base; the ControlNet
    trains on the paper's plain loss (None).
    """
    # noised in fp32: under autocast the frozen VAE (cast to bf16/fp16) returns half-precision latents, and the
    # scheduler casts its alphas_cumprod to their dtype, where bf16 rounds 0.99915 (t = 0) and 0.9983 (t = 1) to 1:
    # those steps got no noise at all, and the next ones a noise level 10-20% off the one their t says
    samples = to_model_space(base, pixel_values, generator, latent_dist).float()
    noise = torch.randn(samples.shape, generator=generator, device=samples.device, dtype=samples.dtype)
    steps = base.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (samples.shape[0],), generator=generator, device=samples.device)
    noisy = base.noise_scheduler.add_noise(samples, noise, timesteps)
    prediction = model(noisy, timesteps, text_embeddings, condition)
    v_prediction = base.noise_scheduler.config.prediction_type == "v_prediction"
    target = base.noise_scheduler.get_velocity(samples, noise, timesteps) if v_prediction else noise
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(base.noise_scheduler, timesteps)
    clamped = torch.clamp(snr, max=snr_gamma)  # (B,): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v
    weights = clamped / (snr + 1) if v_prediction else torch.where(snr > 0, clamped / snr.clamp(min=1e-20), 1.0)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
