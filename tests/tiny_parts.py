"""Parts of the tiny offline pipelines: stand-in text embeddings, a pipeline built with only the
components it needs, and the schedulers of the families' released checkpoints."""

from __future__ import annotations

import inspect
from typing import Any

import torch

Built = tuple[Any, dict]


def embeds(*shape: int, seed: int = 0) -> torch.Tensor:
    """A fixed random tensor standing in for a text encoder's output."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cond(dim: int, tokens: int = 3, **extra: torch.Tensor) -> dict:
    """prompt_embeds and negative_prompt_embeds of `tokens` tokens of width `dim`, plus `extra`."""
    return dict(prompt_embeds=embeds(1, tokens, dim), negative_prompt_embeds=embeds(1, tokens, dim, seed=1), **extra)


def pooled(dim: int) -> dict:
    """pooled_prompt_embeds and negative_pooled_prompt_embeds of width `dim`."""
    return dict(pooled_prompt_embeds=embeds(1, dim), negative_pooled_prompt_embeds=embeds(1, dim, seed=1))


def make_pipeline(cls: type, **components: Any) -> Any:
    """`cls` built from `components`; every other component it requires (text encoders, tokenizers,
    a VAE, image encoders) is None."""
    params = inspect.signature(cls.__init__).parameters
    absent = {name: None for name, param in params.items()
              if name != "self" and name not in components and param.default is inspect.Parameter.empty}
    return cls(**absent, **components)


def masks(tokens: int = 3, prompt: str = "prompt_attention_mask", dtype: torch.dtype = torch.long) -> dict:
    """All-ones attention masks of the prompt and negative prompt embeddings."""
    negative = "negative_" + prompt
    return {prompt: torch.ones(1, tokens, dtype=dtype), negative: torch.ones(1, tokens, dtype=dtype)}


# ----------------------------------------------------------------------------------------- schedulers
# The scheduler class and settings of the family's released checkpoint (its scheduler_config.json).


def flux_scheduler(**extra: Any):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096, **extra)


def unipc_flow(flow_shift: float):
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                   solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                   final_sigmas_type="zero")


def pixart_dpm():
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                       algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                                       lower_order_final=True)
