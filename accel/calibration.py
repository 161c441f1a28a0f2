"""Calibration files: the values `accel calibrate` searched, put in place of a recipe's `calibrated` markers.

A recipe marks what is calibrated with the string `calibrated` (`calibrated K` for a budget):

    cache: {preset: taylorseer, params: {order: 2, warmup: 0.0, steps: calibrated 6, gains: calibrated}}
    calibration: calibrations/my-recipe.json      # written by `accel calibrate my-recipe.yaml`

and names the file `accel calibrate` wrote (`embedded:` names allowed). `calibrated_recipe` is the one
function that reads it, for `accel run` / `ablate` / `bench` (through `load_recipe`), the lab
(`Job.open`) and `accel.apply(pipe, recipe)`: the file's values replace the markers before any Stack
is built. The file's provenance (the model's identity, sampler, cache, guidance, inputs, reference and
calibration samples it was searched with) must match the recipe's and, where a pipeline is given,
the pipeline's denoiser weights (`accel.lab.fingerprint.model_identity`); any difference is one line
naming the differing keys. Code versions are recorded, never compared (a shipped file must work on
another torch).

A searched walk (`sampler.schedule_params.path: calibrated`) is stored in the file as the whole
`samplers.OptimizedSchedule`; the `optimized` schedule reads walks from files, so loading writes it
once to a content-addressed file in the temporary folder and puts that path in the recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

FORMAT = "accel-calibration/1"
MARKER = "calibrated"
WALK_KEY = "sampler.schedule_params.path"
COMPENSATION_KEY = "sampler.solver_params.compensation"
# What may be calibrated, by dotted recipe key (the preset it needs, or None for any).
CALIBRATABLE = {
    WALK_KEY: None,
    COMPENSATION_KEY: None,
    "cache.params.steps": None,
    "cache.params.gains": None,
    "cache.params.coefficients": "teacache",
    "cache.params.ratios": "magcache",
}
MARKED_SECTIONS = ("sampler.schedule_params", "sampler.solver_params", "cache.params")
UNCHECKED = ("versions",)  # recorded in the provenance, never compared


class CalibrationError(ValueError):
    """A calibration that cannot be used; the message is one line naming the file or key and the fix."""


def is_marker(value: Any) -> bool:
    """Whether a recipe value is a `calibrated` marker ("calibrated" or "calibrated K")."""
    return isinstance(value, str) and (value == MARKER or value.startswith(MARKER + " "))


def marker_budget(key: str, marker: str) -> int | None:
    """K of a "calibrated K" marker (None for plain "calibrated").

    Raises:
        CalibrationError: K is not a positive integer.
    """
    rest = marker[len(MARKER):].strip()
    if not rest:
        return None
    if not rest.isdigit() or int(rest) < 1:
        raise CalibrationError(f"{key}: {marker!r}; write 'calibrated' or 'calibrated K' with K a positive integer")
    return int(rest)


def find_markers(recipe: DictConfig) -> dict[str, str]:
    """The recipe's `calibrated` markers by dotted key, e.g. {"cache.params.steps": "calibrated 6"}."""
    found = {}
    for section in MARKED_SECTIONS:
        node = OmegaConf.select(recipe, section)
        if node is None:
            continue
        for key, value in node.items():
            if is_marker(value):
                found[f"{section}.{key}"] = value
    return found


def check_markers(recipe: DictConfig) -> dict[str, str]:
    """The markers, each one that can be calibrated where it stands.

    Raises:
        CalibrationError: a key that cannot be calibrated, or one whose preset or schedule does not fit.
    """
    markers = find_markers(recipe)
    for key, marker in markers.items():
        if key not in CALIBRATABLE:
            raise CalibrationError(f"{key}: {marker!r}, but it cannot be calibrated; calibrated keys are: "
                                   f"{', '.join(CALIBRATABLE)}")
        preset = CALIBRATABLE[key]
        if preset is not None and recipe.cache.preset != preset:
            raise CalibrationError(f"{key}: calibrated {key.split('.')[-1]} belong to the {preset} preset, not "
                                   f"{recipe.cache.preset!r}")
        budget = marker_budget(key, marker)
        if key == "cache.params.steps" and (budget is None or budget > recipe.sampler.steps):
            raise CalibrationError(f"cache.params.steps: {marker!r}; write 'calibrated K' with K computed steps "
                                   f"(1 to sampler.steps={recipe.sampler.steps})")
        if key != "cache.params.steps" and budget is not None:
            raise CalibrationError(f"{key}: {marker!r}; only cache.params.steps takes a budget ('calibrated K')")
    if WALK_KEY in markers and recipe.sampler.schedule != "optimized":
        raise CalibrationError(f"{WALK_KEY}: a calibrated walk needs sampler.schedule=optimized "
                               f"(got {recipe.sampler.schedule!r})")
    if "cache.params.gains" in markers and recipe.cache.params.get("steps") is None:
        raise CalibrationError("cache.params.gains: forecast gains belong to a fixed compute schedule; set "
                               "cache.params.steps (a list of fractions, or 'calibrated K')")
    return markers


