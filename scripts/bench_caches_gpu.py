"""Do wall-clock speedups follow FLOP speedups at realistic token counts? The GPU check of
`accel bench caches`: a larger random-weight FLUX-architecture transformer (FLUX.1 block width,
4,096 image + 512 text tokens, bf16), a 28-step Euler flow loop, our presets beside diffusers'
and cache-dit's caches.

    python scripts/bench_caches_gpu.py --json runs/caches-gpu.json      # on a GPU (a few minutes on an H200)
    python scripts/bench_caches_gpu.py --tiny --json /tmp/tiny.json      # CPU smoke run

Random weights make image quality meaningless, so this reports only compute: FLOPs counted by
torch (one generation under the counter), and the median wall-clock of timed generations after a
warm-up, each as a speedup over the uncached loop, and their ratio (wall / FLOPs; 1 means the
hooks cost nothing). Adaptive triggers (thresholds on feature change) are left out: on random
weights their decisions say nothing about a trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import samplers  # noqa: E402
from accel import measure  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One configuration: "accel" (a preset of caching/), "diffusers" (one of its caches) or "cache-dit"."""

    origin: str
    method: str
    params: dict = field(default_factory=dict)


def cache_dit_available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


@contextlib.contextmanager
def installed(model: torch.nn.Module, variant: Variant, steps: int):
    """Installs the variant's cache on the bare transformer; yields `before_generation()` (resets its state)."""
    if variant.method == "reference":
        yield lambda: None
    elif variant.origin == "accel":
        from caching import apply_cache, get_preset, remove_cache

        apply_cache(model, get_preset(variant.method, **variant.params))
        try:
            yield lambda: None
        finally:
            remove_cache(model)
    elif variant.origin == "diffusers":
        from diffusers.hooks import PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
        from step_context import current_step

        config = (TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **variant.params)
                  if variant.method == "TaylorSeerCache" else PyramidAttentionBroadcastConfig(
                      current_timestep_callback=lambda: current_step().timestep, **variant.params))
        model.enable_cache(config)
        try:
            yield model._reset_stateful_cache
        finally:
            model.disable_cache()
    else:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        p = variant.params
        cache_dit.enable_cache(model, cache_config=DBCacheConfig(
            Fn_compute_blocks=p["Fn"], Bn_compute_blocks=p["Bn"], residual_diff_threshold=p["threshold"],
            max_warmup_steps=4, num_inference_steps=steps), calibrator_config=TaylorSeerCalibratorConfig(
            taylorseer_order=1) if p["taylorseer"] else None)
        try:
            yield lambda: cache_dit.refresh_context(model, num_inference_steps=steps)
        finally:
            cache_dit.disable_cache(model)


VARIANTS = [
    Variant("accel", "fora", {"interval": 2}), Variant("accel", "fora", {"interval": 3}),
    Variant("accel", "taylorseer", {}), Variant("accel", "foca", {}), Variant("accel", "deltadit", {}),
    Variant("accel", "toca", {}), Variant("accel", "pab", {}),
    Variant("diffusers", "TaylorSeerCache", {"cache_interval": 6, "use_lite_mode": True}),
    Variant("diffusers", "PyramidAttentionBroadcast", {"spatial_attention_block_skip_range": 2}),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("runs/caches-gpu.json"))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--double", type=int, default=6, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=12, help="single-stream blocks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny CPU configuration (smoke run)")
    return parser.parse_args()


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The transformer and a flow Denoiser over fixed random conditioning; returns (model, denoiser, noise)."""
    heads, tokens, text = (2, 64, 8) if args.tiny else (24, 4096, 512)
    config = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                  attention_head_dim=128 if not args.tiny else 16, num_attention_heads=heads,
                  joint_attention_dim=4096 if not args.tiny else 32, pooled_projection_dim=768 if not args.tiny else 16,
                  guidance_embeds=False, axes_dims_rope=(16, 56, 56) if not args.tiny else (4, 6, 6))
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype).eval()
    generator = torch.Generator(device).manual_seed(1)
    side = int(tokens ** 0.5)
    encoder = torch.randn(1, text, config["joint_attention_dim"], generator=generator, device=device, dtype=dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator, device=device, dtype=dtype)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(text, 3, device=device, dtype=dtype)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=x, encoder_hidden_states=encoder, pooled_projections=pooled,
                     timestep=t.to(dtype), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    noise = torch.randn(1, tokens, 64, generator=generator, device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    return model, velocity, noise, params


def measure_variant(model, velocity, noise, variant: Variant, args, device) -> dict:
    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with model.cache_context("cond"):  # diffusers' caches keep their state per named call
            return velocity(x, t)

    denoiser = samplers.Denoiser(call, prediction_type="flow")
    with installed(model, variant, args.steps) as before_generation, torch.inference_mode():
        def generate() -> torch.Tensor:
            before_generation()
            return samplers.sample(denoiser, noise, solver="euler", steps=args.steps, schedule="flow")

        _, flops = measure.count_flops(generate)
        wall = measure.time_median(generate, repeats=args.repeats, warmup=1, device=device)
    return {"origin": variant.origin, "method": variant.method, "params": variant.params, "flops": flops,
            "wall_seconds": wall}


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, velocity, noise, params = build(args, device, dtype)
    variants = [Variant("accel", "reference", {})] + VARIANTS
    if cache_dit_available():
        variants.append(Variant("cache-dit", "DBCache F1B0", {"Fn": 1, "Bn": 0, "threshold": 0.2, "taylorseer": True}))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{params / 1e9:.2f}B parameters, {noise.shape[1]} image tokens, {args.steps} Euler steps, {name}")
    records = []
    for variant in variants:
        record = measure_variant(model, velocity, noise, variant, args, device)
        base = records[0] if records else record
        record["flops_speedup"] = base["flops"] / record["flops"]
        record["wall_speedup"] = base["wall_seconds"] / record["wall_seconds"]
        record["wall_over_flops"] = record["wall_speedup"] / record["flops_speedup"]
        records.append(record)
        print(f"{variant.origin:9s} {variant.method:26s} {json.dumps(variant.params):44s} "
              f"FLOPs x{record['flops_speedup']:.2f}  wall x{record['wall_speedup']:.2f}  "
              f"ratio {record['wall_over_flops']:.2f}  ({record['wall_seconds']:.2f} s)", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": name, "parameters": params, "image_tokens": noise.shape[1],
                                     "steps": args.steps, "dtype": str(dtype), "records": records}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
