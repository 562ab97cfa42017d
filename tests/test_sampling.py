"""validation sampling: DDIM or Euler ancestral + CFG, the control on the conditional branch or both; latent, pixel"""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionControlNetPipeline

from train.config import TOY_BASE
from train.model import ControlledUNet, build_controlnet, condition_embedding_channels, load_base_model
from train.sampling import sample
from train.tiny_sd import build_tiny_sd

CPU = torch.device("cpu")


def randomised(controlnet):
    """Every weight random, zero convs included, so the control visibly changes the samples."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return controlnet.eval()


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    base = load_base_model(str(build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")))
    return base, randomised(build_controlnet(base.unet, base.downsampling))


@pytest.fixture(scope="module")
def pixel():
    base = load_base_model(TOY_BASE)
    return base, randomised(build_controlnet(base.unet, base.downsampling))


class Counting(torch.nn.Module):
    """The ControlNet, recording the batch size of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, *args, **kwargs):
        self.calls.append(x.shape[0])
        return self.inner(x, *args, **kwargs)


@pytest.mark.parametrize("sampler, scheduler", [("ddim", DDIMScheduler), ("euler_a", EulerAncestralDiscreteScheduler)])
def test_both_branches_reproduce_diffusers_controlnet_pipeline(latent, sampler, scheduler):
    """Same images as diffusers' pipeline with the same scheduler and per-sample generators: for Euler ancestral
    that includes the noise drawn at every step."""
    base, controlnet = latent
    conditions = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    prompts = ["a red house", "a dog on the street"]
    ours = sample(base, controlnet, conditions, prompts, steps=3, guidance_scale=7.0, seed=5, branches="both",
                  sampler=sampler, device=CPU)
    pipeline = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, controlnet=controlnet,
        scheduler=scheduler.from_config(base.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(prompt=prompts, image=conditions, num_inference_steps=3, guidance_scale=7.0,
                      generator=[torch.Generator().manual_seed(5 + i) for i in range(2)], output_type="np",
                      height=64, width=64).images
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_cond_branch_only_feeds_the_control_to_the_conditional_samples(latent):
    base, controlnet = latent
    conditions = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    counting = Counting(controlnet)
    cond = sample(base, counting, conditions, ["a cat", "a tree"], steps=2, guidance_scale=9.0, branches="cond",
                  device=CPU)
    assert counting.calls == [2, 2]  # once per DDIM step, on the 2 conditional samples only
    counting.calls.clear()
    both = sample(base, counting, conditions, ["a cat", "a tree"], steps=2, guidance_scale=9.0, branches="both",
                  device=CPU)
    assert counting.calls == [4, 4] and not np.allclose(cond, both)
    # at CFG 1 there is no unconditional branch: the two are the same sampler
    one = [sample(base, controlnet, conditions, ["a cat", "a tree"], steps=2, guidance_scale=1.0, branches=b,
                  device=CPU) for b in ("cond", "both")]
    assert np.array_equal(*one)


def test_middle_only_sampling_matches_the_trained_model(latent):
    base, controlnet = latent
    conditions = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    middle = sample(base, controlnet, conditions, ["a dog"], steps=2, guidance_scale=1.0, middle_only=True,
                    device=CPU)
    full = sample(base, controlnet, conditions, ["a dog"], steps=2, guidance_scale=1.0, device=CPU)
    assert not np.allclose(middle, full)  # the skip residuals are really left out


def test_pixel_space_base_embeds_the_condition_at_full_resolution(pixel):
    base, controlnet = pixel
    assert base.vae is None and base.downsampling == 1
    assert tuple(controlnet.config.conditioning_embedding_out_channels) == (16,)
    fresh = build_controlnet(base.unet, base.downsampling)
    condition = torch.rand(2, 3, 32, 32)
    embedding = fresh.controlnet_cond_embedding(condition)
    assert embedding.shape == (2, base.unet.config.block_out_channels[0], 32, 32)  # no 8x stride in pixel space
    assert embedding.abs().max() == 0  # zero-initialised: a fresh ControlNet adds nothing
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    text = base.text_encoder(base.tokenizer(["a red circle on a white background", ""], padding="max_length",
                                            return_tensors="pt").input_ids)[0]
    with torch.no_grad():
        assert torch.equal(ControlledUNet(base.unet, fresh)(x, t, text, condition),
                           ControlledUNet(base.unet, None)(x, t, text))


def test_pixel_space_sampling_is_deterministic_and_in_range(pixel):
    base, controlnet = pixel
    conditions = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prompts = ["a red circle on a white background", "", "a blue star on a gray background"]
    first = sample(base, controlnet, conditions, prompts, steps=3, guidance_scale=9.0, seed=1, sampler="euler_a",
                   device=CPU)
    assert first.shape == (3, 32, 32, 3) and first.min() >= 0 and first.max() <= 1
    assert np.array_equal(first, sample(base, controlnet, conditions, prompts, steps=3, guidance_scale=9.0, seed=1,
                                        sampler="euler_a", device=CPU))
    # one sample's noise, the initial and the per-step draws, does not depend on the batch it is drawn in
    alone = sample(base, controlnet, conditions[1:2], prompts[1:2], steps=3, guidance_scale=9.0, seed=2,
                   sampler="euler_a", device=CPU)
    np.testing.assert_allclose(alone[0], first[1], atol=1e-4)  # batched kernels round differently
    ddim = sample(base, controlnet, conditions, prompts, steps=3, guidance_scale=9.0, seed=1, device=CPU)
    assert not np.allclose(ddim, first)


def test_condition_embedding_follows_the_base_downsampling():
    assert condition_embedding_channels(8) == (16, 32, 96, 256)  # SD: 512 px maps to 64 px latents
    assert condition_embedding_channels(1) == (16,)
    with pytest.raises(ValueError, match="3x"):
        condition_embedding_channels(3)
