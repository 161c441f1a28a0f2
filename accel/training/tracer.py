"""`PipelineTracer`: calls a diffusers pipeline with its denoiser recorded (see accel.training.trace)."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from accel.branch_hook import branch_mode
from accel.training.trace import CallSettings, Conditioning, TraceError, Walk, _Call, _flatten, _Recorder, _Stop
from caching.hooks import install_hook, uninstall_hooks
from samplers.diffusers_scheduler import AccelScheduler
from step_context import set_current

TIMESTEP = "timestep"
TIMESTEP_TOLERANCE = 1e-2  # relative; bf16 timesteps are rounded to 8 significant bits


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _same(a: Any, b: Any) -> bool:
    if _is_tensor(a) or _is_tensor(b):
        return _is_tensor(a) and _is_tensor(b) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


class PipelineTracer:
    """Traces what a pipeline passes its denoiser, and the walks its scheduler takes.

    Args:
        pipe: a loaded diffusers pipeline.
        denoiser_name: the attribute of its denoiser ("transformer" or "unet").
        settings: how the pipeline is called (size, frames, negative prompt, call arguments, guidance).

    Raises:
        TraceError: a pipeline this cannot replay (two denoisers, an inverted-time scheduler).
    """

    def __init__(self, pipe: Any, denoiser_name: str, settings: CallSettings):
        self.pipe, self.settings = pipe, settings
        self.owner = type(pipe).__name__
        self.denoiser = getattr(pipe, denoiser_name)
        if isinstance(getattr(pipe, "transformer_2", None), torch.nn.Module):
            raise TraceError(f"{self.owner} has two denoisers (transformer and transformer_2, switched by noise "
                             "level); accel train trains one denoiser: use a one-transformer pipeline")
        try:
            probe = AccelScheduler.from_config(pipe.scheduler, solver="euler", schedule="auto")
        except ValueError as error:
            raise TraceError(f"{self.owner}'s scheduler: {str(error).splitlines()[0]}") from None
        if (probe.config.native_config or {}).get("invert_sigmas"):
            raise TraceError(f"{self.owner}'s scheduler inverts flow time (invert_sigmas); accel train does not "
                             "replay such pipelines")
        self.prediction, self.schedule = probe.prediction, probe.model_schedule
        self.mode = branch_mode(type(pipe))
        self._per_sample: set[str] | None = None
        self._layout: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ pipeline calls

    def _call_kwargs(self, prompts: list[str]) -> dict[str, Any]:
        from accel.lab.generate import guidance_kwargs
        from accel.lab.inputs import Inputs
        from accel.stack import GuidancePlan

        s = self.settings
        inputs = Inputs(seeds=tuple(range(len(prompts))), prompts=tuple(prompts), height=s.height, width=s.width,
                        frames=s.frames, negative_prompt=s.negative_prompt, call_kwargs=dict(s.call_kwargs))
        given = inputs.call_kwargs_for(self.pipe, slice(0, len(prompts)))
        return {**guidance_kwargs(self.pipe, GuidancePlan(float(s.guidance)), given), **given}

    def _run(self, prompts: list[str], steps: int, schedule: str, stop_step: int) -> tuple[Walk, list[_Call]]:
        """Calls the pipeline with an AccelScheduler (euler on `schedule`) and the recorder; returns
        (the walk, the denoiser calls of steps < stop_step)."""
        try:
            scheduler = AccelScheduler.from_config(self.pipe.scheduler, solver="euler", schedule=schedule)
        except ValueError as error:
            raise TraceError(f"schedule {schedule!r} on {self.owner}: {str(error).splitlines()[0]}") from None
        walks: list[Walk] = []
        scheduler.generation_listeners.append(lambda s: walks.append(Walk.of(s)))
        recorder = _Recorder(stop_step)
        original = self.pipe.scheduler
        installed = [install_hook(self.denoiser, recorder, "train-trace")]
        self.pipe.scheduler = scheduler
        try:
            with torch.no_grad():
                self.pipe(**self._call_kwargs(prompts), num_inference_steps=steps, output_type="latent")
        except _Stop:
            pass
        finally:
            self.pipe.scheduler = original
            uninstall_hooks(installed)
            set_current(None)
        if not walks:
            raise TraceError(f"{self.owner} never called scheduler.set_timesteps; accel train cannot trace it")
        return walks[0], recorder.calls

    def walk(self, steps: int, schedule: str = "auto") -> Walk:
        """(steps + 1,) the levels an `accel.apply` stack of `steps` steps on `schedule` walks here
        (for the image size and call arguments of `settings`); `probe` must have run."""
        walk, _ = self._run([self._probe_prompt], steps, schedule, stop_step=0)
        return walk

    # ------------------------------------------------------------------------------ call layout

    def _step_calls(self, calls: list[_Call], count: int) -> tuple[dict, dict | None, bool]:
        """(cond arguments, uncond arguments or None, batched) of the first step's calls."""
        first = [c for c in calls if c.step == 0]
        if not first:
            raise TraceError(f"{self.owner} made no denoiser call; accel train cannot trace it")
        if self.mode == "named":
            cond = [c for c in first if c.name != "uncond"]
            uncond = [c for c in first if c.name == "uncond"]
        else:
            cond, uncond = first[:1], first[1:]
        if len(cond) != 1 or len(uncond) > 1:
            raise TraceError(f"{self.owner} calls its denoiser {len(first)} times a step; accel train replays "
                             "one cond and one uncond call")
        args = {k: v for k, v in _flatten(cond[0].arguments).items()}
        x = args[self.x_name(args)]
        batched = self.mode == "batched" and x.shape[0] == 2 * count
        return args, (_flatten(uncond[0].arguments) if uncond else None), batched

    @staticmethod
    def x_name(arguments: dict[str, Any]) -> str:
        """The latent argument: the forward's first parameter (hidden_states, or sample for UNets)."""
        name = next(iter(arguments))
        if not _is_tensor(arguments[name]) or TIMESTEP not in arguments:
            raise TraceError(f"the denoiser call has no latent tensor first and '{TIMESTEP}' argument "
                             f"(got {sorted(arguments)}); accel train replays diffusers denoisers only")
        return name

    def probe(self, steps: int, prompts: list[str]) -> Walk:
        """Reads the call layout from two calls of 1 and 2 of `prompts`; returns the `steps`-step
        walk of schedule "auto" (the teacher's). Checks that only the latents and the timestep
        change between steps and that the timestep is proportional to the scheduler's."""
        if steps < 2:
            raise TraceError("the teacher needs at least 2 steps (teacher_steps)")
        self._probe_prompt = prompts[0]
        walk, calls = self._run(prompts[:1], steps, "auto", stop_step=2)
        _, pair = self._run((list(prompts[:2]) * 2)[:2], steps, "auto", stop_step=1)
        one, _, _ = self._step_calls(calls, 1)
        two, _, _ = self._step_calls(pair, 2)
        x = self.x_name(one)
        self._per_sample = self._classify(one, two, x)
        later = [c for c in calls if c.step == 1]
        if later:
            following = _flatten(later[0].arguments)
            for key, value in one.items():
                if key not in (x, TIMESTEP) and not _same(value, following.get(key)):
                    raise TraceError(f"{self.owner} passes its denoiser '{key}' that changes from step to step; "
                                     "accel train replays the first step's arguments and cannot train it")
        self._layout = {"x_name": x, **self._timestep_layout(calls, one)}
        return walk

    def _classify(self, one: dict, two: dict, x: str) -> set[str]:
        """Arguments whose first dimension follows the number of prompts (1 -> 2)."""
        lead1, lead2 = one[x].shape[0], two[x].shape[0]
        per_sample = set()
        for key, value in one.items():
            other = two.get(key)
            if key in (x, TIMESTEP) or not _is_tensor(value):
                continue
            if _is_tensor(other) and value.ndim and other.ndim == value.ndim and value.shape[0] == lead1 \
                    and other.shape[0] == lead2 and value.shape[1:] == other.shape[1:]:
                per_sample.add(key)
            elif not _same(value, other):
                raise TraceError(f"{self.owner} passes its denoiser '{key}' of shape {tuple(value.shape)} that "
                                 "changes with the number of prompts but not one row per prompt; accel train "
                                 "cannot replay it")
        return per_sample

    def _timestep_layout(self, calls: list[_Call], first: dict) -> dict[str, Any]:
        """The ratio of the timestep argument to the scheduler's model timestep, checked on two steps."""
        ratios = []
        for step in (0, 1):
            call = next((c for c in calls if c.step == step), None)
            if call is None:
                continue
            value = torch.as_tensor(_flatten(call.arguments)[TIMESTEP]).detach().double().cpu().reshape(-1)
            if not bool((value == value[0]).all()):
                raise TraceError(f"{self.owner} passes a timestep that differs across the batch or tokens; "
                                 "accel train cannot replay it")
            if call.timestep == 0:
                raise TraceError(f"{self.owner}'s scheduler gives model timestep 0 at step {step}")
            ratios.append(float(value[0]) / call.timestep)
        if len(ratios) == 2 and not math.isclose(ratios[0], ratios[1], rel_tol=TIMESTEP_TOLERANCE):
            raise TraceError(f"{self.owner} passes a timestep that is not proportional to its scheduler's "
                             f"({ratios[0]:g} then {ratios[1]:g} times it); accel train cannot replay it")
        timestep = torch.as_tensor(first[TIMESTEP])
        return {"timestep_scale": ratios[0], "timestep_dtype": timestep.dtype,
                "timestep_shape": None if timestep.ndim == 0 else tuple(timestep.shape[1:])}

    # ------------------------------------------------------------------------------ conditioning

    def conditioning(self, prompts: list[str], batch_size: int) -> Conditioning:
        """The per-prompt arguments of every prompt (rows: cond then uncond), traced `batch_size`
        prompts a call; `probe` must have run."""
        if self._per_sample is None:
            raise RuntimeError("PipelineTracer.probe(steps) must run before conditioning()")
        x = self._layout["x_name"]
        parts: list[tuple[dict, dict | None]] = []
        shared = constants = None
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            _, calls = self._run(chunk, 2, "auto", stop_step=1)
            cond, uncond, batched = self._step_calls(calls, len(chunk))
            if batched:
                cond, uncond = self._split(cond, len(chunk))
            parts.append((self._rows(cond, len(chunk)), None if uncond is None else self._rows(uncond, len(chunk))))
            shared, constants = self._common(cond, uncond, x)
            first = cond
        has_uncond = parts[0][1] is not None
        if any((u is not None) != has_uncond for _, u in parts):
            raise TraceError(f"{self.owner} ran the uncond branch for some prompts only")
        rows = {key: torch.cat([c[key] for c, _ in parts]) for key in parts[0][0]}
        if has_uncond:
            rows = {key: torch.cat([value, torch.cat([u[key] for _, u in parts])]) for key, value in rows.items()}
        return Conditioning(rows=rows, shared=shared, constants=constants, prompts=len(prompts),
                            has_uncond=has_uncond, mode=self.mode, x_name=x, x_shape=tuple(first[x].shape[1:]),
                            x_dtype=first[x].dtype, timestep_scale=self._layout["timestep_scale"],
                            timestep_shape=self._layout["timestep_shape"],
                            timestep_dtype=self._layout["timestep_dtype"])

    def _split(self, arguments: dict, count: int) -> tuple[dict, dict]:
        """A batched [uncond, cond] call's arguments as (cond, uncond)."""
        keys = self._per_sample | {self._layout["x_name"], TIMESTEP}
        cond = {k: v[count:] if k in keys and _is_tensor(v) and v.ndim else v for k, v in arguments.items()}
        uncond = {k: v[:count] if k in keys and _is_tensor(v) and v.ndim else v for k, v in arguments.items()}
        return cond, uncond

    def _rows(self, arguments: dict, count: int) -> dict[str, torch.Tensor]:
        rows = {}
        for key in sorted(self._per_sample):
            value = arguments.get(key)
            if not _is_tensor(value) or value.shape[0] != count:
                raise TraceError(f"{self.owner}: argument '{key}' has no row per prompt in a call of {count}")
            rows[key] = value.detach().cpu()
        return rows

    def _common(self, cond: dict, uncond: dict | None, x: str) -> tuple[dict, dict]:
        """(shared tensors, constants): what is not per prompt; the same in both branches."""
        shared, constants = {}, {}
        for key, value in cond.items():
            if key in self._per_sample or key in (x, TIMESTEP):
                continue
            if uncond is not None and not _same(value, uncond.get(key)):
                raise TraceError(f"{self.owner} passes '{key}' differently to the cond and uncond calls; "
                                 "accel train cannot replay it")
            if _is_tensor(value):
                shared[key] = value.detach().cpu()
                continue
            try:
                json.dumps(value)
            except TypeError:
                raise TraceError(f"{self.owner} passes its denoiser '{key}' = {type(value).__name__}, which accel "
                                 "train cannot store; pass it as a JSON value or leave it unset") from None
            constants[key] = value
        return shared, constants
