"""The pipeline against diffusers' TextToVideoSDPipeline / VideoToVideoSDPipeline and
ModelScope's sampling loop, with the same weights and the same noise."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.text_to_video_synthesis import (TextToVideoSDPipeline,
                                                                    VideoToVideoSDPipeline)
from transformers import CLIPTokenizer

from layouts import (DIFF_TEXT, DIFF_UNET, DIFF_VAE, HUB_SCHEDULER, MS_UNET, MS_VAE,
                     diffusers_models, modelscope_models)
from helpers import assert_parity, diffusers_scheduler
from reference import modelscope_module
from t2v.config import ModelConfig
from t2v.errors import UserError
from t2v.pipeline.text_to_video import NumericalError, TextToVideo
from t2v.models.text_encoder import TextEncoder
from t2v.models.unet import UNet3D
from t2v.models.vae import AutoencoderKL
from t2v.loading.weights import build
from weights_convert.diffusers import schedule_config, tokenizer_files
from weights_convert.modelscope import unet_from_modelscope, vae_from_modelscope

FRAME_TOL = 1 / 255  # frames in [0, 1]: at most one 8-bit level apart
LATENT_TOL = 1e-5  # final latents, max |diff| relative to max |reference|
# Thresholded runs: clamping x0 decouples it from the noise estimate, so the UNets' float32
# differences (x9 by guidance) stop cancelling in the DDIM/DPM update (measured 9.7e-5 for
# DDIM, 3.7e-5 for DPM-Solver++ against 3.0e-6 / 4.7e-6 without; the samplers themselves are
# bit-identical with diffusers', tests/test_samplers_more.py).
THRESHOLDED_LATENT_TOL = 3e-4
PROMPTS = ["a red panda eating bamboo", "waves at sunset"]


@pytest.fixture(scope="module")
def components():
    text, unet, vae = diffusers_models(seed=3)
    folder = Path(tempfile.mkdtemp())
    for name, content in tokenizer_files().items():
        (folder / name).write_text(content)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    config = ModelConfig(text_encoder=DIFF_TEXT, unet=DIFF_UNET, vae=DIFF_VAE,
                         schedule=schedule_config(HUB_SCHEDULER))
    ours = TextToVideo(config,
                       build(lambda: TextEncoder(DIFF_TEXT), text.state_dict(), "text"),
                       build(lambda: UNet3D(DIFF_UNET), unet.state_dict(), "unet"),
                       build(lambda: AutoencoderKL(DIFF_VAE), vae.state_dict(), "vae"))
    return ours, (text, unet, vae, tokenizer)


def diffusers_pipeline(kind, reference, sampler, **scheduler_options):
    text, unet, vae, tokenizer = reference
    scheduler = diffusers_scheduler(sampler, **scheduler_options)  # from the hub's DDIM config
    pipe = kind(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("dpmsolver++", 8)])
def test_frames_match_diffusers_text_to_video(components, sampler, steps, negative):
    ours, reference = components
    latents = noise((2, 4, 3, 8, 8))  # 32x32 pixels: the tiny VAE has 3 levels (factor 4)
    pipe = diffusers_pipeline(TextToVideoSDPipeline, reference, sampler)
    expected = pipe(PROMPTS, negative_prompt=[negative] * 2, num_frames=3, height=32, width=32,
                    num_inference_steps=steps, guidance_scale=9.0, latents=latents.clone(),
                    output_type="np").frames
    actual = ours(PROMPTS, negative, num_frames=3, height=32, width=32, steps=steps,
                  sampler=sampler, latents=latents.clone(), output="float", progress=False)
    diff = np.abs(actual.frames.numpy() - expected).max()
    print(f"[parity] pipeline frames vs diffusers ({sampler}, negative={negative!r}): {diff:.2e}")
    assert actual.frames.shape == expected.shape == (2, 3, 32, 32, 3)
    assert diff <= FRAME_TOL
    # The final latents too: after the VAE and the clamp, frames at 1/255 hide differences.
    expected_latents = pipe(PROMPTS, negative_prompt=[negative] * 2, num_frames=3, height=32,
                            width=32, num_inference_steps=steps, guidance_scale=9.0,
                            latents=latents.clone(), output_type="latent").frames
    actual_latents = ours(PROMPTS, negative, num_frames=3, height=32, width=32, steps=steps,
                          sampler=sampler, latents=latents.clone(), output="latents",
                          progress=False).frames
    assert_parity(actual_latents, expected_latents, LATENT_TOL,
                  f"pipeline final latents vs diffusers ({sampler})")


@pytest.mark.parametrize("sampler", ["unipc", "euler", "euler_a", "sde-dpmsolver++"])
def test_more_samplers_match_diffusers_text_to_video(components, sampler):
    """t2v.sampling.unipc, t2v.sampling.samplers_sigma and the SDE solver in the whole pipeline; the same
    generator gives the stochastic ones diffusers' step noise."""
    ours, reference = components
    latents = noise((2, 4, 3, 8, 8), seed=5)
    pipe = diffusers_pipeline(TextToVideoSDPipeline, reference, sampler)
    expected = pipe(PROMPTS, num_frames=3, height=32, width=32, num_inference_steps=6,
                    guidance_scale=9.0, latents=latents.clone(), output_type="latent",
                    generator=torch.Generator().manual_seed(9)).frames
    actual = ours(PROMPTS, num_frames=3, height=32, width=32, steps=6, sampler=sampler,
                  latents=latents.clone(), generator=torch.Generator().manual_seed(9),
                  output="latents", progress=False).frames
    assert_parity(actual, expected, LATENT_TOL, f"pipeline final latents vs diffusers ({sampler})")


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_thresholding_matches_diffusers_text_to_video(components, sampler):
    """thresholding=True on both sides (diffusers: in the scheduler config); the threshold
    s = clamp(quantile(|x0|, 0.9), 1, 1.5) per frame engages on these latents."""
    ours, reference = components
    latents = noise((2, 4, 3, 8, 8), seed=6)
    options = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    pipe = diffusers_pipeline(TextToVideoSDPipeline, reference, sampler, **options)
    expected = pipe(PROMPTS, num_frames=3, height=32, width=32, num_inference_steps=6,
                    guidance_scale=9.0, latents=latents.clone(), output_type="latent").frames
    kwargs = dict(num_frames=3, height=32, width=32, steps=6, sampler=sampler, output="latents",
                  progress=False)
    actual = ours(PROMPTS, latents=latents.clone(), **options, **kwargs).frames
    assert_parity(actual, expected, THRESHOLDED_LATENT_TOL,
                  f"thresholded latents vs diffusers ({sampler})")
    plain = ours(PROMPTS, latents=latents.clone(), **kwargs).frames
    assert not torch.allclose(plain, actual)


