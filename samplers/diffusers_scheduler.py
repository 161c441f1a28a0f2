"""Every registered solver and schedule as a drop-in diffusers scheduler.

    pipe.scheduler = AccelScheduler.from_config(pipe.scheduler.config, solver="unipc_bh2")

works in FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline and WanPipeline. The
scheduler runs the solver's own core generator (samplers.loop): `timesteps` lists one entry per
model evaluation (a two-evaluation solver such as Heun repeats levels, like diffusers' Heun
schedulers), `sigmas[i]` is the noise level of evaluation i (plus the final level, as diffusers'
schedulers end theirs), each `step()` feeds one model output and returns the point of the next
evaluation, and multistep history lives in the generator across calls. The walk the solver steps
along is `solver_sigmas`. Latents stay in the model's own space (x = alpha x0 + s eps), so
`init_noise_sigma` is 1 and `scale_model_input` is the identity. Before every model call the step
context of that call is published (step_context.set_current); after the last step it is cleared.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from samplers.api import make_sigmas
from samplers.denoiser import FlowSchedule, prediction_to_x0
from samplers.loop import Evaluation, advance, check_sigmas, evaluation_context, model_timestep
from samplers.registry import DEFAULT_SCHEDULES, SolverSpec, get_schedule, get_solver
from samplers.schedules import optimized_solver_options, shift_time, vp_schedule_from_betas
from step_context import new_generation, set_current

PREDICTION_ALIASES = {"flow": "flow", "flow_prediction": "flow", "epsilon": "epsilon", "v": "v",
                      "v_prediction": "v", "x0": "x0", "sample": "x0"}


def plan_evaluations(spec: SolverSpec, sigmas: torch.Tensor, schedule, options: dict) -> list[Evaluation]:
    """The evaluation points of a solver on a walk, found by a dry run of its core on a zero sample."""
    dry = dict(options)
    if "generator" in inspect.signature(spec.steps).parameters:
        dry["generator"] = torch.Generator().manual_seed(0)  # leaves the global random state alone
    zero = torch.zeros(1, dtype=torch.float64)
    core = spec.make_steps(zero, sigmas, schedule, **dry)
    plan, (request, _) = [], advance(core, None)
    while request is not None:
        plan.append(Evaluation(torch.empty(0), request.sigma, request.step_index, request.stage))
        request, _ = advance(core, zero)
    return plan


class AccelScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any registered solver on any registered schedule.

    Args:
        solver: a name in samplers.SOLVERS.
        schedule: a name in samplers.SCHEDULES, or "auto": FLUX's dynamic shift when
            `use_dynamic_shifting`, else uniform t shifted by `shift` (flow); Karras (VP).
        prediction_type: the model's output: "flow" / "flow_prediction", "epsilon", "v" /
            "v_prediction" or "x0" / "sample".
        noise_schedule: "flow", "vp", or "auto" (flow exactly for flow predictions).
        num_train_timesteps: the model's timestep scale (timestep = 1000 t for flow).
        beta_start, beta_end, beta_schedule: the DDPM betas of a VP model.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len:
            the flow-matching shift settings, as in FlowMatchEulerDiscreteScheduler's config.
        schedule_options: keyword options of the schedule function (override the above).
        solver_options: keyword options of the solver core (e.g. {"eta": 0.3} for ddim).
        use_given_sigmas: follow `sigmas` passed by a pipeline (shifted by `mu` / `shift`) instead
            of taking only their count; FluxPipeline always passes its default uniform sigmas.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, solver: str = "dpmpp_2m", schedule: str = "auto", prediction_type: str = "flow",
                 noise_schedule: str = "auto", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, beta_schedule: str = "scaled_linear", shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 schedule_options: dict | None = None, solver_options: dict | None = None,
                 use_given_sigmas: bool = False):
        if prediction_type not in PREDICTION_ALIASES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of: "
                             f"{', '.join(PREDICTION_ALIASES)}")
        self.prediction = PREDICTION_ALIASES[prediction_type]
        family = ("flow" if self.prediction == "flow" else "vp") if noise_schedule == "auto" else noise_schedule
        self.solver_spec = get_solver(solver)
        self.solver_spec.check_fits(self.prediction, family)
        self.model_schedule = (FlowSchedule(num_train_timesteps=num_train_timesteps) if family == "flow" else
                               vp_schedule_from_betas(num_train_timesteps, beta_start, beta_end, beta_schedule))
        if schedule == "auto":
            schedule = "flux" if family == "flow" and use_dynamic_shifting else DEFAULT_SCHEDULES[family]
        self.schedule_name = schedule
        get_schedule(schedule).check_family(family)
        self.init_noise_sigma = 1.0
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None  # (nfe + 1,): one level per model evaluation, then the end
        self.solver_sigmas: torch.Tensor | None = None  # (N + 1,): the walk of solver steps
        self.num_inference_steps: int | None = None
        self._plan: list[Evaluation] = []
        self._solver_options: dict = dict(self.config.solver_options or {})
        self._core = None
        self._step_index: int | None = None
        self._generation = 0
        # Called with this scheduler at the end of every set_timesteps, i.e. once per pipeline
        # call, after the walk is built (accel.apply resolves its stack for the call's step count).
        self.generation_listeners: list[Callable[["AccelScheduler"], None]] = []

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """ConfigMixin.from_config, keeping every value of the source config, defaults included.

        diffusers replaces values a source scheduler left at *its* defaults with *this* class's
        defaults, which would silently swap e.g. DDIM's linear betas for scaled-linear ones. A
        config with betas but no prediction type (e.g. SD 1.5's PNDM) is an epsilon model.
        """
        if isinstance(config, Mapping):
            config = {key: value for key, value in config.items() if key != "_use_default_values"}
            if "beta_schedule" in config and "prediction_type" not in config:
                config["prediction_type"] = "epsilon"
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int | None:
        """Index of the next model evaluation in `timesteps`."""
        return self._step_index

    @property
    def begin_index(self) -> int:
        return 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only 0 is supported: generation always starts at the first timestep."""
        if begin_index != 0:
            raise ValueError("AccelScheduler starts at the first timestep only; img2img with strength < 1 "
                             "needs a diffusers scheduler")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: latents are already in the model's input space."""
        return sample

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

    def _given_sigmas(self, sigmas, timesteps) -> torch.Tensor | None:
        """Sigmas or timesteps a pipeline passed, as model noise levels (float64, CPU)."""
        if sigmas is None and timesteps is None:
            return None
        if sigmas is not None:
            return torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
        timesteps = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
        if isinstance(self.model_schedule, FlowSchedule):
            return timesteps / self.config.num_train_timesteps
        log_sigmas = self.model_schedule.train_sigmas.to(torch.float64).log().numpy()
        return torch.from_numpy(np.interp(timesteps.numpy(), np.arange(len(log_sigmas)), log_sigmas)).exp()

    def _follow_given(self, given: torch.Tensor, mu: float | None) -> torch.Tensor:
        if isinstance(self.model_schedule, FlowSchedule):
            if self.config.use_dynamic_shifting and mu is not None:
                given = math.exp(mu) / (math.exp(mu) + 1 / given - 1)
            elif self.config.shift != 1.0:
                given = shift_time(given, self.config.shift)
        if float(given[-1]) != 0:
            given = torch.cat([given, given.new_zeros(1)])
        return given.to(torch.float32)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, mu: float | None = None, timesteps=None) -> None:
        """Builds the walk and the evaluation plan, and publishes the context of the first call.

        Args:
            num_inference_steps: solver steps N (ignored when `sigmas` or `timesteps` are given).
            device: where `timesteps` live.
            sigmas: N levels from a pipeline; by default only their count is used.
            mu: FLUX's resolution-dependent shift, used by the "flux" schedule.
            timesteps: N timesteps from a pipeline, treated like `sigmas`.
        """
        given = self._given_sigmas(sigmas, timesteps)
        if given is not None:
            num_inference_steps = len(given) - int(len(given) > 1 and float(given[-1]) == 0)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        self._solver_options = dict(self.config.solver_options or {})
        if given is not None and self.config.use_given_sigmas:
            walk = self._follow_given(given, mu)
        else:
            options = self._schedule_options(mu)
            walk = make_sigmas(self.schedule_name, num_inference_steps, self.model_schedule, **options)
            self._solver_options = {**optimized_solver_options(self.schedule_name, options), **self._solver_options}
        self.solver_sigmas = check_sigmas(walk)
        self._plan = plan_evaluations(self.solver_spec, self.solver_sigmas, self.model_schedule,
                                      self._solver_options)
        # Pipelines read sigmas[i] and timesteps[i] for their i-th model call (WanPipeline,
        # CogView4, Cosmos); like diffusers' Heun schedulers, both list one entry per evaluation.
        self.sigmas = torch.tensor([p.sigma for p in self._plan] + [float(self.solver_sigmas[-1])],
                                   dtype=torch.float32)
        self.timesteps = torch.tensor([model_timestep(self.model_schedule, p.sigma) for p in self._plan],
                                      dtype=torch.float32, device=device)
        self.num_inference_steps = num_inference_steps
        self._core, self._step_index, self._generation = None, 0, new_generation()
        for listener in self.generation_listeners:
            listener(self)
        self._publish()

    def _publish(self) -> None:
        request = self._plan[self._step_index]
        set_current(evaluation_context(request, self.num_inference_steps, self.solver_spec.order,
                                       self._generation, self.model_schedule))

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
        x = sample.to(torch.float32)
        if self._core is None:
            options = dict(self._solver_options)
            if generator is not None and "generator" in inspect.signature(self.solver_spec.steps).parameters:
                options["generator"] = generator
            self._core = self.solver_spec.make_steps(x, self.solver_sigmas, self.model_schedule, **options)
            advance(self._core, None)
        sigma = torch.full((x.shape[0],), self._plan[self._step_index].sigma, dtype=torch.float32,
                           device=x.device)
        x0 = prediction_to_x0(model_output.to(torch.float32), x, sigma, self.prediction, self.model_schedule)
        request, result = advance(self._core, x0)
        self._step_index += 1
        if request is None:
            set_current(None)
            prev = result
        else:
            self._publish()
            prev = request.x
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
