"""the training step's speed levers change how it runs, not what it computes: the empty prompt encoded once,
no per-step walk over module modes, and --compile"""
import dataclasses
from functools import partial

import pytest
import torch

from train.config import debug
from train.loop import LossWindow, Trainer
from train.model import FrozenPromptEncoder, encode_prompts, load_base_model
from train.sampling import sample
from train.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return str(build_tiny_sd(tmp_path_factory.mktemp("step") / "tiny-sd"))


def trainer(tiny_sd: str, **overrides) -> Trainer:
    torch.manual_seed(0)  # the same ControlNet initialisation for every trainer
    cfg = dataclasses.replace(debug(), base_model=tiny_sd, resolution=64, batch_size=3, **overrides)
    return Trainer(cfg, 0, 1, torch.device("cpu"))


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(3, 3, 64, 64, generator=g) * 2 - 1,
            "conditioning_pixel_values": (torch.rand(3, 3, 64, 64, generator=g) > 0.8).float(),
            "caption": ["a red square", "", "a red square" if seed % 2 else "a blue circle"]}


def test_each_caption_is_encoded_once_and_the_empty_prompt_once_per_run(tiny_sd):
    base = load_base_model(tiny_sd)
    rows = []
    base.text_encoder.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    encoder = FrozenPromptEncoder(base, torch.device("cpu"))
    captions = [["a cat", "", "a dog", "a cat", ""], ["", "a bird"], ["", ""]]
    for batch_captions in captions:
        assert torch.allclose(encoder(batch_captions), encode_prompts(base, batch_captions, torch.device("cpu")),
                              atol=1e-6)
    # rows through the text encoder, encoder's calls then encode_prompts' (all rows) for each batch:
    # "a cat", "a dog" + the empty prompt once; "a bird"; nothing new
    assert rows == [2, 1, 5, 1, 2, 2]


def test_a_step_leaves_the_locked_base_in_eval_and_the_controlnet_training(tiny_sd):
    t = trainer(tiny_sd)
    generator = torch.Generator().manual_seed(0)
    t.train_step([batch(0)], generator)
    sample(t.base, t.controlnet, batch(1)["conditioning_pixel_values"], ["a"] * 3, steps=1, device=t.device)
    t.train_step([batch(1)], generator)
    assert not any(m.training for base in t.base.frozen_modules for m in base.modules())
    assert all(m.training for m in t.controlnet.modules())


def test_compiled_training_computes_what_eager_training_does(tiny_sd, monkeypatch):
    """Dynamo captures the step and runs what it captured (run eagerly: inductor's code generation takes minutes on
    two cores); the weights stay the ControlNet's, and unlocking the decoder compiles the re-wrapped model (its
    step is not run here: another capture, ~10 s)."""
    captured = []

    def run_eagerly(graph, example_inputs):
        captured.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend=run_eagerly))
    eager, compiled = trainer(tiny_sd), trainer(tiny_sd, compile=True)
    assert type(compiled.model).__name__ == "OptimizedModule" and compiled.model._orig_mod is compiled.module
    for step in range(2):
        losses = [t.train_step([batch(step)], torch.Generator().manual_seed(step)) for t in (eager, compiled)]
        torch.testing.assert_close(losses[0], losses[1])
    assert captured  # the compiled trainer's step went through Dynamo
    for (name, a), b in zip(eager.controlnet.state_dict().items(), compiled.controlnet.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)
    previous = compiled.model
    compiled.unlock_decoder()
    assert type(compiled.model).__name__ == "OptimizedModule" and compiled.model is not previous
    assert compiled.model._orig_mod is compiled.module


def test_a_checkpoint_of_a_run_without_the_grad_scaler_resumes_under_fp16(tiny_sd, tmp_path):
    """A run that trained without the grad scaler (on the CPU, or under bf16) saves its disabled scaler's empty
    state; a resume under fp16 (--mixed-precision fp16, or auto on a GPU without bf16) loaded it into its enabled
    scaler, which refuses an empty state: every restart failed the same way. A CPU scaler stands in for CUDA's."""
    saved = trainer(tiny_sd)
    saved.train_step([batch(0)], torch.Generator().manual_seed(0))
    saved.state.step = 1
    saved.save(tmp_path)
    resumed = trainer(tiny_sd)
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what --mixed-precision fp16 makes on a GPU
    resumed.load(tmp_path)
    assert resumed.state.step == 1 and resumed.scaler.get_scale() == 2.0**16


def test_the_log_window_reports_the_share_of_its_time_spent_waiting_for_data():
    now = [0.0]
    window = LossWindow(clock=lambda: now[0])
    for step in (1, 2):
        now[0] += 0.25  # the loop waits for its next batch ...
        window.waited_for_data(0.25)
        now[0] += 0.75  # ... then steps
        window.add(step, torch.tensor(float(step)))
    history, speed = window.read(samples_per_step=4)
    assert history == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    assert speed == {"samples_per_s": 4.0, "step_time_s": 1.0, "data_wait_fraction": 0.25}
    now[0] += 1.0
    window.add(3, torch.tensor(3.0))
    assert window.read(samples_per_step=4)[1]["data_wait_fraction"] == 0.0  # each window counts its own waits
