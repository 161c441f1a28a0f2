import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("ACCEL_TEST_THREADS", "2")))


@pytest.fixture
def flow_denoiser_point_mass():
    """A flow Denoiser whose data distribution is a point mass at c: velocity = (x - c) / t."""
    import samplers

    def make(c: torch.Tensor):
        def model_fn(x, sigma, **_):
            t = sigma.reshape(-1, *([1] * (x.ndim - 1)))
            return (x - c) / t
        return samplers.Denoiser(model_fn, prediction_type="flow")

    return make