def test_frames_match_modelscope_sampling_loop():
    """ModelScope's TextToVideoSynthesis.forward: ddim_sample_loop (50 steps, guidance 9, eta 0)
    on UNetSD with [cond, uncond] contexts, then the autoencoder decodes x0 / 0.18215."""
    ms_unet, ms_vae, _ = modelscope_models(seed=5)
    diffusion = modelscope_module("diffusion")
    gd = diffusion.GaussianDiffusion(diffusion.beta_schedule("linear_sd", 1000, 0.00085, 0.012),
                                     mean_type="eps", var_type="fixed_small", loss_type="mse")
    y, zero_y = noise((1, 77, 1024), 1), noise((1, 77, 1024), 2)
    x_t = noise((1, 4, 2, 8, 8), 3)
    with torch.no_grad():
        x0 = gd.ddim_sample_loop(x_t.clone(), ms_unet, model_kwargs=[{"y": y}, {"y": zero_y}],
                                 guide_scale=9.0, ddim_timesteps=50, eta=0.0)
        folded = (x0 / 0.18215).permute(0, 2, 1, 3, 4).reshape(2, 4, 8, 8)
        video = ms_vae.decode(folded).reshape(1, 2, 3, 32, 32).permute(0, 2, 1, 3, 4)
    expected = (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)

    config = ModelConfig(unet=MS_UNET, vae=MS_VAE)  # schedule: ModelScope's (the defaults)
    ours = TextToVideo(config, TextEncoder(config.text_encoder).to("meta"),  # not used here
                       build(lambda: UNet3D(MS_UNET), unet_from_modelscope(ms_unet.state_dict(),
                                                                           MS_UNET), "unet"),
                       build(lambda: AutoencoderKL(MS_VAE),
                             vae_from_modelscope(ms_vae.state_dict(), MS_VAE), "vae"))
    actual = ours(prompt_embeds=y, negative_prompt_embeds=zero_y, num_frames=2, height=32,
                  width=32, steps=50, latents=x_t.clone(), output="float", progress=False)
    diff = (actual.frames - expected).abs().max().item()
    print(f"[parity] pipeline frames vs ModelScope loop: {diff:.2e}")
    assert diff <= FRAME_TOL


