"""Every diffusers pipeline family: layouts are discovered, a cache caches, removal restores bitwise.

Each family's tiny pipeline (tests/tiny_pipelines.py) is saved and loaded as a user would, run
once plain, then under `accel.apply` with a cache that must cache (FORA interval 2 on
transformers, DeepCache interval 2 on UNets) for 6 Euler steps, then again after `accel.remove`.
"""

import pytest
import torch

import accel
import caching
from accel.pipeline import applied
from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack
from caching.layouts import transformer_blocks
from tiny_pipelines import FAMILIES, denoiser, load, run

STEPS = 6

# Guidance branches the cached calls carry: pipelines that call cond and uncond separately name
# them (or call them in that order: Chroma, Lumina2); those that concatenate them run one "batched"
# call; a family without CFG runs "cond".
SEPARATE, BATCHED, COND = {"cond", "uncond"}, {"batched"}, {"cond"}
BRANCHES = {
    "flux": SEPARATE, "flux-kontext": COND, "flux2": COND, "chroma": SEPARATE, "sd3": BATCHED,
    "qwenimage": SEPARATE, "qwenimage-edit": SEPARATE, "hunyuanvideo": SEPARATE, "wan21": SEPARATE,
    "wan22": SEPARATE, "ltx": BATCHED, "cogvideox": BATCHED, "cogview4": SEPARATE, "lumina2": SEPARATE,
    "sana": BATCHED, "pixart-alpha": BATCHED, "pixart-sigma": BATCHED, "hidream": BATCHED, "auraflow": BATCHED,
    "mochi": BATCHED, "allegro": BATCHED, "dit": BATCHED, "sd15": BATCHED, "sdxl": BATCHED,
}

# Families whose run fails outside caching/, with the one-line cause.
KNOWN_FAILURES: dict[str, str] = {}  # family -> why it cannot pass yet (none today)
# Wan 2.2 calls its primary transformer only for t >= boundary_ratio (transformer_2 does the rest).
PRIMARY_SKIPS_STEPS = {"wan22"}


def _cases():
    for name in FAMILIES:
        marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True)] if name in KNOWN_FAILURES else []
        yield pytest.param(name, marks=marks, id=name)


def test_every_family_has_a_case():
    assert set(BRANCHES) == set(FAMILIES) and len(FAMILIES) >= 24


@pytest.mark.parametrize("name", _cases())
def test_family_caches_and_remove_restores_bitwise(name, tmp_path):
    family = FAMILIES[name]
    pipe, kwargs = load(name, tmp_path)
    model = denoiser(pipe)
    layout = caching.get_model_layout(model)
    if family.block_lists:
        assert (layout.kind, layout.block_lists) == ("transformer", family.block_lists)
        assert len(transformer_blocks(model, layout)) == sum(len(getattr(model, a)) for a in family.block_lists)
    else:
        assert layout.kind == "unet"
    plain = run(pipe, kwargs, STEPS)

    preset = "fora" if family.block_lists else "deepcache"
    accel.apply(pipe, Stack(SamplerPlan("euler", STEPS), CachePlan(preset, {"interval": 2}),
                            guidance=GuidancePlan(family.guidance_scale)))
    cached = run(pipe, kwargs, STEPS)
    stats = applied(pipe).cache.stats.last_run()
    accel.remove(pipe)

    assert {call.branch for call in stats.calls} == BRANCHES[name]
    for branch in BRANCHES[name]:
        seen = sorted(stats.steps_computed(branch) + stats.steps_cached(branch))
        assert seen == list(range(STEPS)) or (name in PRIMARY_SKIPS_STEPS and seen == list(range(len(seen))))
        assert stats.steps_computed(branch) == seen[0::2] and stats.steps_cached(branch) == seen[1::2] != []
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    assert torch.equal(run(pipe, kwargs, STEPS), plain)


def _denoiser_timesteps(pipe, kwargs, steps: int) -> tuple[list[float], torch.Tensor]:
    """The `timestep` each denoiser call of one generation received (consecutive repeats once), and the output."""
    seen: list[float] = []

    def record(module, args, call_kwargs):
        value = call_kwargs.get("timestep", call_kwargs.get("timesteps"))  # HiDream names it timesteps
        if value is None:
            value = args[1]
        value = float(torch.as_tensor(value).reshape(-1)[0])
        if not seen or seen[-1] != value:
            seen.append(value)

    models = [m for m in (getattr(pipe, n, None) for n in ("transformer", "transformer_2", "unet"))
              if isinstance(m, torch.nn.Module)]
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in models]
    try:
        out = run(pipe, kwargs, steps)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_schedule_fidelity_euler_walks_the_pipelines_own_timesteps(name, tmp_path):
    """On `schedule: auto`, accel's solver hands the denoiser exactly the timesteps the pipeline's own
    scheduler does; with euler on a FlowMatchEuler pipeline the output is the native one too."""
    family = FAMILIES[name]
    pipe, kwargs = load(name, tmp_path)
    native_scheduler = type(pipe.scheduler).__name__
    native, native_out = _denoiser_timesteps(pipe, kwargs, STEPS)
    accel.apply(pipe, Stack(SamplerPlan("euler", STEPS), guidance=GuidancePlan(family.guidance_scale)))
    try:
        ours, ours_out = _denoiser_timesteps(pipe, kwargs, STEPS)
    finally:
        accel.remove(pipe)
    assert len(ours) == len(native) and torch.allclose(torch.tensor(ours), torch.tensor(native), rtol=1e-4, atol=1e-3)
    if native_scheduler == "FlowMatchEulerDiscreteScheduler":
        assert torch.allclose(ours_out, native_out, rtol=1e-4, atol=1e-4), (ours_out - native_out).abs().max()
