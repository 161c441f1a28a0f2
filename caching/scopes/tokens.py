"""Token scope: on cached steps recompute only the tokens that changed most (ToCa).

ToCa (Zou et al., ICLR 2025, "Accelerating Diffusion Transformers with Token-wise Feature Caching",
arXiv:2410.05317) refreshes the cache fully every N steps and, in between, recomputes a share of
the tokens chosen by a score, reusing cached features for the rest. Here the cached layers are
the token-wise modules the block layouts name (MLPs and FLUX's single-block projections), whose
output for a token depends on that token alone, so a gathered subset gives exactly the full
computation's values for those tokens. The score of a token is the relative L1 change of its
input since its cached output was computed, times (1 + staleness * steps since then). Attention
itself runs in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..config import ScopeConfig, check_range
from ..hooks import InstalledHook, install_hook
from ..layouts import ModelLayout, registration_call, submodule, transformer_blocks

if TYPE_CHECKING:
    from ..runtime import CacheRuntime, CallFrame

_EPS = 1e-8


@dataclass
class TokenScope(ScopeConfig):
    """ToCa-style token-subset caching of token-wise modules.

    Attributes:
        fraction: share of tokens recomputed on a cached step, in (0, 1].
        staleness: weight of the steps since a token was computed in its score (>= 0).
    """

    name: ClassVar[str] = "tokens"
    fraction: float = 0.2
    staleness: float = 0.0

    def __post_init__(self) -> None:
        check_range("TokenScope", "fraction", self.fraction, 1e-9, 1.0, "the share of tokens recomputed")
        check_range("TokenScope", "staleness", self.staleness, 0.0, 1e6)


@dataclass
class TokenSlot:
    """Per-branch state of one token-wise module.

    Attributes:
        forecaster: forecasts full outputs from the full refreshes.
        cache: latest output per token (B, N, D_out).
        reference: input per token when its cached output was computed (B, N, D_in).
        age: steps since each token was computed (B, N).
    """

    forecaster: Any
    cache: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    age: torch.Tensor | None = None

    def tensors(self):
        yield from self.forecaster.tensors()
        yield from (t for t in (self.cache, self.reference, self.age) if t is not None)


class TokenCacheHook(ModelHook):
    """On one token-wise module: full compute on refresh steps, top-k tokens otherwise."""

    def __init__(self, runtime: "CacheRuntime", unit: str, scope: TokenScope) -> None:
        super().__init__()
        self.runtime, self.unit, self.scope = runtime, unit, scope
        self.is_reuse = runtime.config.update.name == "reuse"

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame, original = self.runtime.frame, self.fn_ref.original_forward
        if frame is None or frame.is_passthrough:
            return original(*args, **kwargs)
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        unit = frame.occurrence_key(self.unit)
        slot = self.runtime.slot(frame, unit, self._new_slot)
        is_partial = (frame.should_compute is False and slot.cache is not None and x.ndim == 3
                      and slot.reference.shape == x.shape)
        if is_partial:
            return self._partial(frame, unit, slot, x, args, kwargs)
        output = (self.runtime.run_unit(frame, unit, original, *args, **kwargs) if frame.measure_flops
                  else original(*args, **kwargs))
        frame.tokens.append((x.shape[-2], x.shape[-2]) if x.ndim == 3 else (1, 1))
        if frame.record and x.ndim == 3:
            slot.cache, slot.reference = output, x
            slot.age = torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)
            if not self.is_reuse:
                self._record_forecast(frame, slot, output)
        return output

    @torch.compiler.disable
    def _record_forecast(self, frame: "CallFrame", slot: TokenSlot, output: torch.Tensor) -> None:
        slot.forecaster.record(frame.coordinate, (output,))

    @torch.compiler.disable
    def _predict(self, frame: "CallFrame", slot: TokenSlot) -> torch.Tensor:
        return slot.forecaster.predict(frame.coordinate)[0]

    def _new_slot(self) -> TokenSlot:
        return TokenSlot(self.runtime.config.update.new_forecaster())

    def _partial(self, frame: "CallFrame", unit: str, slot: TokenSlot, x: torch.Tensor, args: tuple, kwargs: dict):
        batch, tokens, _ = x.shape
        count = min(tokens, max(1, math.ceil(self.scope.fraction * tokens - 1e-9)))
        change = (x - slot.reference).abs().mean(-1) / slot.reference.abs().mean(-1).clamp_min(_EPS)
        score = change * (1.0 + self.scope.staleness * slot.age) if self.scope.staleness else change
        index = score.topk(count, dim=1).indices                                  # (B, k)
        chosen = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))      # (B, k, D_in)
        if args:
            fresh = self.fn_ref.original_forward(chosen, *args[1:], **kwargs)
        else:
            name = next(k for k, v in kwargs.items() if v is x)
            fresh = self.fn_ref.original_forward(**{**kwargs, name: chosen})
        out_index = index.unsqueeze(-1).expand(-1, -1, fresh.shape[-1])
        base = slot.cache if self.is_reuse else self._predict(frame, slot)
        output = base.scatter(1, out_index, fresh.to(base.dtype))
        if frame.record:
            slot.cache = slot.cache.scatter(1, out_index, fresh.to(slot.cache.dtype))
            slot.reference = slot.reference.scatter(1, index.unsqueeze(-1).expand_as(chosen), chosen)
            slot.age = (slot.age + 1).scatter(1, index, 0.0)
        frame.skipped.append((unit, 1.0 - count / tokens))
        frame.tokens.append((count, tokens))
        return output


def apply_token_scope(runtime: "CacheRuntime", model: torch.nn.Module, layout: ModelLayout,
                      scope: TokenScope) -> list[InstalledHook]:
    """Installs a TokenCacheHook on every token-wise module the block layouts name."""
    installed = []
    blocks = transformer_blocks(model, layout)
    for ref in blocks:
        for attr in ref.layout.token_modules:
            module = submodule(ref.module, attr)
            if isinstance(module, torch.nn.Module):
                hook = TokenCacheHook(runtime, f"{ref.name}.{attr}", scope)
                installed.append(install_hook(module, hook, "tokens"))
                runtime.slot_factories[hook.unit] = hook._new_slot
    if not installed:
        call = registration_call(blocks[0].module, blocks[0].layout, token_modules="('<token-wise submodule>', ...)")
        raise ValueError(f"tokens scope: the block layouts of {type(model).__name__} name no token-wise "
                         f"modules; choose another scope, or register them with {call}")
    return installed