def test_same_seed_is_bit_identical_and_reported(components):
    ours = components[0]
    kwargs = dict(num_frames=2, height=32, width=32, steps=3, progress=False)
    a, b = ours("a dog", seed=123, **kwargs), ours("a dog", seed=123, **kwargs)
    assert a.seed == b.seed == 123 and a.frames.dtype == torch.uint8
    assert torch.equal(a.frames, b.frames)
    c = ours("a dog", **kwargs)
    assert isinstance(c.seed, int)
    assert torch.equal(ours("a dog", seed=c.seed, **kwargs).frames, c.frames)
    g = torch.Generator().manual_seed(123)
    assert torch.equal(ours("a dog", generator=g, **kwargs).frames, a.frames)


def test_uint8_output_rounds_the_float_output(components):
    ours = components[0]
    kwargs = dict(num_frames=2, height=32, width=32, steps=2, seed=7, progress=False)
    as_float = ours("a dog", output="float", **kwargs).frames
    as_uint8 = ours("a dog", **kwargs).frames
    assert torch.equal(as_uint8, (as_float * 255).round().to(torch.uint8))
    latents = ours("a dog", output="latents", **kwargs).frames
    assert latents.shape == (1, 4, 2, 8, 8)


def test_guidance_one_skips_the_unconditional_pass(components):
    ours = components[0]
    batches = []
    hook = ours.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        ours(PROMPTS, num_frames=1, height=32, width=32, steps=2, guidance_scale=1.0,
             progress=False)
        assert batches == [2, 2]
        batches.clear()
        ours(PROMPTS, num_frames=1, height=32, width=32, steps=2, guidance_scale=9.0,
             progress=False)
        assert batches == [4, 4]
    finally:
        hook.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_keeps_the_sampler_state_in_float32(components, dtype):
    """A bfloat16 / float16 UNet gets its input in its own dtype; the latents between steps
    (what callbacks see), the guidance arithmetic and the result stay float32."""
    import copy

    ours = components[0]
    half = TextToVideo(ours.config, copy.deepcopy(ours.text_encoder).to(dtype),
                       copy.deepcopy(ours.unet).to(dtype), ours.vae)
    assert half.latent_dtype == torch.float32 and ours.latent_dtype == torch.float32
    inputs, states = [], []
    hook = half.unet.register_forward_hook(lambda m, args, out: inputs.append(args[0].dtype))

    def on_step(pipe, i, t, kwargs):
        states.append(kwargs["latents"].dtype)
        return kwargs

    try:
        out = half(PROMPTS[:1], latents=noise((1, 4, 2, 8, 8)), num_frames=2, height=32,
                   width=32, steps=3, output_type="latent", callback_on_step_end=on_step,
                   progress=False)
    finally:
        hook.remove()
    assert inputs == [dtype] * 3 and states == [torch.float32] * 3
    assert out.frames.dtype == torch.float32


def test_nan_latents_stop_the_run_with_the_step(components):
    ours = components[0]
    hook = ours.unet.register_forward_hook(lambda m, args, out: out * float("nan"))
    try:
        with pytest.raises(NumericalError, match=r"step 1 of 3 \(t=667\).*float32"):
            ours("a dog", num_frames=1, height=32, width=32, steps=3, progress=False)
    finally:
        hook.remove()


@pytest.mark.parametrize("bad, message", [
    (dict(height=30), "height must be a positive multiple of 8"),  # the family's KL-f8 VAE
    (dict(num_frames=0), "num_frames"),
    (dict(steps=0), "steps"),
    (dict(sampler="heun"), "sampler"),
    (dict(sampler="dpmsolver++", eta=0.5), "eta applies to the ddim sampler only"),
    (dict(prompt=["a dog", "a cat"], negative_prompt=["blurry"]),
     "1 negative prompts for 2 prompts"),
    (dict(prompt=["a dog", "a cat"], negative_prompt_embeds=torch.zeros(1, 77, 32)),
     "negative_prompt_embeds have shape"),
])
def test_bad_arguments(components, bad, message):
    kwargs = {**dict(prompt="a dog", num_frames=1, height=32, width=32, steps=2,
                     progress=False), **bad}
    with pytest.raises(UserError, match=message):
        components[0](**kwargs)


@pytest.mark.parametrize("x_batch, context_batch", [(2, 1), (3, 2), (1, 2)])
def test_unet_refuses_mismatched_batches(components, x_batch, context_batch):
    """x batch 2 with a context batch of 1 used to run silently (frames derived by division);
    now one clear error, before any layer runs."""
    unet = components[0].unet
    x = torch.zeros(x_batch, 4, 2, 8, 8)
    context = torch.zeros(context_batch, 77, unet.cfg.context_dim)
    with pytest.raises(ValueError, match=f"context must be \\(batch {x_batch}"):
        unet(x, 10, context)
    with pytest.raises(ValueError, match="t must be a number or have 1 or"):
        unet(torch.zeros(2, 4, 2, 8, 8), torch.tensor([1, 2, 3]),
             torch.zeros(2, 77, unet.cfg.context_dim))


