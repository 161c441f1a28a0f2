"""The shipped embedded models load with from_pretrained and still meet their bars on a small run."""

import torch

from accel import measure
from accel.embedded import load_flux_digits, load_judge
from accel.embedded.data import real_reference_set
from accel.embedded.model import image_ids, pack_latents, unpack_latents
from accel.generate import SamplingPlan, flux_digits_denoiser, generate, sample_noise


def test_pack_unpack_round_trip_and_flux_ids():
    images = torch.randn(3, 1, 16, 16)
    packed = pack_latents(images)
    assert packed.shape == (3, 64, 4)
    assert torch.equal(unpack_latents(packed, 16, 16), images)
    ids = image_ids(16, 16)
    assert ids.shape == (64, 3) and ids[9].tolist() == [0.0, 1.0, 1.0]


def test_flux_digits_loads_with_from_pretrained():
    model = load_flux_digits()
    assert type(model.transformer).__name__ == "FluxTransformer2DModel"
    params = sum(p.numel() for p in model.transformer.parameters())
    assert 2.7e6 < params < 2.9e6
    velocity = model.velocity(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 0.5]), torch.tensor([3, 10]))
    assert velocity.shape == (2, 1, 16, 16) and torch.isfinite(velocity).all()


def test_judge_recognises_real_held_out_digits():
    judge = load_judge()
    images, labels = real_reference_set(300, 16, seed=99)
    assert measure.class_accuracy(judge, measure.to_unit_range(images), labels) >= 0.97


def test_pinned_small_run_few_steps_differ_from_the_reference_but_stay_recognisable():
    model = load_flux_digits()
    denoiser = flux_digits_denoiser(model, guidance_scale=4.0)
    labels = torch.arange(10)
    noise = sample_noise(2024, range(10), (1, 16, 16))
    reference = measure.to_unit_range(generate(denoiser, SamplingPlan("euler", 50), noise, labels, 10))
    eight = measure.to_unit_range(generate(denoiser, SamplingPlan("euler", 8), noise, labels, 10))
    judge = load_judge()
    assert measure.class_accuracy(judge, reference, labels) >= 0.9
    assert measure.class_accuracy(judge, eight, labels) >= 0.9
    assert 24.0 < measure.psnr(eight, reference) < 31.0  # measured 27.7 dB on 200 samples
