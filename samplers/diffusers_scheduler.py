"""Every registered solver and schedule as a drop-in diffusers scheduler.

    pipe.scheduler = AccelScheduler.from_config(pipe.scheduler, solver="unipc_bh2")

works in FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, WanPipeline and their
img2img / inpainting variants. On `schedule="auto"` the solver walks exactly the levels and
timesteps of the pipeline's own scheduler (samplers.native_schedule), whose config it keeps whole
as `native_config`. The scheduler runs the solver's own core generator (samplers.loop):
`timesteps` lists one entry per model evaluation (a two-evaluation solver such as Heun repeats levels, like diffusers' Heun
schedulers), `sigmas[i]` is the noise level of evaluation i (plus the final level, as diffusers'
schedulers end theirs), each `step()` feeds one model output and returns the point of the next
evaluation, and multistep history lives in the generator across calls. The walk the solver steps
along is `solver_sigmas`. Latents stay in the model's own space (x = alpha x0 + s eps), so
`init_noise_sigma` is 1 and `scale_model_input` is the identity. Before every model call the step
context of that call is published (step_context.set_current); after the last step it is cleared.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from samplers.api import make_sigmas
from samplers.denoiser import FlowSchedule, prediction_to_x0
from samplers.loop import Evaluation, advance, check_sigmas, model_timestep, plan_evaluations
from samplers.native_schedule import describe_native, given_count, native_class, native_walk, values_key
from samplers.registry import DEFAULT_SCHEDULES, SOLVERS, get_schedule, get_solver
from samplers.schedules import optimized_solver_options, vp_schedule_from_betas
from step_context import StepContext, new_generation, set_current

PREDICTION_ALIASES = {"flow": "flow", "flow_prediction": "flow", "epsilon": "epsilon", "v": "v",
                      "v_prediction": "v", "x0": "x0", "sample": "x0"}


def _format_options(options: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in options.items())


class AccelScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any registered solver on any registered schedule.

    Args:
        solver: a name in samplers.SOLVERS.
        schedule: a name in samplers.SCHEDULES, or "auto": the walk of the pipeline's own
            scheduler (`native_config`), with its timesteps; without one, FLUX's dynamic shift
            when `use_dynamic_shifting`, else uniform t shifted by `shift` (flow), Karras (VP).
        prediction_type: the model's output: "flow" / "flow_prediction", "epsilon", "v" /
            "v_prediction" or "x0" / "sample".
        noise_schedule: "flow", "vp", or "auto" (flow exactly for flow predictions).
        num_train_timesteps: the model's timestep scale (timestep = 1000 t for flow).
        beta_start, beta_end, beta_schedule: the DDPM betas of a VP model.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len:
            the flow-matching shift settings of the named schedules "flow" and "flux".
        schedule_options: keyword options of the schedule function (override the above).
        solver_options: keyword options of the solver core (e.g. {"eta": 0.3} for ddim).
        native_config: the full config of the scheduler this one replaces (with `_class_name`);
            `from_config` of another scheduler's config fills it in. Its keys are readable in
            `config` where this scheduler has none of its own, as pipelines read them.
    """

    config_name = "scheduler_config.json"
    order = 1  # timesteps list every model evaluation; pipelines step once per entry

    @register_to_config
    def __init__(self, solver: str = "dpmpp_2m", schedule: str = "auto", prediction_type: str = "flow",
                 noise_schedule: str = "auto", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, beta_schedule: str = "scaled_linear", shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 schedule_options: dict | None = None, solver_options: dict | None = None,
                 native_config: dict | None = None):
        if prediction_type not in PREDICTION_ALIASES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of: "
                             f"{', '.join(PREDICTION_ALIASES)}")
        self.prediction = PREDICTION_ALIASES[prediction_type]
        family = ("flow" if self.prediction == "flow" else "vp") if noise_schedule == "auto" else noise_schedule
        self.solver_spec = get_solver(solver)
        self.solver_spec.check_fits(self.prediction, family)
        self.model_schedule = (FlowSchedule(num_train_timesteps=num_train_timesteps) if family == "flow" else
                               vp_schedule_from_betas(num_train_timesteps, beta_start, beta_end, beta_schedule))
        if schedule == "auto" and native_class(native_config) is not None:
            if schedule_options:
                raise ValueError(f"schedule 'auto' walks the pipeline's {native_config['_class_name']} and takes "
                                 f"no schedule options (got {sorted(schedule_options)}); name a schedule "
                                 "(flow, flux, karras, ...) to pass options")
            schedule = "native"
        elif schedule == "auto":
            schedule = "flux" if family == "flow" and use_dynamic_shifting else DEFAULT_SCHEDULES[family]
        self.schedule_name = schedule
        if schedule != "native":
            get_schedule(schedule).check_family(family)
        # Mochi's scheduler inverts flow time (its model's t = 0 is noise, its output x0 - eps)
        self._inverted = schedule == "native" and family == "flow" and bool(native_config.get("invert_sigmas"))
        self.init_noise_sigma = 1.0
        self.timesteps: torch.Tensor | None = None  # (nfe,): the model timestep of every evaluation
        self.sigmas: torch.Tensor | None = None  # (nfe + 1,): one level per model evaluation, then the end
        self.solver_sigmas: torch.Tensor | None = None  # (N + 1,): the walk of solver steps
        self.num_inference_steps: int | None = None
        self._plan: list[Evaluation] = []
        self._plan_timesteps: list[float] = []
        self._solver_options: dict = dict(solver_options or {})
        self._walks: dict[tuple, tuple] = {}  # set_timesteps arguments -> what _build_walk made of them
        self._core = None
        self._step_index: int | None = None
        self._begin_index = 0
        self._generation = 0
        # Called with this scheduler at the end of every set_timesteps, i.e. once per pipeline
        # call, after the walk is built (accel.apply resolves its stack for the call's step count).
        self.generation_listeners: list[Callable[["AccelScheduler"], None]] = []

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """ConfigMixin.from_config, keeping every value of the source config, defaults included.

        diffusers replaces values a source scheduler left at *its* defaults with *this* class's
        defaults, which would silently swap e.g. DDIM's linear betas for scaled-linear ones. The
        config of another scheduler is also kept whole as `native_config` (the walk of
        `schedule="auto"`); keys this class does not take are not passed on. A config with betas
        but no prediction type (e.g. SD 1.5's PNDM) is an epsilon model. `config` may also be the
        scheduler itself: a scheduler built in code has no `_class_name` in its config (one loaded
        with from_pretrained has), and without it "auto" cannot rebuild the native walk.
        """
        if isinstance(config, ConfigMixin):
            config = {**config.config, "_class_name": type(config).__name__}
        if isinstance(config, Mapping):
            config = {key: value for key, value in config.items() if key != "_use_default_values"}
            name = config.get("_class_name")
            if name is not None and name != cls.__name__:
                kwargs.setdefault("native_config", {key: value for key, value in config.items()
                                                    if key == "_class_name" or not key.startswith("_")})
            accepted = set(inspect.signature(cls.__init__).parameters)
            config = {key: value for key, value in config.items() if key in accepted or key == "_class_name"}
            if "beta_schedule" in config and "prediction_type" not in config:
                config["prediction_type"] = "epsilon"
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def config(self) -> FrozenDict:
        """This scheduler's config, plus the keys of `native_config` it has no value for.

        Pipelines read their scheduler's settings (`config.get("base_image_seq_len")`,
        `config.use_flow_sigmas`, ...) to compute `mu` or their sigmas; they read the same values
        here. save_config writes only this scheduler's own keys (the native ones stay nested).
        """
        own = self._internal_dict
        view = self.__dict__.get("_config_view")
        if view is None or view[0] is not own:
            native = own.get("native_config") or {}
            extra = {key: value for key, value in native.items() if not key.startswith("_") and key not in own}
            view = (own, FrozenDict({**own, **extra}) if extra else own)
            self.__dict__["_config_view"] = view
        return view[1]

    @staticmethod
    def supports_partial_start(solver: str) -> bool:
        """Whether `solver` can start mid-walk (img2img, inpainting): one model evaluation per step."""
        return get_solver(solver).supports_partial_start

    def describe(self) -> str:
        """The schedule this scheduler walks, in words (e.g. "flow, shift 3.0 (from the pipeline's ...)")."""
        family = self.model_schedule.name
        if self.schedule_name == "native":
            return describe_native(self.config.native_config, family)
        options = self._schedule_options(None)
        text = f"{family}, {self.schedule_name} schedule" + (f" ({_format_options(options)})" if options else "")
        if self.config.schedule != "auto":
            return text
        source = (self.config.native_config or {}).get("_class_name")
        return text + (f", the family default ({source} is not a diffusers scheduler)" if source else
                       ", the family default (no pipeline scheduler config)")

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int | None:
        """Index of the next model evaluation in `timesteps`."""
        return self._step_index

    @property
    def begin_index(self) -> int:
        """Index in `timesteps` of the first model evaluation (> 0 for img2img with strength < 1)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Starts the walk at model evaluation `begin_index`, as img2img and inpainting pipelines do.

        The solver then walks `solver_sigmas[begin_index:]` from the latents the pipeline noised with
        `scale_noise` / `add_noise` at that level. Supported for one-evaluation solvers only.
        """
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be an integer >= 0, got {begin_index!r}")
        if begin_index > 0 and not self.solver_spec.supports_partial_start:
            starts = ", ".join(name for name, spec in SOLVERS.items() if spec.supports_partial_start)
            raise ValueError(f"solver {self.solver_spec.name!r} takes {self.solver_spec.evals_per_step} model "
                             "evaluations per step and cannot start mid-walk (img2img / inpainting with "
                             f"strength < 1); use one of: {starts}")
        if self._plan and begin_index >= len(self._plan):
            raise ValueError(f"begin_index {begin_index} is past the {len(self._plan)} timesteps; call "
                             "set_timesteps(...) with more steps or a smaller begin index")
        self._begin_index = int(begin_index)
        if self._plan:
            self._step_index, self._core = self._begin_index, None
            self._publish()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: latents are already in the model's input space."""
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The forward process at `timestep`: alpha x0 + s noise (flow: t noise + (1 - t) sample).

        Args:
            sample: (B, ...) clean latents x0.
            timestep: (B,) or a scalar: entries of `timesteps` (the level they are evaluated at).
            noise: (B, ...) standard normal noise.

        Returns:
            (B, ...) the noised latents, in the model's own space.
        """
        if noise is None:
            raise ValueError("scale_noise needs the noise to add (noise=...)")
        alpha, s = self.model_schedule.alpha_sigma(self._level_of(timestep, sample.device))
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return (alpha.reshape(shape) * sample.float() + s.reshape(shape) * noise.float()).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """DDPM's forward process, sqrt(abar) x0 + sqrt(1 - abar) noise for VP models (as scale_noise)."""
        return self.scale_noise(original_samples, timesteps, noise)

    def _level_of(self, timestep, device: torch.device) -> torch.Tensor:
        """(B,) float32 noise levels of model timesteps, without a host sync.

        Flow: the level of the nearest entry of `timesteps` (its timesteps need not be 1000 t), or
        t = timestep / num_train_timesteps before set_timesteps. VP: the VE sigma of the
        (fractional) DDPM timestep from the training alphas, as DDPM's add_noise indexes them.
        """
        t = torch.as_tensor(timestep).to(device=device, dtype=torch.float32).reshape(-1)
        if isinstance(self.model_schedule, FlowSchedule):
            if self.timesteps is None:
                return t / self.config.num_train_timesteps
            index = (self.timesteps.to(device)[None, :] - t[:, None]).abs().argmin(dim=1)
            return self.sigmas.to(device)[index]
        log_sigmas = self.model_schedule.train_sigmas.to(device=device, dtype=torch.float32).log()
        t = t.clamp(0, len(log_sigmas) - 1)
        low = t.floor().clamp(max=len(log_sigmas) - 2)
        index = low.long()
        return torch.lerp(log_sigmas[index], log_sigmas[index + 1], t - low).exp()

    def _schedule_options(self, mu: float | None) -> dict:
        config, options = self.config, {}
        if config.schedule == "auto" and self.schedule_name == "flow":
            options["shift"] = config.shift
        if self.schedule_name == "flux":
            options.update(base_shift=config.base_shift, max_shift=config.max_shift,
                           base_image_seq_len=config.base_image_seq_len,
                           max_image_seq_len=config.max_image_seq_len)
            if mu is not None:
                options["mu"] = float(mu)
        if self.schedule_name == "optimized":
            options["solver"] = config.solver
        return {**options, **(config.schedule_options or {})}

    def _walk(self, num_inference_steps: int | None, sigmas, mu, timesteps) -> tuple[torch.Tensor, dict]:
        """(N + 1,) levels to walk and {level: native timestep} of its evaluations (empty if not native)."""
        self._solver_options = dict(self.config.solver_options or {})
        if self.schedule_name == "native":
            native = native_walk(self.config.native_config, self.model_schedule,
                                 num_inference_steps=num_inference_steps, sigmas=sigmas, mu=mu, timesteps=timesteps)
            return native.sigmas, dict(zip(native.sigmas.tolist(), native.timesteps.tolist()))
        given = given_count(sigmas, timesteps)  # a named schedule takes only the count of given levels
        num_inference_steps = given if given is not None else num_inference_steps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        options = self._schedule_options(mu)
        walk = make_sigmas(self.schedule_name, num_inference_steps, self.model_schedule, **options)
        self._solver_options = {**optimized_solver_options(self.schedule_name, options), **self._solver_options}
        return walk, {}

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, mu: float | None = None, timesteps=None) -> None:
        """Builds the walk and the evaluation plan, and publishes the context of the first call.

        Args:
            num_inference_steps: solver steps N (the native scheduler's count on "auto").
            device: where `timesteps` live.
            sigmas: levels from a pipeline: passed to the native scheduler on "auto"; a named
                schedule takes only their count.
            mu: FLUX's resolution-dependent shift (native scheduler, or the "flux" schedule).
            timesteps: timesteps from a pipeline, treated like `sigmas`.
        """
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or
                                                not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        key = (num_inference_steps, None if mu is None else float(mu), values_key(sigmas), values_key(timesteps))
        known = self._walks.get(key)
        if known is None:
            known = self._build_walk(num_inference_steps, sigmas, mu, timesteps)
            if len(self._walks) >= 32:  # a handful of (steps, image size) pairs in practice
                self._walks.pop(next(iter(self._walks)))
            self._walks[key] = known
        self.solver_sigmas, self._plan, self._plan_timesteps, self._solver_options = known
        self.solver_sigmas = self.solver_sigmas.clone()
        self.sigmas = torch.tensor([p.sigma for p in self._plan] + [float(self.solver_sigmas[-1])],
                                   dtype=torch.float32)
        self.timesteps = torch.tensor(self._plan_timesteps, dtype=torch.float32, device=device)
        self.num_inference_steps = len(self.solver_sigmas) - 1
        self._core, self._step_index, self._begin_index, self._generation = None, 0, 0, new_generation()
        for listener in self.generation_listeners:
            listener(self)
        self._publish()

    def _build_walk(self, num_inference_steps: int | None, sigmas, mu, timesteps) -> tuple:
        """(solver sigmas, evaluation plan, timestep of each evaluation, solver options) of a call.

        set_timesteps keeps the result per call arguments (a pipeline calls it once per
        generation with the same arguments), since rebuilding the native scheduler and dry-running
        the solver cost more than a whole denoising step of a small model.
        """
        walk, native_timesteps = self._walk(num_inference_steps, sigmas, mu, timesteps)
        solver_sigmas = check_sigmas(walk)
        plan = plan_evaluations(self.solver_spec, solver_sigmas, self.model_schedule, self._solver_options)
        # Pipelines read sigmas[i] and timesteps[i] for their i-th model call (WanPipeline,
        # CogView4, Cosmos); like diffusers' Heun schedulers, both list one entry per evaluation.
        # An evaluation at a native level gets the native timestep; others the model's own map.
        plan_timesteps = [native_timesteps[p.sigma] if p.sigma in native_timesteps else
                          self._model_timestep(p.sigma) for p in plan]
        return solver_sigmas, plan, plan_timesteps, dict(self._solver_options)

    def _model_timestep(self, sigma: float) -> float:
        """The model's timestep of a level off the native walk (1000 t; 1000 (1 - t) where inverted)."""
        if self._inverted:
            return (1 - sigma) * self.config.num_train_timesteps
        return model_timestep(self.model_schedule, sigma)

    def _publish(self) -> None:
        """Publishes the context of the next evaluation (one StepContext per model call)."""
        request = self._plan[self._step_index]
        set_current(StepContext(step_index=request.step_index, num_steps=self.num_inference_steps,
                                sigma=request.sigma, timestep=self._plan_timesteps[self._step_index],
                                solver_order=self.solver_spec.order, generation=self._generation,
                                stage=request.stage))

    def _start_core(self, x: torch.Tensor, generator: torch.Generator | None) -> None:
        """Starts the solver core at the current evaluation (the begin index), on the rest of the walk."""
        start = self._plan[self._step_index].step_index
        options = dict(self._solver_options)
        if generator is not None and "generator" in inspect.signature(self.solver_spec.steps).parameters:
            options["generator"] = generator
        if start and options.get("compensation") is not None:
            options["compensation"] = list(options["compensation"])[start:]
        self._core = self.solver_spec.make_steps(x, self.solver_sigmas[start:], self.model_schedule, **options)
        advance(self._core, None)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Feeds one model output to the solver and returns the point of the next evaluation.

        Args:
            model_output: (B, ...) the raw model prediction at `sample`.
            timestep: the current entry of `timesteps` (the scheduler keeps its own index).
            sample: (B, ...) the latents the model was evaluated at.
            generator: random source for stochastic solvers (ddim with eta > 0).
            return_dict: return a SchedulerOutput rather than a tuple.

        Returns:
            prev_sample (B, ...): the next evaluation point, or the final sample after the last call.
        """
        if not self._plan:
            raise ValueError("call set_timesteps(...) before step()")
        if self._step_index >= len(self._plan):
            raise ValueError(f"all {len(self._plan)} timesteps are done; call set_timesteps(...) again")
        x = sample if sample.dtype == torch.float32 else sample.to(torch.float32)
        if self._core is None:
            self._start_core(x, generator)
        output = model_output if model_output.dtype == torch.float32 else model_output.to(torch.float32)
        if self._inverted:
            output = -output  # an inverted-time flow model (Mochi) predicts x0 - eps
        level = self._plan[self._step_index].sigma
        if self.prediction == "flow":
            # velocity_to_x0 with the level as a scalar: the same float32 products, no (B,) tensor
            x0 = x - level * output
        else:
            sigma = torch.full((x.shape[0],), level, dtype=torch.float32, device=x.device)
            x0 = prediction_to_x0(output, x, sigma, self.prediction, self.model_schedule)
        request, result = advance(self._core, x0)
        self._step_index += 1
        if request is None:
            set_current(None)
            prev = result
        else:
            self._publish()
            prev = request.x
        prev = prev if prev.dtype == sample.dtype else prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