def provenance_of(recipe: DictConfig, identity: str | None) -> dict[str, Any]:
    """What a calibration of `recipe` depends on (markers included, so a file fits only its recipe's markers).

    Args:
        recipe: the recipe with its markers (not yet replaced).
        identity: `model_identity` of the pipeline, or None where it is not loaded.
    """
    from accel.lab.fingerprint import code_versions, fingerprint
    from accel.recipe.validate import is_embedded

    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    inputs = recipe.inputs
    return {
        "model": {"identity": identity},
        "sampler": plain(recipe.sampler),
        "cache": plain(recipe.cache),
        "adapters": plain(recipe.adapters),
        "guidance": plain(recipe.guidance),
        "inputs": {"resolution": plain(inputs).get("resolution"), "frames": inputs.frames,
                   "negative_prompt": inputs.negative_prompt, "call_kwargs": plain(inputs.call_kwargs)},
        "reference": plain(recipe.eval.reference),
        "calibration": {"seed": int(recipe.calibrate.seed), "samples": int(recipe.calibrate.samples),
                        "prompts": fingerprint({"prompts": calibration_prompts(recipe, is_embedded(recipe.model))})},
        "versions": code_versions(),
    }


def calibration_prompts(recipe: DictConfig, embedded: bool) -> list:
    """One prompt (or, for the embedded digit models, class label) per calibration sample.

    `calibrate.prompts` / `calibrate.prompt_file` when given, else the recipe's own inputs (the seeds
    always differ from the evaluated ones), cycled to `calibrate.samples`.

    Raises:
        CalibrationError: no prompts, or an unreadable prompt file.
    """
    section = recipe.calibrate
    if embedded:
        pool: list = [int(c) for c in recipe.inputs.classes]
    else:
        pool = _prompt_list(section, "calibrate") or _prompt_list(recipe.inputs, "inputs")
    if not pool:
        raise CalibrationError("calibrate.prompts: a text pipeline needs prompts; give calibrate.prompts, "
                               "calibrate.prompt_file or inputs.prompts")
    return [pool[i % len(pool)] for i in range(int(section.samples))]


def _prompt_list(section: DictConfig, prefix: str) -> list[str]:
    prompts = [str(p) for p in (section.get("prompts") or [])]
    if section.get("prompt_file"):
        path = Path(str(section.prompt_file))
        if not path.is_file():
            raise CalibrationError(f"{prefix}.prompt_file: no file at {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


@dataclass
class Calibration:
    """One calibration file.

    Attributes:
        recipe: the name of the recipe it was made for.
        markers: the markers it replaces, by dotted key.
        values: the searched values, by dotted key.
        provenance: what it was searched with (see `provenance_of`).
        search: per key, how the search went (objectives, trials, log).
        path: where it was read from (as the recipe names it), if read.
    """

    recipe: str
    markers: dict[str, str]
    values: dict[str, Any]
    provenance: dict[str, Any]
    search: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: v for k, v in dataclasses.asdict(self).items() if k != "path"}}

    def write(self, path: str | Path) -> Path:
        """Writes the file atomically."""
        from accel.io import write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_json(Path(path), self.to_dict(), indent=1)

    @classmethod
    def read(cls, name: str) -> "Calibration":
        """Reads the file a recipe's `calibration` names (a path or an `embedded:` name).

        Raises:
            CalibrationError: missing, unreadable, or not a calibration file.
        """
        import json

        from accel.data_files import DataFileError, resolve_data_file

        try:
            path = resolve_data_file(name, key="calibration", what="calibration file",
                                     how="make it with `accel calibrate RECIPE` (it writes calibrations/<name>.json)")
        except DataFileError as error:
            raise CalibrationError(str(error)) from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CalibrationError(f"calibration: cannot read {name}: {str(error).splitlines()[0]}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"calibration: {name} is not a calibration file ({FORMAT}); make it with "
                                   "`accel calibrate RECIPE`")
        return cls(str(data.get("recipe")), dict(data.get("markers") or {}), dict(data.get("values") or {}),
                   dict(data.get("provenance") or {}), dict(data.get("search") or {}), path=str(name))


