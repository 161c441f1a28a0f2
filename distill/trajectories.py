"""Teacher trajectories: the full-compute solver's states at every step, recorded once, reused by
every distillation objective (step distillation, cache-aware adapters, routers).

A record holds, for N samples, the states x_k (N, K+1, *shape) at the teacher's sigmas
s_0 > ... > s_K (x_0 is the noise, x_K the final sample), the teacher's model output at each step
(N, K, *shape, the data prediction x0 the solver received) and the conditioning of each sample.
Recording is resumable: finished chunks are kept in a folder and only missing ones are run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import samplers

__all__ = ["Trajectories", "record_trajectories", "snap_to_grid"]


@dataclass
class Trajectories:
    """Teacher states along a fixed schedule.

    Attributes:
        sigmas: (K + 1,) the teacher's noise levels, decreasing to 0.
        states: (N, K + 1, *shape) x at each sigma; states[:, 0] is the noise.
        x0: (N, K, *shape) the teacher's data prediction at each step.
        cond: conditioning tensors with leading dimension N (e.g. {"labels": (N,)}).
        meta: how they were made (solver, steps, schedule, guidance, seed, model fingerprint).
    """

    sigmas: torch.Tensor
    states: torch.Tensor
    x0: torch.Tensor
    cond: dict[str, torch.Tensor]
    meta: dict[str, str]

    def __len__(self) -> int:
        return self.states.shape[0]

    def batch(self, index: torch.Tensor) -> "Trajectories":
        """The samples at `index` (B,)."""
        return Trajectories(self.sigmas, self.states[index], self.x0[index],
                            {k: v[index] for k, v in self.cond.items()}, self.meta)

    def states_at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """States (N, len(sigmas), *shape) at any sigmas in the recorded range, linearly
        interpolated in sigma between the two recorded states around each (exact on the grid)."""
        grid = self.sigmas.double()
        wanted = sigmas.double().clamp(float(grid[-1]), float(grid[0]))
        upper = torch.searchsorted(-grid, -wanted, right=False).clamp(1, len(grid) - 1)
        weight = ((grid[upper - 1] - wanted) / (grid[upper - 1] - grid[upper])).to(self.states.dtype)
        weight = weight.view(1, -1, *([1] * (self.states.ndim - 2)))
        return torch.lerp(self.states[:, upper - 1], self.states[:, upper], weight)

    def save(self, path: str | Path) -> None:
        tensors = {"sigmas": self.sigmas, "states": self.states, "x0": self.x0}
        tensors.update({f"cond.{k}": v for k, v in self.cond.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "Trajectories":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        tensors = load_file(str(path))
        cond = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("cond.")}
        return cls(tensors["sigmas"], tensors["states"], tensors["x0"], cond, meta)


def record_trajectories(denoiser: samplers.Denoiser, noise: torch.Tensor, cond: dict[str, torch.Tensor], *,
                        solver: str, sigmas: torch.Tensor, batch_size: int, folder: str | Path,
                        meta: dict[str, str], desc: str = "teacher",
                        device: torch.device | str = "cpu") -> Trajectories:
    """Runs the teacher on every sample and keeps all its states (resumable by chunk).

    Args:
        denoiser: the teacher as a Denoiser (guidance included).
        noise: (N, *shape) initial noise.
        cond: conditioning with leading dimension N.
        solver: a samplers registry name whose steps take one evaluation each (euler, dpmpp_2m, ...).
        sigmas: (K + 1,) the teacher's schedule.
        batch_size: samples per chunk.
        folder: where finished chunks and the final file are kept.
        meta: provenance; a folder made with other meta is refused.
        desc: progress-bar label.
        device: where the teacher runs (the records are kept on the CPU).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_meta(folder, meta)
    spec = samplers.get_solver(solver)
    if spec.evals_per_step != 1:
        raise ValueError(f"teacher solver {solver!r} takes {spec.evals_per_step} evaluations a step; "
                         "use a one-evaluation solver (euler, ddim, dpmpp_2m, unipc_bh2)")
    chunks = []
    for start in tqdm(range(0, noise.shape[0], batch_size), desc=desc):
        path = folder / f"chunk-{start:06d}.safetensors"
        if not path.is_file():
            chunk_cond = {k: v[start:start + batch_size] for k, v in cond.items()}
            chunk = _run_chunk(denoiser, noise[start:start + batch_size].to(device),
                               {k: v.to(device) for k, v in chunk_cond.items()}, spec, sigmas)
            Trajectories(sigmas, *chunk, chunk_cond, meta).save(path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        chunks.append(Trajectories.load(path))
    return Trajectories(sigmas, torch.cat([c.states for c in chunks]), torch.cat([c.x0 for c in chunks]),
                        {k: torch.cat([c.cond[k] for c in chunks]) for k in cond}, meta)


def _run_chunk(denoiser, noise, cond, spec, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    states, x0s = [noise.cpu()], []

    def keep(index: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        states.append(x.detach().cpu())
        x0s.append(x0.detach().cpu())

    with torch.no_grad():
        spec.fn(denoiser, noise, sigmas, cond=cond, callback=keep)
    return torch.stack(states, dim=1), torch.stack(x0s, dim=1)


def _check_meta(folder: Path, meta: dict[str, str]) -> None:
    marker = folder / "meta.json"
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored != meta:
            raise ValueError(f"{folder} holds trajectories made with {stored}, not {meta}; delete it or "
                             "choose another folder")
    else:
        marker.write_text(json.dumps(meta, indent=1, sort_keys=True))


def snap_to_grid(sigmas: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Indices (len(sigmas),) of the nearest `grid` value to each sigma, strictly increasing.

    Students distilled from recorded trajectories step between teacher states, so their schedule
    is the teacher's grid at these indices.
    """
    index = (sigmas[:, None].double() - grid[None, :].double()).abs().argmin(dim=1)
    for k in range(1, len(index)):
        if index[k] <= index[k - 1]:
            index[k] = index[k - 1] + 1
    if int(index[-1]) >= len(grid):
        raise ValueError(f"cannot place {len(sigmas)} points on a grid of {len(grid)} distinct sigmas")
    return index
