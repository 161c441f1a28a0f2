"""One rank of the context-parallel cache test (tests/test_context_parallel.py starts two on gloo).

Every rank builds the same tiny FluxPipeline (same seed), runs it once alone (the single-process
reference: no parallelism, decisions and output), then enables diffusers' context parallelism
(Ulysses over the ranks: each rank holds half of the image and text tokens inside the transformer)
and runs it again with the same stack through `accel.apply`. Rank 0 writes what every rank saw to
the JSON file named on the command line. Each rank also feeds its token half of two fixed tensors
to the trigger statistic's reduction, beside the one-process value of the whole tensors.

diffusers 0.42 picks a rank's device as `rank % torch.accelerator.device_count()`, which is 0 on a
CPU-only build, so the CPU run counts the CPU as one accelerator device; on GPUs nothing is patched.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from caching.testing import tiny_model

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=tiny_model("FluxTransformer2DModel").model)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 4, 16, generator=generator),  # token counts divisible by 2
                  pooled_prompt_embeds=torch.randn(1, 16, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 4, 16, generator=generator),
                  negative_pooled_prompt_embeds=torch.randn(1, 16, generator=generator),
                  true_cfg_scale=2.0, height=64, width=64)
    return pipe, kwargs


def _generate(pipe, kwargs, steps: int) -> dict:
    import accel

    out = pipe(**kwargs, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0))
    summary = accel.summary(pipe)
    return {"latents": out.images.flatten().tolist(),
            "computed": {b.branch: list(b.steps_computed) for b in summary.branches}}


def _statistic(group) -> dict:
    """The relative L1 change of two fixed (1, 64, 8) tensors: whole (one process), this rank's token
    shard alone, and this rank's shard reduced over the group."""
    from caching.calibration import relative_l1

    generator = torch.Generator().manual_seed(2)
    previous = torch.randn(1, 64, 8, generator=generator)
    current = previous + 0.3 * torch.randn(1, 64, 8, generator=generator) * torch.linspace(0, 2, 64)[None, :, None]
    shard = slice(32 * dist.get_rank(), 32 * (dist.get_rank() + 1))
    return {"whole": float(relative_l1(current, previous)),
            "shard": float(relative_l1(current[:, shard], previous[:, shard])),
            "reduced": float(relative_l1(current[:, shard], previous[:, shard], group))}


def main(out_path: str, threshold: float, steps: int) -> None:
    dist.init_process_group("gloo")
    if not torch.cuda.is_available() and torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1  # see the module docstring
    import accel
    import caching.parallel
    from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack
    from diffusers import ContextParallelConfig

    stack = Stack(SamplerPlan("euler", steps), CachePlan("fbcache", {"threshold": threshold}), guidance=GuidancePlan(2.0))
    pipe, kwargs = _pipeline()
    accel.apply(pipe, stack)
    alone = _generate(pipe, kwargs, steps)
    accel.remove(pipe)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))
    refused = ""
    try:  # the engine refuses a self-calibrating trigger on a context-parallel model by itself, too
        caching.apply_cache(pipe.transformer, caching.get_preset("teacache"))
    except ValueError as error:
        refused = str(error)
    resolved = accel.apply(pipe, stack)
    parallel = _generate(pipe, kwargs, steps)
    result = {"rank": dist.get_rank(), "alone": alone, "parallel": parallel,
              "decisions": [line for line in resolved.decisions if line.startswith("context-parallel")],
              "refused": refused,
              "statistic": _statistic(caching.parallel.context_parallel_group(pipe.transformer))}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(gathered, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], threshold=float(sys.argv[2]), steps=int(sys.argv[3]))
