"""Compute counting and quality metrics on cases with known answers."""

import torch

from accel import measure


def test_flop_counter_counts_a_known_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 32)
    result, flops = measure.count_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 32
    torch.testing.assert_close(result, a @ b)


def test_flop_counter_counts_a_linear_layer_in_a_model():
    layer = torch.nn.Linear(64, 10)
    _, flops = measure.count_flops(lambda: layer(torch.randn(5, 64)))
    assert flops == 2 * 5 * 64 * 10


def test_psnr_of_a_constant_offset_is_closed_form():
    reference = torch.full((2, 1, 4, 4), 0.5)
    images = reference + 0.1
    assert abs(measure.psnr(images, reference) - 20.0) < 1e-4  # 10 log10(1 / 0.01)
    assert measure.psnr(reference, reference) == 100.0


def test_ssim_is_one_for_identical_images_and_lower_otherwise():
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert abs(measure.ssim(images, images) - 1.0) < 1e-6
    assert measure.ssim(images, images.flip(-1)) < 0.5


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    class Identity(torch.nn.Module):
        num_features = 4

        def forward(self, images):
            return images.flatten(1)[:, :4].double()

    real = torch.rand(200, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    fd = measure.FrechetDistance(Identity(), real)
    assert fd(real) < 1e-6
    shifted = fd((real + 0.5))
    assert abs(shifted - 4 * 0.25) < 1e-3  # ||mean shift||^2 with equal covariances


def test_class_accuracy_counts_matches():
    class Fixed(torch.nn.Module):
        def forward(self, images):
            return torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 3).float()

    assert measure.class_accuracy(Fixed(), torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])) == 0.75
