"""The Stack and the interaction resolver: every rule, with numbers."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from accel.recipe.schema import AdapterConfig, Recipe
from accel.resolve import RunInfo, read_trained_for, resolve
from accel.stack import AdapterPlan, CachePlan, GuidancePlan, SamplerPlan, Stack, StackError
from caching import BlockRangeScope, FoCaUpdate, ReuseUpdate, TaylorUpdate

FLUX = RunInfo("FluxTransformer2DModel", "transformer", "flow", num_steps=8, num_blocks=4)
UNET = RunInfo("UNet2DConditionModel", "unet", "epsilon", num_steps=8, guidance="batched")


def _run(stack: Stack, **changes) -> tuple[Stack, tuple[str, ...]]:
    changes.setdefault("num_steps", stack.sampler.steps)
    resolved = resolve(stack, dataclasses.replace(FLUX, **changes))
    return resolved.stack, resolved.decisions


def _stack(solver="euler", steps=8, preset=None, params=None, **parts) -> Stack:
    cache = None if preset is None else CachePlan(preset, params or {})
    return Stack(SamplerPlan(solver, steps), cache, **parts)


def _refusal(stack: Stack, run: RunInfo = FLUX) -> str:
    with pytest.raises(StackError) as info:
        resolve(stack, dataclasses.replace(run, num_steps=stack.sampler.steps))
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    return message


# ---------------------------------------------------------------- trajectory fractions


@pytest.mark.parametrize("steps, warmup_steps", [(8, 2), (20, 5), (50, 13)])
def test_warmup_fraction_becomes_steps_of_this_run(steps, warmup_steps):
    _, decisions = _run(_stack("euler", steps, "fora", {"warmup": 0.25}))
    assert f"warmup-fraction: 0.25 -> {warmup_steps} of {steps} steps" in decisions


def test_cooldown_and_max_cached_fractions_are_converted():
    _, decisions = _run(_stack("euler", 12, "pab"))  # pab: warmup 0.2, cooldown 0.1
    assert "warmup-fraction: 0.2 -> 3 of 12 steps" in decisions
    assert "cooldown-fraction: 0.1 -> 2 of 12 steps" in decisions
    _, decisions = _run(_stack("euler", 12, "fora", {"max_cached": 0.25}))
    assert "max-cached-fraction: 0.25 -> 3 of 12 steps in a row" in decisions
    _, decisions = _run(_stack("euler", 8, "fora", {"max_cached": 0.06}))
    assert "max-cached-fraction: 0.06 -> 1 of 8 steps in a row (0.48 steps, raised to 1)" in decisions


def test_fractions_covering_the_run_are_refused():
    message = _refusal(_stack("euler", 4, "fora", {"warmup": 0.5, "cooldown": 0.45}))
    assert "warm-up 2 + cool-down 2 steps cover the whole run" in message and "lower" in message


# ---------------------------------------------------------------- step-level reuse and step count


def test_whole_step_reuse_below_ten_steps_switches_to_a_block_range():
    stack, decisions = _run(_stack("euler", 8, "taylorseer"))
    scope = stack.cache.build().scope
    assert isinstance(scope, BlockRangeScope) and (scope.first, scope.last) == (1, 1)
    assert any(line.startswith("step-reuse:") and "(8 here) -> block scope" in line for line in decisions)
    stack, decisions = _run(_stack("euler", 10, "taylorseer"))
    assert stack.cache.build().scope.name == "residual" and not any("step-reuse" in d for d in decisions)


def test_block_level_presets_keep_their_scope_at_few_steps():
    stack, decisions = _run(_stack("euler", 6, "fora"))
    assert stack.cache.build().scope.name == "attention" and not any("step-reuse" in d for d in decisions)


def test_too_few_steps_or_blocks_for_caching_are_refused():
    assert "below 4 steps no cache pays off" in _refusal(_stack("euler", 3, "fbcache"))
    message = _refusal(_stack("euler", 8, "teacache"), dataclasses.replace(FLUX, num_blocks=2))
    assert "has 2 blocks" in message and "use >= 10 steps" in message


# ---------------------------------------------------------------- multistep solvers


@pytest.mark.parametrize("solver, order", [("dpmpp_2m", 1), ("dpmpp_3m", 2), ("unipc_bh2", 2), ("ipndm", 2)])
def test_multistep_solver_fed_plain_reuse_gets_a_taylor_forecast(solver, order):
    stack, decisions = _run(_stack(solver, 12, "fora"))
    update = stack.cache.build().update
    assert isinstance(update, TaylorUpdate) and update.order == order
    assert any(line.startswith(f"multistep-forecast: {solver}") and f"taylor, order {order}" in line
               for line in decisions)


@pytest.mark.parametrize("solver, preset, update", [("euler", "fora", ReuseUpdate), ("heun", "fora", ReuseUpdate),
                                                    ("dpmpp_2m", "foca", FoCaUpdate)])
def test_single_step_solvers_and_forecasters_keep_their_update(solver, preset, update):
    stack, decisions = _run(_stack(solver, 12, preset))
    assert isinstance(stack.cache.build().update, update)
    assert not any("multistep-forecast" in d for d in decisions)


# ---------------------------------------------------------------- guidance


def test_distilled_model_gets_no_uncond_tricks():
    message = _refusal(_stack(guidance=GuidancePlan(1.0, distilled=True, uncond_interval=2)))
    assert message == ("guidance.distilled with guidance.uncond_interval=2: a guidance-distilled model has no "
                       "uncond pass to reuse; set guidance.uncond_interval=1")
    assert "set guidance.scale=1" in _refusal(_stack(guidance=GuidancePlan(3.5, distilled=True)))
    _, decisions = _run(_stack(guidance=GuidancePlan(1.0, distilled=True)))
    assert "guidance: distilled -> one cond pass per step; no uncond tricks" in decisions


def test_uncond_reuse_needs_separate_branch_calls():
    stack = _stack("euler", 8, "fora", guidance=GuidancePlan(4.0, uncond_interval=2))
    message = _refusal(stack, dataclasses.replace(FLUX, guidance="batched", pipeline_class="PixArtAlphaPipeline"))
    assert "PixArtAlphaPipeline" in message and "set guidance.uncond_interval=1" in message
    _, decisions = _run(stack, guidance="separate")
    assert "uncond-reuse: uncond computed every 2 steps; in between, cond + the last computed (uncond - cond)" \
        in decisions
    assert "guidance-branches: cond and uncond are separate calls -> one cache state per branch" in decisions
    adjusted, decisions = _run(stack, guidance="none")
    assert adjusted.guidance.uncond_interval == 1 and any("-> off" in d for d in decisions)


def test_uncond_reuse_leaves_the_uncond_branch_uncached():
    stack = _stack("unipc_bh2", 12, "taylorseer", {"interval": 3}, guidance=GuidancePlan(4.0, uncond_interval=2))
    adjusted, decisions = _run(stack, guidance="separate")
    assert adjusted.cache.build().full_branches == ("uncond",)
    assert any(d.startswith("uncond-reuse-vs-cache:") and "caches the cond branch only" in d for d in decisions)
    plain, decisions = _run(dataclasses.replace(stack, guidance=GuidancePlan(4.0)), guidance="separate")
    assert plain.cache.build().full_branches == () and not any("vs-cache" in d for d in decisions)


# ---------------------------------------------------------------- prediction type and scope


def test_prediction_type_must_fit_the_schedule_family():
    assert "'epsilon' prediction does not fit a flow noise schedule" in _refusal(
        _stack(), dataclasses.replace(FLUX, prediction_type="epsilon", noise_family="flow"))
    message = _refusal(Stack(SamplerPlan("euler", 8, schedule="flow")), UNET)
    assert "schedule 'flow' is for flow models" in message and "karras" in message
    _, decisions = _run(_stack("dpmpp_2m"))
    assert decisions[0] == ("prediction: flow (flow) fits dpmpp_2m on schedule auto; "
                            "the scheduler converts it to x0")


def test_cache_scope_must_fit_the_model():
    assert "use preset deepcache for a UNet" in _refusal(_stack("euler", 12, "fora"),
                                                          dataclasses.replace(UNET))
    assert "use a transformer preset" in _refusal(_stack("euler", 12, "deepcache"),
                                                  dataclasses.replace(FLUX))


# ---------------------------------------------------------------- adapters


def _adapter(tmp_path, name="lora.safetensors", **metadata) -> str:
    path = tmp_path / name
    save_file({"w": torch.zeros(1)}, str(path), metadata={f"accel.{k}": str(v) for k, v in metadata.items()})
    return str(path)


def test_adapter_trained_for_another_stack_is_refused(tmp_path):
    path = _adapter(tmp_path, solver="dpmpp_2m", steps=4, cache="none")
    assert read_trained_for(path) == {"solver": "dpmpp_2m", "steps": "4", "cache": "none"}
    message = _refusal(_stack("dpmpp_2m", 8, "fora", adapters=(AdapterPlan(path),)))
    assert message == (f"adapter {path} was trained for solver=dpmpp_2m, steps=4, cache=none, but the stack "
                       "gives solver=dpmpp_2m, steps=8, cache=fora; set sampler.steps=4, cache.preset=none or use an "
                       "adapter trained for this stack")
    _, decisions = _run(_stack("dpmpp_2m", 4, adapters=(AdapterPlan(str(tmp_path)),)))
    assert "adapter-trained-for: lora.safetensors trained for solver=dpmpp_2m, steps=4, cache=none -> matches" \
        in decisions


def test_adapter_trained_with_uncond_reuse_needs_it(tmp_path):
    path = _adapter(tmp_path, solver="euler", steps=4, cache="none", uncond_interval=2)
    message = _refusal(_stack("euler", 4, adapters=(AdapterPlan(path),), guidance=GuidancePlan(4.0)))
    assert "but the stack gives solver=euler, steps=4, cache=none, uncond_interval=1" in message
    assert "set guidance.uncond_interval=2 or use an adapter" in message
    reuse = GuidancePlan(4.0, uncond_interval=2)
    _, decisions = _run(_stack("euler", 4, adapters=(AdapterPlan(path),), guidance=reuse), guidance="separate")
    assert any(d.startswith("adapter-trained-for:") and "uncond_interval=2 -> matches" in d for d in decisions)


def test_adapters_fuse_before_the_cache_calibrates(tmp_path):
    path = _adapter(tmp_path)
    _, decisions = _run(_stack("euler", 12, "teacache", adapters=(AdapterPlan(path, 0.8, fuse=True),)),
                        num_steps=12)
    assert ("adapter-order: load lora.safetensors -> fuse -> install teacache; teacache calibrates on the first "
            "generation, with the adapters fused") in decisions
    _, decisions = _run(_stack("euler", 12, "teacache", {"coefficients": [1.0, 0.0]},
                               adapters=(AdapterPlan(path),)))
    assert any("parameters were given: they must have been fitted with these adapters activated" in d
               for d in decisions)


def test_adapter_combinations_that_cannot_work_are_refused(tmp_path):
    first, second = _adapter(tmp_path, "a.safetensors"), _adapter(tmp_path, "b.safetensors")
    mixed = _stack(adapters=(AdapterPlan(first, fuse=True), AdapterPlan(second, fuse=False)))
    assert "set the same fuse for all adapters" in _refusal(mixed)
    no_lora = dataclasses.replace(FLUX, supports_lora=False, pipeline_class="PixArtAlphaPipeline")
    assert "PixArtAlphaPipeline: this pipeline cannot load LoRA" in _refusal(_stack(adapters=(AdapterPlan(first),)),
                                                                             no_lora)
    assert "2 .safetensors files" in _refusal(_stack(adapters=(AdapterPlan(str(tmp_path)),)))


# ---------------------------------------------------------------- the Stack itself


def test_run_step_count_must_be_the_stack_step_count():
    with pytest.raises(StackError, match="sampler.steps=8 but the run takes 20 steps"):
        resolve(_stack("euler", 8), dataclasses.replace(FLUX, num_steps=20))


def test_stack_from_recipe_and_bad_names():
    recipe = OmegaConf.structured(Recipe())
    recipe.sampler.solver, recipe.sampler.steps, recipe.sampler.schedule_params = "unipc_bh2", 12, {"shift": 3.0}
    recipe.sampler.schedule = "flow"
    recipe.cache.preset, recipe.cache.params = "fbcache", {"threshold": 0.1}
    recipe.adapters = [AdapterConfig(path="lora.safetensors", scale=0.5, fuse=True)]
    stack = Stack.from_recipe(recipe)
    assert stack.sampler == SamplerPlan("unipc_bh2", 12, "flow", {"shift": 3.0})
    assert stack.cache == CachePlan("fbcache", {"threshold": 0.1})
    assert stack.adapters == (AdapterPlan("lora.safetensors", 0.5, True),)
    assert stack.guidance == GuidancePlan(4.0, False, 1)
    assert stack.describe().splitlines()[0] == "sampler   unipc_bh2, 12 steps, schedule flow (shift=3.0)"
    with pytest.raises(StackError, match="unknown solver 'rk9'"):
        SamplerPlan("rk9")
    with pytest.raises(StackError, match="cache fora: preset 'fora' takes no parameter threshold"):
        CachePlan("fora", {"threshold": 0.1})


def test_resolved_stack_is_saved_with_its_decisions(tmp_path):
    resolved = resolve(_stack("dpmpp_2m", 8, "fora", {"warmup": 0.25}), FLUX)
    saved = json.loads(resolved.save(tmp_path).read_text())
    assert saved["decisions"] == list(resolved.decisions)
    assert saved["stack"]["cache"]["params"] == {"warmup": 0.25, "update": "taylor", "order": 1}
    assert saved["cache_policy"]["update"]["kind"] == "taylor" and saved["run"]["num_steps"] == 8
    assert "  warmup-fraction: 0.25 -> 2 of 8 steps" in resolved.describe().splitlines()


def test_optimized_walks_are_found_from_any_working_directory(tmp_path, monkeypatch):
    from accel.data_files import EMBEDDED_WEIGHTS_DIR

    monkeypatch.chdir(tmp_path)
    plan = SamplerPlan("unipc_bh2", 6, "optimized", {"path": "embedded:flux-digits/schedules/unipc_bh2-nfe6.json"})
    path = Path(plan.schedule_params["path"])
    assert path == EMBEDDED_WEIGHTS_DIR / "flux-digits" / "schedules" / "unipc_bh2-nfe6.json" and path.is_file()
    (tmp_path / "walk.json").write_bytes(path.read_bytes())  # any other name: relative to the working directory
    assert SamplerPlan("unipc_bh2", 6, "optimized", {"path": "walk.json"}).schedule_params["path"] == "walk.json"
    with pytest.raises(StackError, match="^sampler.schedule_params.path: optimised schedule not found: nowhere.json; "
                                         "make it with"):
        SamplerPlan("unipc_bh2", 6, "optimized", {"path": "nowhere.json"})
    # a source-tree path is no longer looked up beside the package
    with pytest.raises(StackError, match="optimised schedule not found: accel/embedded/weights/"):
        SamplerPlan("unipc_bh2", 6, "optimized",
                    {"path": "accel/embedded/weights/flux-digits/schedules/unipc_bh2-nfe6.json"})
    with pytest.raises(StackError, match="^sampler.schedule_params.path: embedded:flux-digits/schedules is a folder"):
        SamplerPlan("unipc_bh2", 6, "optimized", {"path": "embedded:flux-digits/schedules"})
    with pytest.raises(StackError, match="schedule optimized needs the JSON file"):
        SamplerPlan("unipc_bh2", 6, "optimized")
