"""Cache decisions under diffusers' context parallelism: two CPU processes on gloo decide alike.

`tests/context_parallel_worker.py` runs one rank: a tiny FluxPipeline with CFG and FBCache (a
feature-watching trigger, so a rank deciding from its own token shard could disagree with the
other and the ranks' collectives would then hang), first alone, then with Ulysses context
parallelism over both ranks. The resolver rule is tested in one process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from accel.resolve import RunInfo, resolve
from accel.stack import CachePlan, SamplerPlan, Stack, StackError

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_decide_as_one_process_and_alike(tmp_path):
    out = tmp_path / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(ROOT / "tests" / "context_parallel_worker.py"), str(out), "0.3", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launched = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    alone = ranks[0]["alone"]["computed"]
    assert alone["cond"] != list(range(12)) and alone["uncond"] != list(range(12))  # the cache caches here
    for rank in ranks:
        assert rank["alone"]["computed"] == alone  # every rank alone is the same process
        assert rank["parallel"]["computed"] == alone  # parallel: the single-process decisions, on every rank
        assert rank["decisions"] and "all-reduces" in rank["decisions"][0]
        assert "teacache would calibrate on each rank's token shard" in rank["refused"]
        assert max(abs(a - b) for a, b in zip(rank["parallel"]["latents"], rank["alone"]["latents"])) < 1e-5
        statistic = rank["statistic"]
        assert statistic["reduced"] == pytest.approx(statistic["whole"], rel=1e-6)
        assert abs(statistic["shard"] - statistic["whole"]) > 0.05  # a shard alone measures something else
    assert ranks[0]["parallel"]["latents"] == ranks[1]["parallel"]["latents"]


RUN = RunInfo("FluxTransformer2DModel", "transformer", "flow", num_steps=20, num_blocks=4, context_parallel=2)


@pytest.mark.parametrize("cache, says", [
    (CachePlan("fbcache"), "residual all-reduces its statistic's partial sums over the group"),
    (CachePlan("teacache", {"coefficients": [1.0, 0.0]}), "teacache all-reduces"),
    (CachePlan("fora"), "interval decides from the step alone, alike on every rank"),
    (CachePlan("magcache", {"ratios": [1.0] * 20}), "magcache decides from the step alone"),
])
def test_context_parallel_rule_says_how_ranks_agree(cache, says):
    decisions = resolve(Stack(SamplerPlan("euler", 20), cache), RUN).decisions
    assert any(line.startswith("context-parallel: 2 ranks") and says in line for line in decisions)
    assert not any(line.startswith("context-parallel") for line in
                   resolve(Stack(SamplerPlan("euler", 20), cache), RunInfo(**{**RUN.__dict__, "context_parallel": 1}))
                   .decisions)


@pytest.mark.parametrize("cache, fix", [
    (CachePlan("teacache"), "calibrate on one process (caching.calibrate_teacache) and set cache.params.coefficients"),
    (CachePlan("magcache"), "set cache.params.ratios"),
    (CachePlan("toca"), "use a block or attention preset"),
])
def test_context_parallel_rule_refuses_what_ranks_cannot_agree_on(cache, fix):
    with pytest.raises(StackError, match=r"under context parallelism \(2 ranks\).*" + fix.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        resolve(Stack(SamplerPlan("euler", 20), cache), RUN)