def test_video_to_video_strength_zero_is_the_reconstruction(components):
    ours = components[0]
    video = noise((1, 3, 2, 32, 32), 4).clamp(-1, 1)
    result = ours("a dog", init_video=video, strength=0.0, seed=5, output="float",
                  progress=False)
    latents = ours.vae.encode_video(video, torch.Generator().manual_seed(5))
    expected = (ours.vae.decode_video(latents) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)
    assert torch.equal(result.frames, expected)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "unipc", "euler", "euler_a",
                                     "sde-dpmsolver++"])
def test_video_to_video_matches_diffusers(components, sampler):
    ours, reference = components
    video = noise((1, 3, 3, 32, 32), 6).clamp(-1, 1)
    frames = [((f.permute(1, 2, 0).numpy() + 1) / 2) for f in video[0].permute(1, 0, 2, 3)]
    pipe = diffusers_pipeline(VideoToVideoSDPipeline, reference, sampler)
    expected = pipe("a dog", video=frames, strength=0.6, num_inference_steps=10,
                    guidance_scale=15.0, generator=torch.Generator().manual_seed(8),
                    output_type="np").frames
    actual = ours("a dog", init_video=video, strength=0.6, steps=10, guidance_scale=15.0,
                  sampler=sampler, generator=torch.Generator().manual_seed(8), output="float",
                  progress=False)
    diff = np.abs(actual.frames.numpy() - expected).max()
    print(f"[parity] video-to-video vs diffusers ({sampler}): {diff:.2e}")
    assert diff <= FRAME_TOL


def test_model_offload_runs_each_model_on_the_device_and_returns_it(components):
    """On this CPU-only machine offload moves cpu -> cpu, so this checks the code path and the
    result; the device moves themselves are PyTorch's."""
    ours = components[0]
    kwargs = dict(num_frames=2, height=32, width=32, steps=3, seed=4, progress=False)
    plain = ours("a dog", **kwargs).frames
    stages = []
    ours.offload_to = torch.device("cpu")
    original = ours._stage

    def recording_stage(module):
        stages.append(type(module).__name__)
        return original(module)

    ours._stage = recording_stage
    try:
        offloaded = ours("a dog", **kwargs).frames
    finally:
        ours.offload_to = None
        del ours._stage
    assert torch.equal(offloaded, plain)
    assert stages == ["TextEncoder", "TextEncoder", "UNet3D", "AutoencoderKL"]  # cond, uncond
    assert all(p.device.type == "cpu" for p in ours.unet.parameters())


def test_from_config_builds_random_pipeline():
    from t2v.pipeline.options import load_config
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    pipe = TextToVideo.from_config(cfg.model)
    out = pipe("a dog", num_frames=2, height=64, width=64, steps=2, seed=0, progress=False)
    assert out.frames.shape == (1, 2, 64, 64, 3) and out.frames.dtype == torch.uint8


