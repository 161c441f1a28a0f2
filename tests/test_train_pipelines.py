"""`accel train` on a user's pipeline: tiny random-weight FLUX and Wan pipelines (and SD3 / SDXL for
the replayed denoiser) saved to a folder, teacher trajectories from 4 prompts, 3 training steps of
step-distill, cache-aware and router, export, `pipe.load_lora_weights`, the resolver's refusals
and a bitwise resume after an interruption."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from omegaconf import OmegaConf
from safetensors.torch import load_file

import accel
import caching
from accel.stack import AdapterPlan, GuidancePlan, SamplerPlan, Stack, StackError
from accel.training.objectives import lora_objective_from_params, router_objective_from_params
from accel.training.teacher import TeacherSettings, prepare_pipeline
from accel.training.trace import CallSettings
from distill.training import TrainConfig, train
from tiny_text_pipelines import TINY_CALL, TINY_GUIDANCE, save_tiny_pipeline

PROMPTS = ["a red cube", "two dogs on a lake", "a cat sitting on a table", "the city at night"]
DENOISER = {"flux": "transformer", "wan": "transformer", "sd3": "transformer", "sdxl": "unet"}


class SimulatedKill(RuntimeError):
    """Raised from inside the objective to stand for a killed process."""


class Killed:
    """An objective that is killed when step `at` starts."""

    def __init__(self, objective, at: int):
        self.objective, self.at, self.name = objective, at, objective.name

    def module(self):
        return self.objective.module()

    def loss(self, step: int, micro_batch: int):
        if step == self.at:
            raise SimulatedKill(f"killed at step {step}")
        return self.objective.loss(step, micro_batch)

    def export(self, out_dir):
        return self.objective.export(out_dir)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    made = {}

    def folder(family: str, seed: int = 0):
        if (family, seed) not in made:
            made[family, seed] = save_tiny_pipeline(family, root / f"{family}-{seed}", seed=seed)
        return made[family, seed]

    return folder


def _section(folder) -> OmegaConf:
    return OmegaConf.create({"name": str(folder), "dtype": None, "device": None, "pipeline_kwargs": {}})


def _call(family: str) -> dict:
    call = dict(TINY_CALL[family])
    size = {"resolution": [call.pop("height"), call.pop("width")]}
    if "num_frames" in call:
        size["frames"] = call.pop("num_frames")
    return {**size, "call_kwargs": call}


def _params(family: str, folder, **overrides) -> dict:
    return {"prompts": PROMPTS, **_call(family), "teacher_count": 4, "teacher_steps": 10, "teacher_batch": 4,
            "guidance": 2.0, "student_guidance": 2.0, "trajectories": str(folder), "rank": 2, "batch_size": 2,
            "steps": 2, **overrides}


def _load(folder):
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["flux", "wan", "sd3", "sdxl"])
def test_teacher_is_the_pipeline_itself_run_through_accel_apply(family, folders, tmp_path):
    call = _call(family)
    size = call.get("resolution")
    settings = CallSettings(height=size[0], width=size[1], frames=call.get("frames"), call_kwargs=call["call_kwargs"],
                            guidance=2.0)
    teacher = TeacherSettings(prompts=tuple(PROMPTS), count=2, steps=4, guidance=2.0, batch_size=2,
                              folder=str(tmp_path / "teacher"), trace_batch=3)
    prepared = prepare_pipeline(_section(folders(family)), teacher, settings, [(2, "auto")])  # 1.0 in both walks
    assert prepared.teacher.states.shape[:2] == (2, 5) and prepared.teacher.cond["prompt"].tolist() == [0, 1]
    pipe = _load(folders(family))
    accel.apply(pipe, Stack(SamplerPlan("euler", 4, "auto"), None, (), GuidancePlan(2.0)))
    kwargs = {**TINY_CALL[family], **TINY_GUIDANCE[family], "prompt": PROMPTS[:2], "num_inference_steps": 4,
              "output_type": "latent", "latents": prepared.teacher.states[:, 0].clone()}
    if family == "flux":
        kwargs.update(true_cfg_scale=2.0, negative_prompt=["", ""], guidance_scale=3.5)
    with torch.no_grad():
        output = pipe(**kwargs)
    latents = output.frames if hasattr(output, "frames") else output.images
    assert torch.equal(latents, prepared.teacher.states[:, -1])  # the replayed denoiser is the pipeline's, bitwise
    again = prepare_pipeline(_section(folders(family)), teacher, settings)  # conditioning and chunks reused
    assert torch.equal(again.teacher.states, prepared.teacher.states)


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("method", ["step-distill", "cache-aware"])
def test_lora_trains_exports_loads_and_is_held_to_its_stack(family, method, folders, tmp_path):
    folder = folders(family)
    extra = {"steps": 10, "cache": "fora", "cache_params": {"interval": 2}} if method == "cache-aware" else {}
    objective = lora_objective_from_params(method, _params(family, tmp_path / "teacher", **extra), 0, _section(folder))
    before = objective.loss(0, 0)
    result = train(objective, TrainConfig(steps=3, out_dir=tmp_path / "run", lr=1e-2, checkpoint_every=3))
    assert torch.isfinite(before) and result.steps_done == 3
    header = load_file(str(result.exported))
    assert header and all(k.startswith("transformer.") and ".lora_" in k for k in header)
    assert any(float(v.abs().sum()) > 0 for k, v in header.items() if ".lora_B." in k)  # the LoRA moved

    pipe = _load(folder)
    x = torch.randn(1, 8, 16) if family == "flux" else torch.randn(1, 4, 2, 4, 4)
    inputs = _probe_inputs(family, x)
    with torch.no_grad():
        base = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.load_lora_weights(str(result.exported.parent))
        adapted = pipe.transformer(**inputs, return_dict=False)[0]
    assert not torch.allclose(base, adapted, atol=1e-6)  # the trained LoRA changes the output
    pipe.unload_lora_weights()

    steps = 10 if method == "cache-aware" else 2
    cache = caching_plan(method)
    good = Stack(SamplerPlan("euler", steps, "auto"), cache, (AdapterPlan(str(result.exported)),), GuidancePlan(2.0))
    resolved = accel.apply(pipe, good)
    assert any(line.startswith("adapter-trained-for") and "base model" in line for line in resolved.decisions)
    accel.remove(pipe)
    with pytest.raises(StackError, match=f"trained for solver=euler, steps={steps}"):
        accel.apply(pipe, Stack(SamplerPlan("euler", steps + 2, "auto"), cache, (AdapterPlan(str(result.exported)),),
                                GuidancePlan(2.0)))
    other = _load(folders(family, seed=1))
    with pytest.raises(StackError, match="was trained on base model weights"):
        accel.apply(other, good)


def caching_plan(method: str):
    from accel.stack import CachePlan

    return CachePlan("fora", {"interval": 2}) if method == "cache-aware" else None


def _probe_inputs(family: str, x: torch.Tensor) -> dict:
    generator = torch.Generator().manual_seed(3)
    if family == "flux":
        return dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 16, 32, generator=generator),
                    pooled_projections=torch.randn(1, 16, generator=generator), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(8, 3), txt_ids=torch.zeros(16, 3), guidance=torch.tensor([3.5]))
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 16, 32, generator=generator),
                timestep=torch.tensor([500.0]))


def test_router_trains_on_a_pipeline_and_exports_its_table(folders, tmp_path):
    params = _params("wan", tmp_path / "teacher", batch_size=2, steps_per_batch=2)
    for key in ("rank", "student_guidance", "steps"):
        params.pop(key)
    objective = router_objective_from_params(params, 0, _section(folders("wan")))
    result = train(objective, TrainConfig(steps=3, out_dir=tmp_path / "run", lr=0.5, checkpoint_every=3))
    spec = caching.load_router(result.exported)
    assert (spec.num_steps, spec.num_blocks) == (10, 2) and float(spec.gates[1:].min()) < 0.88  # moved from 0.881


def test_a_killed_run_resumes_bitwise(folders, tmp_path):
    params = _params("flux", tmp_path / "teacher")

    def build():
        torch.manual_seed(0)  # the LoRA's random init, as `accel train` seeds it with train.seed
        return lora_objective_from_params("step-distill", params, 0, _section(folders("flux")))

    config = lambda name: TrainConfig(steps=3, out_dir=tmp_path / name, lr=1e-2, checkpoint_every=1,  # noqa: E731
                                      ema_decay=0.9)
    whole = train(build(), config("whole"))
    with pytest.raises(SimulatedKill):
        train(Killed(build(), at=2), config("pieces"))
    newest = tmp_path / "pieces" / "checkpoints" / "step-0000002" / "weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8] + bytes(8))  # a corrupt newest checkpoint is skipped
    resumed = train(build(), config("pieces"))
    assert resumed.resumed_from == 1 and resumed.steps_done == 3
    a, b = load_file(str(whole.exported)), load_file(str(resumed.exported))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_on_the_pipeline_path_stops_with_its_step(folders, tmp_path):
    from distill.training import TrainingError

    objective = lora_objective_from_params("step-distill", _params("flux", tmp_path / "teacher"), 0,
                                           _section(folders("flux")))
    with torch.no_grad():
        next(p for n, p in objective.module().named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(TrainingError, match="loss is nan at step 0"):
        train(objective, TrainConfig(steps=3, out_dir=tmp_path / "run", log_every=1))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(folders, tmp_path):
    params = _params("flux", tmp_path / "teacher")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        objective = lora_objective_from_params("step-distill", {**params, "gradient_checkpointing": checkpointing}, 0,
                                               _section(folders("flux")))
        for name, parameter in objective.module().named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
        loss = objective.loss(0, 0)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in objective.module().parameters() if p.requires_grad]))
        assert objective.module().gradient_checkpointing is checkpointing
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))
    with pytest.raises(ValueError, match="gradient_checkpointing with a cache"):
        lora_objective_from_params("cache-aware", {**params, "steps": 10, "cache": "fora",
                                                   "gradient_checkpointing": True}, 0, _section(folders("flux")))


@pytest.mark.parametrize("recipe", ["train/flux-dev-step-4", "train/wan21-t2v-cache-aware"])
def test_the_pipeline_templates_load_and_need_their_weights_cached(recipe, capsys, tmp_path, monkeypatch):
    from accel.cli import main
    from accel.recipe.train_schema import load_train_recipe

    loaded = load_train_recipe(recipe)
    assert "/" in loaded.model.name and loaded.model.dtype == "bfloat16" and loaded.objective.params.prompts
    monkeypatch.chdir(tmp_path)
    assert main(["train", recipe, "--quick", "model.device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a hub id that is not in the local Hugging Face cache" in err[0]