def check_provenance(calibration: Calibration, recipe: DictConfig, identity: str | None = None) -> None:
    """Refuses a calibration made for another model or run.

    Args:
        calibration: the file.
        recipe: the recipe with its markers.
        identity: the pipeline's `model_identity`, or None to leave the model unchecked.

    Raises:
        CalibrationError: one line naming the differing keys.
    """
    from accel.lab.fingerprint import differing_keys, flatten

    expected = provenance_of(recipe, identity)
    stored = dict(calibration.provenance)
    for key in UNCHECKED:
        expected.pop(key, None)
        stored.pop(key, None)
    if identity is None:
        expected.pop("model", None)
        stored.pop("model", None)
    keys = differing_keys(stored, expected)
    if not keys:
        return
    old, new = flatten(stored), flatten(expected)
    shown = "; ".join(f"{key}: file {old.get(key)!r}, now {new.get(key)!r}" for key in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    what = "model weights" if keys == ["model.identity"] else "settings"
    raise CalibrationError(f"calibration {calibration.path} was made with other {what} ({shown}{more}); rerun "
                           f"`accel calibrate` for this recipe and model")


def walk_file(walk: dict) -> str:
    """A searched walk (an OptimizedSchedule as a dict) as a file the `optimized` schedule reads:
    written once, named by its content, in the temporary folder."""
    from accel.io import write_json
    from accel.lab.fingerprint import fingerprint
    from samplers.schedules import OPTIMIZED_FORMAT

    user = os.getuid() if hasattr(os, "getuid") else "user"
    path = Path(tempfile.gettempdir()) / f"accel-calibrated-walks-{user}" / f"{fingerprint(walk)}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"format": OPTIMIZED_FORMAT, **walk}, indent=1)
    return str(path)


def replace_markers(recipe: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of the recipe with each marked key set to its value (a walk as its file's path)."""
    result = copy.deepcopy(recipe)
    for key, value in values.items():
        OmegaConf.update(result, key, walk_file(value) if key == WALK_KEY else value, merge=False)
    return result


def calibrated_recipe(recipe: DictConfig, pipe: Any = None, *, validate: bool = True) -> DictConfig:
    """The recipe with its `calibrated` markers replaced by the values of its calibration file.

    Without markers the recipe is returned as it is; if it names a calibration file and `pipe` is
    given, the file must still have been made for this pipeline's weights.

    Args:
        recipe: a loaded recipe (markers allowed).
        pipe: the pipeline it will run on, to check the file's model identity (None: unchecked).
        validate: re-validate the recipe with the values in place.

    Raises:
        CalibrationError: markers without a calibration file (run `accel calibrate`), a file that
            lacks a marked key or was made for another model or run.
    """
    markers = check_markers(recipe)
    name = recipe.get("calibration")
    if not markers and not (name and pipe is not None):
        return recipe
    if not name:
        keys = ", ".join(markers)
        raise CalibrationError(f"{keys}: marked calibrated, but the recipe names no calibration file; run "
                               f"`accel calibrate` on this recipe and set calibration: calibrations/{recipe.name}.json")
    calibration = Calibration.read(str(name))
    identity = None
    if pipe is not None:
        from accel.lab.fingerprint import model_identity

        identity = model_identity(pipe)
    if not markers:  # values already in place: only the weights can still differ
        stored = (calibration.provenance.get("model") or {}).get("identity")
        if stored != identity:
            raise CalibrationError(f"calibration {name} was made with other model weights (model.identity: file "
                                   f"{stored!r}, now {identity!r}); rerun `accel calibrate` for this recipe and model")
        return recipe
    missing = [key for key in markers if key not in calibration.values]
    if missing:
        raise CalibrationError(f"calibration {name} holds no value for {', '.join(missing)}; rerun `accel calibrate` "
                               "for this recipe")
    check_provenance(calibration, recipe, identity)
    result = replace_markers(recipe, {key: calibration.values[key] for key in markers})
    if validate:
        from accel.recipe.validate import validate_recipe

        validate_recipe(result)
    return result
