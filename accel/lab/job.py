"""A lab job: one model, one set of inputs, one reference, and configurations measured beside it.

`accel run`, `accel ablate`, `accel calibrate` and the benches are lists of `Configuration`s over a
`Job`. A configuration is a Stack (or none: the pipeline's own scheduler) with a label and a kind;
`Job.measure` applies it to the pipeline with `accel.apply`, generates every sample under the FLOP
counter, times a batch, removes it, scores it against the reference and stores the record under the
fingerprint of everything that determined it. A record with the same fingerprint is reused.

    job = Job.open(recipe, command="accel run")
    reference, ref_images = job.reference()
    record, images = job.measure(Configuration.from_recipe(recipe, label=recipe.name, kind="run"))
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from omegaconf import DictConfig, OmegaConf

import accel
from accel.calibration import calibrated_recipe
from accel.distributed import is_main_process, process_state, wait_for_everyone
from accel.lab.evaluate import Evaluator
from accel.lab.fingerprint import code_versions, fingerprint
from accel.lab.generate import generate_counted, time_generation
from accel.lab.inputs import Inputs, build_inputs
from accel.lab.models import LabModel, load_model
from accel.lab.records import RecordStore
from accel.stack import GuidancePlan, SamplerPlan, Stack

REFERENCE_CACHE = ".reference-cache"


@dataclass(frozen=True)
class Configuration:
    """One thing to measure.

    Attributes:
        label: a short human name (table rows, image grids).
        kind: "reference", "run", "stack", "equal-flops-baseline" or "anchor".
        stack: the stack to apply, or None for the pipeline as loaded (its own scheduler).
        steps: solver steps of the pipeline call.
        guidance: the guidance the pipeline call runs with.
        overrides: the recipe keys this configuration sets (ablation cells), for the record.
        install: for anchors (other projects' caches): a context manager factory taking the pipeline.
        identity: what `install` does, JSON-ready (part of the fingerprint).
    """

    label: str
    kind: str
    stack: Stack | None
    steps: int
    guidance: GuidancePlan
    overrides: dict = field(default_factory=dict)
    install: Callable[[Any], ContextManager] | None = None
    identity: dict = field(default_factory=dict)

    @classmethod
    def from_recipe(cls, recipe: DictConfig, *, label: str, kind: str, overrides: dict | None = None) -> "Configuration":
        """The recipe's own stack."""
        stack = Stack.from_recipe(recipe)
        return cls(label, kind, stack, stack.sampler.steps, stack.guidance, dict(overrides or {}))

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity (part of the fingerprint)."""
        return {"kind": self.kind, "stack": None if self.stack is None else self.stack.to_dict(),
                "steps": self.steps, "guidance": dataclasses.asdict(self.guidance), "install": self.identity}


def reference_configuration(recipe: DictConfig) -> Configuration:
    """The full-compute reference: `eval.reference` (solver null: the pipeline's own scheduler)."""
    section = recipe.eval.reference
    scale = section.get("guidance_scale")
    guidance = GuidancePlan(float(recipe.guidance.scale if scale is None else scale), bool(recipe.guidance.distilled))
    if section.get("solver") is None:
        return Configuration("reference", "reference", None, int(section.steps), guidance)
    plan = SamplerPlan(str(section.solver), int(section.steps), str(section.schedule),
                       OmegaConf.to_container(section.schedule_params), OmegaConf.to_container(section.solver_params))
    return Configuration("reference", "reference", Stack(plan, guidance=guidance), plan.steps, guidance)


@dataclass
class Job:
    """The shared part of every configuration of one lab command.

    Attributes:
        recipe: the validated recipe.
        model: the loaded pipeline.
        inputs: the samples.
        folder: the command's output folder.
        store: finished records of this folder.
        evaluator: the metrics (built on first use).
    """

    recipe: DictConfig
    model: LabModel
    inputs: Inputs
    folder: Path
    store: RecordStore
    _evaluator: Evaluator | None = None
    _reference: tuple[dict, torch.Tensor] | None = None

    @classmethod
    def open(cls, recipe: DictConfig, command: str, folder: Path | None = None) -> "Job":
        """Loads the model and builds the inputs; claims the output folder for `command`."""
        from accel.io import claim_folder
        from accel.lab.models import check_model_device

        check_model_device(recipe.model)  # before anything is written
        folder = folder or Path(recipe.output.dir) / recipe.name
        if is_main_process():
            claim_folder(folder, command)
        wait_for_everyone()
        model = load_model(recipe.model)
        recipe = calibrated_recipe(recipe, model.pipe)  # a calibration file must fit these weights
        inputs = build_inputs(recipe.inputs, model.is_embedded)
        return cls(recipe, model, inputs, folder, RecordStore(folder, process_state().process_index))

    def check(self, configs: list[Configuration], *, resolve_stacks: bool = True) -> None:
        """Checks, before any generation, that every configuration's adapters are whole safetensors
        files shaped for this denoiser and (with `resolve_stacks`) that its stack resolves on this
        pipeline: a stack that cannot work stops here with one line.

        Raises:
            StackError: the first adapter or stack that does not fit.
            EvalError: a metric this run cannot compute.
        """
        from accel.adapter_files import check_adapter_fits
        from accel.pipeline import run_info_for
        from accel.resolve import resolve

        for config in configs:
            if config.stack is None:
                continue
            for adapter in config.stack.adapters:
                check_adapter_fits(self.model.denoiser, adapter.path, self.model.denoiser_name)
            if resolve_stacks:
                resolve(config.stack, run_info_for(self.model.pipe, config.stack))
        self.evaluator  # noqa: B018 - metric names, extras and sample counts are checked before any work

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            evaluation = self.recipe.eval
            self._evaluator = Evaluator(list(evaluation.metrics), self.inputs, embedded=self.model.is_embedded,
                                        metric_models=dict(evaluation.get("metric_models") or {}),
                                        real_samples=int(evaluation.real_samples),
                                        resolution=self.inputs.height or 16)
        return self._evaluator

    def determined_by(self, config: Configuration) -> dict[str, Any]:
        """Everything a configuration's record depends on (hashed into its fingerprint)."""
        evaluation = OmegaConf.to_container(self.recipe.eval, resolve=True)
        return {"configuration": config.describe(), "model": {"name": self.model.name, "weights": self.model.weights_hash,
                                                               "device": str(self.model.device),
                                                               "dtype": str(self.model.denoiser.dtype)},
                "inputs": self.inputs.describe(), "batch_size": int(self.recipe.inputs.batch_size),
                "eval": evaluation, "versions": code_versions(), "threads": torch.get_num_threads()}

    def reference(self) -> tuple[dict, torch.Tensor]:
        """The reference record and images, from the shared reference cache or measured once."""
        if self._reference is None:
            cache = RecordStore(Path(self.recipe.output.dir) / REFERENCE_CACHE, process_state().process_index)
            config = reference_configuration(self.recipe)
            payload = self.determined_by(config)
            payload.pop("eval")  # images, FLOPs and wall-clock of the reference do not depend on metrics
            record, images, fresh = self._measured(config, payload, cache, score=False)
            if not fresh and is_main_process():  # cached images and FLOPs; wall-clock is timed beside this run
                record = {**record, "wall_seconds": self._time(config)}
            self._reference = (record, images)
        return self._reference

    def _time(self, config: Configuration) -> float:
        """Wall-clock of `config` on this machine now (median of the recipe's timing repeats)."""
        pipe, evaluation = self.model.pipe, self.recipe.eval
        if config.stack is not None:
            accel.apply(pipe, config.stack)
        try:
            return time_generation(self.model, self.inputs, config.steps, config.guidance,
                                   int(evaluation.timing_batch), int(evaluation.timing_repeats))
        finally:
            if config.stack is not None:
                accel.remove(pipe)

    def payload_of(self, config: Configuration) -> dict[str, Any]:
        """What a configuration's record in this job is a function of (the reference included)."""
        reference, _ = self.reference()
        return {**self.determined_by(config), "reference": reference["fingerprint"]}

    def measure(self, config: Configuration, *, split: bool = True) -> tuple[dict, torch.Tensor]:
        """The record and images of `config` (reused when its fingerprint is stored), scored against the reference."""
        record, images, _ = self._measured(config, self.payload_of(config), self.store, score=True, split=split)
        return record, images

    def report_resumption(self, configs: list[Configuration]) -> None:
        """Says how many configurations are already measured, and which stored records were made with
        other settings (they are kept, not mixed in: their fingerprints differ)."""
        payloads = {config.label: self.payload_of(config) for config in configs}
        done = sum(self.store.get(fingerprint(p)) is not None for p in payloads.values())
        keys = sorted({key for label, payload in payloads.items()
                       for key in self.store.superseded(label, fingerprint(payload), payload)})
        if done:
            print(f"resuming: {done} of {len(configs)} configurations already measured with these settings", flush=True)
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            print(f"accel: {self.folder} also holds records made with other settings (differing in {shown}); "
                  "they are measured anew, not mixed in", flush=True)

    def _measured(self, config: Configuration, payload: dict, store: RecordStore, *, score: bool,
                  split: bool = True) -> tuple[dict, torch.Tensor, bool]:
        """(record, images, whether measured now): the stored record of the payload's fingerprint, or a new one."""
        key = fingerprint(payload)
        record = store.get(key)
        images = store.images(key) if record is not None else None
        if record is not None and images is not None:
            return record, images, False
        record, images = self._generate(config, split)
        record.update(fingerprint=key, determined_by=payload)
        if score:
            reference, ref_images = self.reference()
            record.update(self.evaluator(images, ref_images, config.label))
            record["flops_speedup"] = reference["flops"] / record["flops"]
            record["wall_speedup"] = reference["wall_seconds"] / record["wall_seconds"]
        if is_main_process() or not split:
            store.add(record, images)
        if split:
            wait_for_everyone()
            store.reload()
        return record, images, True

    def _generate(self, config: Configuration, split: bool) -> tuple[dict, torch.Tensor]:
        pipe, evaluation = self.model.pipe, self.recipe.eval
        resolved = accel.apply(pipe, config.stack) if config.stack is not None else None
        try:
            with config.install(pipe) if config.install is not None else contextlib.nullcontext():
                generated = generate_counted(self.model, self.inputs, config.steps, config.guidance,
                                             int(self.recipe.inputs.batch_size), config.label, split)
                summary = accel.summary(pipe).to_dict() if resolved is not None else None
                wall = float("nan")
                if is_main_process() or not split:
                    wall = time_generation(self.model, self.inputs, config.steps, config.guidance,
                                           int(evaluation.timing_batch), int(evaluation.timing_repeats))
        finally:
            if resolved is not None:
                accel.remove(pipe)
        return _record(config, resolved, summary, generated, wall), generated.images


def _record(config: Configuration, resolved: Any, summary: dict | None, generated: Any, wall: float) -> dict:
    stack = config.stack
    sampler = stack.sampler if stack is not None else None
    passes = 2 if config.guidance.has_uncond_pass else 1
    nfe = (sampler.spec.nfe(config.steps) if sampler is not None else config.steps) * passes
    return {"label": config.label, "kind": config.kind, "overrides": config.overrides,
            "solver": sampler.solver if sampler else "pipeline scheduler", "steps": config.steps,
            "schedule": sampler.schedule if sampler else "pipeline", "nfe": nfe, "flops": generated.flops,
            "flops_total": generated.flops_total, "tflops": generated.flops / 1e12, "wall_seconds": wall,
            "stack": None if resolved is None else resolved.to_dict(), "last_call": summary,
            "anchor": config.identity or None}