def test_from_config_seeds_each_component_on_its_own():
    """Changing the text encoder's shape leaves the UNet's and the VAE's initial weights as
    they were (the demo recipe changed its text encoder and silently got another VAE)."""
    import dataclasses

    from t2v.pipeline.options import load_config
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").model
    other = dataclasses.replace(cfg, text_encoder=dataclasses.replace(
        cfg.text_encoder, context_length=16, layers=cfg.text_encoder.layers + 1))
    a, b = TextToVideo.from_config(cfg, seed=5), TextToVideo.from_config(other, seed=5)
    for name in ("unet", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    c = TextToVideo.from_config(cfg, seed=6)
    assert not torch.equal(a.vae.encoder.conv_in.weight, c.vae.encoder.conv_in.weight)


def test_seed_rules(components):
    """seed and generator together are refused; with latents the seed still seeds the later
    draws, so DDIM with eta > 0 is reproducible (it used the global RNG before)."""
    ours = components[0]
    kwargs = dict(num_frames=2, height=32, width=32, steps=3, progress=False)
    with pytest.raises(UserError, match="seed or generator, not both"):
        ours("a dog", seed=1, generator=torch.Generator().manual_seed(1), **kwargs)
    latents = noise((1, 4, 2, 8, 8))
    runs = []
    for global_seed in (10, 11):
        torch.manual_seed(global_seed)
        runs.append(ours("a dog", latents=latents, seed=5, sampler="ddim", eta=1.0, **kwargs))
    assert runs[0].seed == 5 and torch.equal(runs[0].frames, runs[1].frames)
    other = ours("a dog", latents=latents, seed=6, sampler="ddim", eta=1.0, **kwargs)
    assert not torch.equal(other.frames, runs[0].frames)


def test_noise_is_drawn_on_the_generator_device_then_moved():
    from t2v.noise import randn

    g = torch.Generator().manual_seed(3)
    expected = torch.randn((2, 3), generator=torch.Generator().manual_seed(3))
    drawn = randn((2, 3), g, device="meta")
    assert drawn.device.type == "meta" and drawn.shape == (2, 3)
    assert torch.equal(randn((2, 3), torch.Generator().manual_seed(3)), expected)
    assert randn((2,), torch.Generator().manual_seed(3), dtype=torch.float64).dtype == \
        torch.float64


def test_model_card_snippet_runs_with_the_import_changed(tmp_path):
    """The model card's diffusers snippet, with t2v's names (tiny weights in a folder):

        pipe = DiffusionPipeline.from_pretrained(repo, torch_dtype=..., variant=...)
        pipe.enable_model_cpu_offload()
        video_frames = pipe(prompt, num_inference_steps=25).frames[0]
        video_path = export_to_video(video_frames)

    output_type "np" (diffusers' default) gives frames in [0, 1] equal to t2v's float
    output; the MP4 holds them."""
    from t2v.pipeline.options import load_config
    from t2v.pipeline.text_to_video import TextToVideo as DiffusionPipeline
    from t2v.pipeline.video_io import export_to_video, read_video
    from t2v.loading.weights import save_native

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    source = TextToVideo.from_config(cfg.model, seed=0)
    folder = tmp_path / "tiny"
    folder.mkdir()
    save_native(folder, cfg.model, {"text_encoder": source.text_encoder.state_dict(),
                                    "unet": source.unet.state_dict(),
                                    "vae": source.vae.state_dict()})
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.enable_model_cpu_offload()  # no accelerator here: the models stay on the CPU
    prompt = "Spiderman is surfing"
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(num_frames=2, height=32, width=32, progress=False)
    video_frames = pipe(prompt, num_inference_steps=3, output_type="np", generator=generator,
                        **kwargs).frames[0]
    expected = pipe(prompt, steps=3, seed=0, output="float", **kwargs).frames[0]
    assert isinstance(video_frames, np.ndarray) and video_frames.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(video_frames, expected.numpy())
    video_path = export_to_video(video_frames, str(tmp_path / "out.mp4"))
    frames, _ = read_video(Path(video_path))
    assert frames.shape == (2, 32, 32, 3)


def test_diffusers_arguments(components):
    """num_videos_per_prompt, generator lists, output types, return_dict, pipe.to, video=,
    callback_on_step_end: each against t2v's own arguments."""
    ours = components[0]
    kwargs = dict(num_frames=2, height=32, width=32, num_inference_steps=2, progress=False)
    two = ours(["a dog", "a cat"], num_videos_per_prompt=2,
               generator=[torch.Generator().manual_seed(s) for s in range(4)], **kwargs)
    assert two.frames.shape[0] == 4 and two.seed is None
    for i, prompt in enumerate(["a dog", "a dog", "a cat", "a cat"]):  # each video: its own
        single = ours(prompt, generator=torch.Generator().manual_seed(i), **kwargs).frames[0]
        assert (single.int() - two.frames[i].int()).abs().max() <= 1
    reference = ours("a dog", seed=3, output="float", **kwargs).frames
    pt = ours("a dog", seed=3, output_type="pt", **kwargs).frames
    assert torch.equal(pt, reference.permute(0, 1, 4, 2, 3))
    pil = ours("a dog", seed=3, output_type="pil", **kwargs).frames
    assert len(pil) == 1 and len(pil[0]) == 2 and pil[0][0].size == (32, 32)
    latent = ours("a dog", seed=3, output_type="latent", **kwargs).frames
    assert latent.shape == (1, 4, 2, 8, 8)
    (frames,) = ours("a dog", seed=3, return_dict=False, **kwargs)
    assert frames.dtype == torch.uint8
    with pytest.raises(UserError, match="disagree"):
        ours("a dog", steps=3, num_inference_steps=4, num_frames=2, height=32, width=32)
    assert ours.to(torch.float32) is ours
    seen, plain = [], []

    def on_step_end(pipe, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 0 else None

    run = dict(seed=3, output="latents", num_frames=2, height=32, width=32, steps=2,
               progress=False)
    zeroed = ours("a dog", callback_on_step_end=on_step_end, **run).frames
    ours("a dog", callback=lambda i, t, x, x0: plain.append(x.clone()), **run)
    assert len(seen) == 2 and torch.equal(seen[0], plain[0])
    # Step 2 continued from the zeros the callback returned, not from the sampler's latents.
    assert not torch.equal(seen[1], plain[1]) and torch.equal(zeroed, seen[1])
    video = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    from_video = ours("a dog", video=video, seed=4, strength=0.5, **kwargs).frames
    init = torch.from_numpy(video).permute(3, 0, 1, 2)[None] * 2 - 1
    from_init = ours("a dog", init_video=init, seed=4, strength=0.5, **kwargs).frames
    assert torch.equal(from_video, from_init)


def test_freeu_matches_diffusers(components):
    """FreeU with diffusers' recommended values for this model family, whole pipeline."""
    ours, reference = components
    latents = noise((2, 4, 3, 8, 8), seed=4)
    pipe = diffusers_pipeline(TextToVideoSDPipeline, reference, "ddim")
    pipe.enable_freeu(b1=1.2, b2=1.4, s1=0.9, s2=0.2)
    try:
        expected = pipe(PROMPTS, num_frames=3, height=32, width=32, num_inference_steps=6,
                        guidance_scale=9.0, latents=latents.clone(), output_type="latent").frames
    finally:
        pipe.disable_freeu()
    actual = ours(PROMPTS, num_frames=3, height=32, width=32, steps=6, latents=latents.clone(),
                  freeu=(1.2, 1.4, 0.9, 0.2), output="latents", progress=False).frames
    assert_parity(actual, expected, LATENT_TOL, "pipeline with FreeU vs diffusers")
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # diffusers' switch: the same run
    try:
        switched = ours(PROMPTS, num_frames=3, height=32, width=32, steps=6,
                        latents=latents.clone(), output="latents", progress=False).frames
        off = ours(PROMPTS, num_frames=3, height=32, width=32, steps=6, latents=latents.clone(),
                   freeu=False, output="latents", progress=False).frames
    finally:
        ours.disable_freeu()
    assert torch.equal(switched, actual)
    assert not hasattr(ours.unet, "freeu")  # applied per call, never set on the model
    plain = ours(PROMPTS, num_frames=3, height=32, width=32, steps=6, latents=latents.clone(),
                 output="latents", progress=False).frames
    assert torch.equal(off, plain) and not torch.allclose(plain, actual)


@pytest.mark.parametrize("fast", [False, True])
def test_free_init_runs_the_written_passes(components, fast):
    """free_init=FreeInit(3) equals three runs by hand: pass k > 0 starts from
    t2v.sampling.freeinit.reinitialize(previous result, the initial noise), drawing from the same
    generator (DDIM with eta > 0, so the sampler draws too and the order of draws matters)."""
    from t2v.sampling.freeinit import FreeInit, reinitialize

    ours, _ = components
    free_init = FreeInit(num_iters=3, use_fast_sampling=fast)
    kwargs = dict(num_frames=3, height=32, width=32, eta=0.5, output="latents", progress=False)
    actual = ours(PROMPTS, steps=6, seed=11, free_init=free_init, **kwargs).frames
    g = torch.Generator().manual_seed(11)
    initial = torch.randn((2, 4, 3, 8, 8), generator=g)
    x = initial
    for k in range(3):
        if k:
            x = reinitialize(x, initial, ours.schedule.alphas_cumprod, free_init, g)
        x = ours(PROMPTS, steps=free_init.steps_of_pass(6, k), latents=x, generator=g,
                 **kwargs).frames
    assert torch.equal(actual, x)
    single = ours(PROMPTS, steps=6, seed=11, **kwargs).frames
    assert not torch.allclose(actual, single)


def test_guidance_rescale_reaches_the_sampler(components):
    """guidance_rescale=0 is the plain run bit for bit; > 0 rescales each step's guided
    output (t2v.sampling.guidance.guide, tested against diffusers' rescale_noise_cfg)."""
    from t2v.sampling.guidance import guide

    ours, _ = components
    latents = noise((2, 4, 3, 8, 8), seed=2)
    kwargs = dict(num_frames=3, height=32, width=32, steps=4, output="latents", progress=False)
    plain = ours(PROMPTS, latents=latents.clone(), **kwargs).frames
    assert torch.equal(ours(PROMPTS, latents=latents.clone(), guidance_rescale=0.0,
                            **kwargs).frames, plain)
    calls = []
    original = ours.unet.forward

    def spy(x, t, context, frame_chunk=None):
        out = original(x, t, context, frame_chunk)
        calls.append(guide(*out.chunk(2), 9.0, 0.7))
        return out

    ours.unet.forward = spy
    try:
        rescaled = ours(PROMPTS, latents=latents.clone(), guidance_rescale=0.7,
                        callback=lambda i, t, x, x0: calls.append((t, x0)), **kwargs).frames
    finally:
        del ours.unet.forward
    # DDIM: x0 of step 0 follows from the rescaled guided eps at the first timestep
    from t2v.sampling.schedule import eps_to_x0

    t, x0 = calls[1]
    assert torch.allclose(x0, eps_to_x0(latents, calls[0], ours.schedule.alphas_cumprod[t]),
                          atol=1e-5)
    assert not torch.allclose(rescaled, plain)
    with pytest.raises(UserError, match="guidance_rescale must be between 0 and 1"):
        ours(PROMPTS, guidance_rescale=1.5, **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_guidance_interval_guides_only_inside_it(components, sampler):
    """guidance_interval (low, high): the UNet sees [x, x] with [uncond; cond] at the
    timesteps inside it and x with the prompt's context alone outside; an interval holding
    every timestep is the plain guided run bit for bit, one holding none is the unguided
    (guidance 1) run."""
    ours, _ = components
    latents = noise((2, 4, 3, 8, 8), seed=4)
    kwargs = dict(num_frames=3, height=32, width=32, steps=4, output="latents",
                  progress=False, sampler=sampler)
    calls = []
    original = ours.unet.forward

    def spy(x, t, context, frame_chunk=None):
        calls.append((float(t), x.shape[0], context.shape[0]))
        return original(x, t, context, frame_chunk)

    ours.unet.forward = spy
    try:
        plain = ours(PROMPTS, latents=latents.clone(), **kwargs).frames
        timesteps = [t for t, _, _ in calls]
        calls.clear()
        assert torch.equal(ours(PROMPTS, latents=latents.clone(), guidance_interval=(0, 999),
                                **kwargs).frames, plain)
        calls.clear()
        low = high = timesteps[1]
        mixed = ours(PROMPTS, latents=latents.clone(), guidance_interval=(low, high),
                     **kwargs).frames
        assert [(b, c) for _, b, c in calls] == [(4, 4) if t == low else (2, 2)
                                                 for t in timesteps]
        between = (timesteps[0] + timesteps[1]) / 2  # no timestep is inside [between, between]
        none = ours(PROMPTS, latents=latents.clone(), guidance_interval=(between, between),
                    **kwargs).frames
    finally:
        del ours.unet.forward
    unguided = ours(PROMPTS, latents=latents.clone(), guidance_scale=1.0, **kwargs).frames
    assert torch.equal(none, unguided)
    assert not torch.allclose(mixed, plain) and not torch.allclose(mixed, unguided)
    with pytest.raises(UserError, match="0 <= low <= high <= 999"):
        ours(PROMPTS, guidance_interval=(800, 200), **kwargs)
    with pytest.raises(UserError, match="two timesteps"):
        ours(PROMPTS, guidance_interval=(800,), **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "euler", "unipc"])
def test_continue_from_ends_on_the_conditioning_latents(components, sampler):
    """Weights 1 (continue_from): the final latents of the first K frames are exactly the
    encoded conditioning frames (the generator draws: initial noise, the VAE posterior, the
    replacement noise), the later frames differ from an unconditioned run's."""
    ours, _ = components
    video = torch.rand(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # [0, 1]
    kwargs = dict(num_frames=4, height=32, width=32, steps=5, sampler=sampler,
                  output="latents", progress=False)
    actual = ours(PROMPTS[:1], seed=9, continue_from=video, continue_frames=2, **kwargs).frames
    g = torch.Generator().manual_seed(9)
    torch.randn((1, 4, 4, 8, 8), generator=g)
    expected = ours.vae.encode_video(video[:, -2:].permute(0, 2, 1, 3, 4) * 2 - 1, generator=g)
    assert torch.allclose(actual[:, :, :2], expected, atol=1e-6)
    plain = ours(PROMPTS[:1], seed=9, **kwargs).frames
    assert not torch.allclose(actual[:, :, 2:], plain[:, :, 2:])


def test_init_image_fades_with_the_written_weights(components):
    """init_image with the default schedule w_f = 1 - f / K: frame 0 ends on the image's
    latent; explicit weights of 0 leave the run as without conditioning (but for the draws)."""
    from t2v.sampling.first_frames import fading_weights

    ours, _ = components
    assert fading_weights(4) == (1.0, 0.75, 0.5, 0.25)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    kwargs = dict(num_frames=4, height=32, width=32, steps=4, output="latents", progress=False)
    actual = ours(PROMPTS[:1], seed=3, init_image=image, init_frames=3, **kwargs).frames
    g = torch.Generator().manual_seed(3)
    torch.randn((1, 4, 4, 8, 8), generator=g)
    z = ours.vae.encode_video(image[None, :, None].expand(1, 3, 3, 32, 32), generator=g)
    assert torch.allclose(actual[:, :, 0], z[:, :, 0], atol=1e-6)
    assert not torch.allclose(actual[:, :, 1], z[:, :, 1], atol=1e-3)  # weight 0.75: a blend
    off = ours(PROMPTS[:1], seed=3, init_image=image, init_frames=3, init_weights=[0, 0, 0],
               **kwargs).frames
    assert torch.equal(off, ours(PROMPTS[:1], seed=3, **kwargs).frames)


@pytest.mark.parametrize("bad, message", [
    (dict(init_image=torch.zeros(3, 16, 16)), "init_image is 16x16 pixels"),
    (dict(init_image=torch.zeros(3, 32, 32), init_frames=9), "between 1 and num_frames"),
    (dict(init_image=torch.zeros(3, 32, 32), init_weights=[1, 2, 0, 0]), "between 0 and 1"),
    (dict(init_image=torch.zeros(3, 32, 32), init_frames=2, init_weights=[1]), "1 weights"),
    (dict(continue_from=torch.zeros(1, 1, 3, 32, 32)), "has 1 frames"),
    (dict(continue_from=torch.zeros(1, 4, 3, 32, 32), init_image=torch.zeros(3, 32, 32)),
     "not both"),
])
def test_first_frame_conditioning_bad_input(components, bad, message):
    ours, _ = components
    with pytest.raises(UserError, match=message):
        ours(PROMPTS[:1], num_frames=4, height=32, width=32, steps=2, progress=False, **bad)


LCM_GUIDANCE_DIM = 32


@pytest.fixture(scope="module")
def guided_components(components):
    """The components with a UNet that embeds the guidance scale (time_cond_proj_dim), the
    same random weights on both sides."""
    import dataclasses

    from diffusers import UNet3DConditionModel

    from helpers import randomize_
    from weights_convert.diffusers import diffusers_unet_kwargs

    ours, (text, _, vae, tokenizer) = components
    cfg = dataclasses.replace(DIFF_UNET, time_cond_proj_dim=LCM_GUIDANCE_DIM)
    unet = randomize_(UNet3DConditionModel(**diffusers_unet_kwargs(cfg)), 4).eval()
    pipe = TextToVideo(dataclasses.replace(ours.config, unet=cfg), ours.text_encoder,
                       build(lambda: UNet3D(cfg), unet.state_dict(), "unet"), ours.vae,
                       ours.tokenizer)
    return pipe, (text, unet, vae, tokenizer)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_guidance_embedding_runs_one_pass_per_step_as_the_lcm_loop(guided_components, steps):
    """A model with time_cond_proj_dim through the lcm sampler: one UNet call per step on the
    prompts alone (no unconditional batch), the embedding of w = guidance - 1, as an LCM
    pipeline's loop written here with diffusers' pieces (CLIP text encoder, UNet3DCondition-
    Model with timestep_cond, LCMScheduler, frames folded around the step)."""
    from diffusers import LCMScheduler
    from diffusers.pipelines.latent_consistency_models import LatentConsistencyModelPipeline

    pipe, (text, unet, _, tokenizer) = guided_components
    latents = noise((2, 4, 3, 8, 8))
    g = 8.5
    with torch.no_grad():
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        context = text(ids)[0]
        w = torch.full((2,), g - 1.0)
        cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, w, LCM_GUIDANCE_DIM)
        scheduler = LCMScheduler.from_config({**HUB_SCHEDULER, "_class_name": "LCMScheduler"})
        scheduler.set_timesteps(steps)
        x, generator = latents.clone(), torch.Generator().manual_seed(7)
        b, c, f, h, wd = x.shape
        for t in scheduler.timesteps:
            out = unet(x, t, context, timestep_cond=cond).sample
            fold = lambda y: y.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, wd)  # noqa: E731
            x = scheduler.step(fold(out), t, fold(x), generator=generator).prev_sample
            x = x.reshape(b, f, c, h, wd).permute(0, 2, 1, 3, 4)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, args, kw, out: calls.append(args[0].shape[0]),
                                             with_kwargs=True)
    try:
        actual = pipe(PROMPTS, num_frames=3, height=32, width=32, steps=steps, sampler="lcm",
                      guidance_scale=g, latents=latents.clone(), output="latents",
                      generator=torch.Generator().manual_seed(7), progress=False).frames
    finally:
        handle.remove()
    assert calls == [2] * steps  # one pass per step, the two prompts only
    assert_parity(actual, x, LATENT_TOL, what=f"LCM {steps} steps with the guidance embedding")
    with pytest.raises(UserError, match="embeds the guidance scale"):
        pipe(PROMPTS, "blurry", num_frames=3, height=32, width=32, steps=2, sampler="lcm",
             progress=False)
