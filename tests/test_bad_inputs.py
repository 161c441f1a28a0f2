"""Bad input, careless or hostile: one `accel: error:` line, exit 2, and nothing written outside the
run's folder; non-finite images stop a run with one line, never a segfault."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import accel.embedded  # noqa: F401  (diffusers' log handler binds to the session's stderr, not a test's)
from accel import io
from accel.cli import main

SECRET = "s3cr3t-token-value"
# The cheapest run, should a case get past validation: 1 sample, 2 steps, one metric.
CHEAP = ["inputs.classes=[0]", "inputs.samples_per_class=1", "inputs.batch_size=1", "sampler.steps=2",
         "eval.reference.steps=2", "eval.real_samples=2", "eval.timing_batch=1", "eval.timing_repeats=1",
         "eval.metrics=[psnr]"]
TRAIN_CHEAP = ["train.steps=1", "objective.params.batch_size=2",
               "objective.params.model_config={num_layers: 1, num_single_layers: 1, attention_head_dim: 8, "
               "axes_dims_rope: [2, 2, 4]}"]


def _lora(path: Path, fill: float | None = None, **model_config) -> Path:
    """A real diffusers-format LoRA of the embedded model (peft + save_lora); `fill` overwrites its values."""
    from accel.embedded import build_flux_digits
    from distill.lora import add_lora, save_lora

    model = build_flux_digits(seed=0, **model_config)
    add_lora(model.transformer, rank=2)
    saved = save_lora(model.transformer, path)
    if fill is not None:
        with safe_open(str(saved), framework="pt") as handle:
            metadata = handle.metadata()
        save_file({k: torch.full_like(v, fill) for k, v in load_file(saved).items()}, str(saved), metadata=metadata)
    return saved


def _file(inputs: Path, name: str, text: str) -> str:
    path = inputs / name
    path.write_text(text)
    return str(path)


def _truncated(inputs: Path) -> str:
    whole = _lora(inputs / "whole.safetensors").read_bytes()
    (inputs / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    return str(inputs / "truncated.safetensors")


def _pickle_model(inputs: Path) -> str:
    folder = inputs / "pickled-model"
    for part in ("transformer", "conditioner"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text("{}")
        torch.save({"weight": torch.zeros(1)}, folder / part / "diffusion_pytorch_model.bin")
    return str(folder)


def _claimed(work: Path) -> str:
    io.claim_folder(work / "runs" / "abl", "accel ablate")
    return "abl"


def _run(*args):
    return lambda inputs, work: ["run", *CHEAP, *args]


def _train(*args):
    return lambda inputs, work: ["train", "train/flow-digits", *TRAIN_CHEAP, *args]


def _recipe_file(command: str, name: str, text: str, *args):
    cheap = CHEAP if command != "train" else TRAIN_CHEAP
    return lambda inputs, work: [command, _file(inputs, name, text), *cheap, *args]


def _adapter(make, extra: str = ""):
    """An `accel run` with one adapter, its file made by `make(inputs)`."""
    return lambda inputs, work: ["run", *CHEAP, f"adapters=[{{path: {make(inputs)}{extra}}}]"]


TRAIN_FILE = "name: t\nobjective: {name: flow-matching}\ntrain: {steps: 1}\n"

# (id, argv builder (inputs folder, work folder) -> argv, text the one error line must hold)
CASES = [
    # Recipes are data: no resolvers, no "???", no empty file.
    ("env-resolver-override", _run("name=${oc.env:SECRET_TOKEN}"), "name: "),
    ("env-resolver-file", _recipe_file("run", "env.yaml", "name: ${oc.env:SECRET_TOKEN}\n"),
     "env.yaml calls a resolver"),
    ("env-resolver-nested", _run("sampler.schedule_params={shift: '${oc.env:SECRET_TOKEN}'}"),
     "sampler.schedule_params.shift"),
    ("decode-resolver", _run("name=${oc.decode:'x'}"), "calls a resolver"),
    ("custom-resolver", _run("name=${evil:x}"), "calls a resolver"),
    ("env-resolver-train", _train("name=${oc.env:SECRET_TOKEN}"), "calls a resolver"),
    ("env-resolver-defaults", _recipe_file("run", "d.yaml", "defaults:\n  - model: ${oc.env:SECRET_TOKEN}\n"),
     "defaults"),
    ("interpolation-unknown-key", _run("name=${nope}"), "name: cannot resolve"),
    ("interpolation-loop", _run("name=${name}"), "name: cannot resolve"),
    ("missing-override", _run("name=???"), "name: '???'"),
    ("missing-file", _recipe_file("run", "m.yaml", "name: ???\n"), "m.yaml"),
    ("empty-file", _recipe_file("run", "empty.yaml", ""), "empty.yaml is empty"),
    ("comment-only-file", _recipe_file("run", "c.yaml", "# nothing\n"), "c.yaml is empty"),
    # Names and folders stay where they belong.
    ("name-dotdot", _run("name=.."), "name: '..'"),
    ("name-dot", _run("name=."), "name: '.'"),
    ("name-slash", _run("name=a/b"), "name: 'a/b'"),
    ("name-hidden", _run("name=.reference-cache"), "name: '.reference-cache'"),
    ("name-train-escape", _train("name=../../../x"), "name: '../../../x'"),
    ("output-abs-in-file",
     lambda i, w: ["run", _file(i, "abs.yaml", f"name: a\noutput: {{dir: {i / 'out'}}}\n"), *CHEAP], "output.dir"),
    ("output-up-in-file", _recipe_file("run", "up.yaml", "name: a\noutput:\n  dir: ../..\n"), "output.dir: '../..'"),
    ("output-up-in-train-file", _recipe_file("train", "t.yaml", TRAIN_FILE + "output: {dir: ../..}\n"),
     "output.dir: '../..'"),
    ("trajectories-up-in-train-file", lambda i, w: [
        "train", _file(i, "s.yaml", "name: s\nobjective: {name: step-distill, params: {trajectories: ../../t}}\n"
                                    "train: {steps: 1}\n")], "objective.params.trajectories"),
    ("defaults-escape", _recipe_file("run", "esc.yaml", "defaults:\n  - model: ../../../../tmp/x\nname: a\n"),
     "defaults: model: '../../../../tmp/x'"),
    ("defaults-dotdot", _recipe_file("run", "dd.yaml", "defaults:\n  - model/..\nname: a\n"), "defaults: model: '..'"),
    ("folder-of-another-command", lambda i, w: ["run", *CHEAP, f"name={_claimed(w)}"], "accel ablate"),
    ("output-under-a-file", lambda i, w: ["run", *CHEAP, f"output.dir={_file(w, 'blocker', '')}/runs"], "blocker"),
    # Numbers are finite and bounded.
    ("guidance-inf", _run("guidance.scale=inf"), "guidance.scale: inf"),
    ("guidance-minus-inf", _run("guidance.scale=-.inf"), "guidance.scale: -inf"),
    ("shift-nan", _run("sampler.schedule_params={shift: .nan}"), "sampler.schedule_params.shift"),
    ("shift-nan-text", _run("sampler.schedule_params={shift: nan}"), "sampler.schedule_params.shift"),
    ("reference-guidance-nan", _run("eval.reference.guidance_scale=nan"), "eval.reference.guidance_scale: nan"),
    ("ddim-eta-nan", _run("sampler.solver=ddim", "sampler.solver_params={eta: .nan}"), "sampler.solver_params.eta"),
    ("adapter-scale-nan", _adapter(lambda i: _lora(i / "a.safetensors"), ", scale: .nan"), "adapters[0].scale"),
    ("nan-in-file", _recipe_file("run", "n.yaml", "name: n\ncache: {preset: fora, params: {interval: .inf}}\n"),
     "cache.params.interval"),
    ("train-lr-nan", _train("train.lr=nan"), "train.lr: nan"),
    ("steps-huge", _run("sampler.steps=1000000000"), "sampler.steps: 1000000000 must be <="),
    ("reference-steps-huge", _run("eval.reference.steps=100000"), "eval.reference.steps"),
    ("samples-huge", _run("inputs.samples_per_class=100000000"), "inputs.samples_per_class"),
    ("samples-float", _run("inputs.samples_per_class=1e8"), "inputs.samples_per_class"),
    ("samples-times-classes", _run("inputs.classes=[0,1,2,3,4,5,6,7,8,9]", "inputs.samples_per_class=20000"),
     "inputs.samples_per_class"),
    ("seed-huge", _run("inputs.seed=100000000000000000000"), "inputs.seed"),
    ("reference-guidance-negative", _run("eval.reference.guidance_scale=-5"),
     "eval.reference.guidance_scale: -5.0 must be >= 1"),
    ("real-samples-huge", _run("eval.real_samples=10000000"), "eval.real_samples"),
    # Components and their options.
    ("solver-option-unknown", _run("sampler.solver_params={foo: 1}"),
     "sampler.solver_params: solver 'unipc_bh2' takes no option foo"),
    ("solver-option-wrong-type", _run("sampler.solver=ddim", "sampler.solver_params={eta: abc}"), "sampler"),
    ("device-garbage", _run("model.device=cudaXYZ"), "model.device: 'cudaXYZ'"),
    ("pickle-only-model", lambda i, w: ["run", *CHEAP, f"model.name={_pickle_model(i)}"], "pickled-model"),
    ("train-resolution", _train("name=t", "objective.params.resolution=7"), "objective.params.resolution: 7"),
    ("ablation-axis-unknown", lambda i, w: ["ablate", "embedded-demo", *CHEAP, "ablation.axes={foo.bar: [1, 2]}"],
     "ablation.axes.foo.bar"),
    ("ablation-axis-wrong-type", lambda i, w: ["ablate", "embedded-demo", *CHEAP, "ablation.baseline_steps=[]",
                                               "ablation.axes={sampler.steps: [abc]}"], "ablation.axes.sampler.steps"),
    ("bench-unknown", lambda i, w: ["bench", "nope"], "unknown benchmark 'nope'"),
    # Override syntax.
    ("override-bad-yaml", _run("guidance.scale=["), "guidance.scale=["),
    ("override-bad-yaml-list", _run("inputs.classes=[0,"), "inputs.classes=[0,"),
    ("override-no-equals", lambda i, w: ["run", "embedded-demo", "steps"], "override 'steps'"),
    # Adapter files: safetensors only (never unpickled), whole, finite, fitting the model.
    ("adapter-pickle", _adapter(lambda i: _pickled_adapter(i)), "pickled.safetensors"),
    ("adapter-empty", _adapter(lambda i: _file(i, "empty.safetensors", "")), "empty.safetensors"),
    ("adapter-truncated", _adapter(_truncated), "truncated.safetensors"),
    ("adapter-nan", _adapter(lambda i: _lora(i / "nan.safetensors", float("nan"))), "NaN or infinity"),
    ("adapter-wrong-shapes", _adapter(lambda i: _lora(i / "other.safetensors", attention_head_dim=16)),
     "do not fit the layer"),
]


def _pickled_adapter(inputs: Path) -> str:
    path = inputs / "pickled.safetensors"
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, path)
    return str(path)


def _listing(root: Path, skip: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.fixture
def places(tmp_path, monkeypatch):
    """(inputs, work): recipe and adapter files live in `inputs`; the CLI runs in `work`, three
    levels below tmp_path so that '..' escapes land where the listing sees them."""
    inputs, work = tmp_path / "inputs", tmp_path / "a" / "b" / "work"
    inputs.mkdir()
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    OmegaConf.register_resolver("evil", lambda value: SECRET, replace=True)
    yield inputs, work
    OmegaConf.clear_resolver("evil")


@pytest.mark.parametrize("build, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing_outside(places, capsys, build, message):
    inputs, work = places
    argv = build(inputs, work)
    outside = _listing(work.parents[2], work)
    inside = {p.name for p in work.iterdir()}
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("accel: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in out + err and SECRET not in out + err
    assert _listing(work.parents[2], work) == outside  # nothing written outside the working folder
    assert {p.name for p in work.iterdir()} <= inside | {"runs"}  # ... and inside it, only under runs/
    written = [str(p) for p in work.rglob("*")]
    assert not any(SECRET in path for path in written)


def test_cuda_without_cuda_is_one_line(places, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", *CHEAP, "model.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.device: 'cuda', but this torch sees no CUDA device" in err
    assert not (places[1] / "runs").exists()  # refused before any folder is made


def test_read_only_working_directory_is_refused_before_generating(places, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    import accel.lab.job

    monkeypatch.setattr(accel.lab.job, "load_model", lambda *a: pytest.fail("loaded in a read-only folder"))
    work = places[1]
    work.chmod(0o555)
    try:
        assert main(["run", *CHEAP]) == 2
    finally:
        work.chmod(0o755)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "runs" in err


def test_interpolation_between_recipe_keys_stays_allowed(places):
    from accel.recipe import load_recipe

    recipe = load_recipe(None, ["name=run-${sampler.steps}", "eval.reference.steps=${sampler.steps}", *CHEAP[:4]])
    assert recipe.name == "run-2" and recipe.eval.reference.steps == 2


def test_output_dir_may_point_anywhere_on_the_command_line(places):
    from accel.recipe import load_recipe

    inputs, _ = places
    assert load_recipe(None, [f"output.dir={inputs}", *CHEAP]).output.dir == str(inputs)
    assert load_recipe(None, ["output.dir=../../elsewhere", *CHEAP]).output.dir == "../../elsewhere"


def _subprocess_run(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "accel", "run", *CHEAP, *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("overrides, label", [
    # float32 overflow in the guided velocity: the run's images come out non-finite. With FD among
    # the metrics, measuring them would crash the process in the matrix square root.
    # (Measured before the check: exit -11.)
    (["guidance.scale=1e300", "eval.reference.guidance_scale=4", "name=nan-run", "eval.metrics=[psnr,fd]",
      "eval.real_samples=8", "inputs.samples_per_class=2", "inputs.batch_size=2"], "nan-run"),
])
def test_non_finite_images_stop_with_one_line_and_no_segfault(tmp_path, overrides, label):
    result = _subprocess_run(tmp_path, *overrides)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])  # a segfault would be -11
    errors = [line for line in result.stderr.splitlines() if "accel: error:" in line]
    assert len(errors) == 1 and f"{label}: " in errors[0] and "NaN or infinite" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs" / label / "summary.json").exists()


def test_evaluator_refuses_non_finite_images_before_any_metric():
    from accel.lab.evaluate import EvalError, Evaluator
    from accel.lab.inputs import Inputs

    inputs = Inputs(seeds=(0, 1), labels=(0, 1), height=16, width=16)
    evaluate = Evaluator(["psnr", "ssim", "fd", "accuracy"], inputs, embedded=True, real_samples=8)
    reference = torch.zeros(2, 1, 16, 16)
    images = reference.clone()
    images[1, 0, 3, 4] = float("nan")
    with pytest.raises(EvalError, match=r"^cell-7: the generated images are not finite"):
        evaluate(images, reference, "cell-7")
    images[1, 0, 3, 4] = float("inf")  # clamping to [0, 1] would hide an infinity: checked before
    with pytest.raises(EvalError, match="cell-7"):
        evaluate(images, reference, "cell-7")
    assert Evaluator(["psnr"], inputs, embedded=False)(reference, reference) == {"psnr": 100.0}


def test_fd_with_one_sample_is_refused_before_any_work():
    from accel.lab.evaluate import EvalError, Evaluator
    from accel.lab.inputs import Inputs

    with pytest.raises(EvalError, match="fd compares distributions and needs at least 2 samples, this run has 1"):
        Evaluator(["psnr", "fd"], Inputs(seeds=(0,), labels=(3,), height=16, width=16), embedded=True, real_samples=8)


def test_a_missing_relative_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from accel.lab.models import ModelError, _folder_of

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipes").mkdir()
    with pytest.raises(ModelError, match=r"no folder .*pipes/my-flux .*check the path"):
        _folder_of("pipes/my-flux")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        _folder_of("someone/some-model")

