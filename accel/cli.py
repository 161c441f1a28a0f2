"""The `accel` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accel.io import first_line
from accel.recipe import RECIPES_DIR, RecipeError, find_recipe, load_recipe, to_yaml
from accel.recipe.load import list_recipes


def _run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from accel.lab.run import run_recipe

    run_recipe(recipe)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from accel.lab.ablate import run_ablation

    _, failures = run_ablation(recipe, keep_going=args.keep_going)
    if failures and not args.keep_going:
        print(f"accel: error: {len(failures)} cell failed ({failures[0]}); fix it, or pass --keep-going to measure "
              "the other cells and report the failures", file=sys.stderr)
        return 1
    if failures:
        print(f"accel: {len(failures)} cell(s) failed and were left out (--keep-going): " + "; ".join(failures),
              file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, calibrated=False)
    from accel.lab.calibrate import calibrate_recipe

    calibrate_recipe(recipe, Path(args.out) if args.out else None)
    return 0


def _train(args: argparse.Namespace) -> int:
    from accel.recipe.train_schema import load_train_recipe
    from accel.train import is_main_launch_process, quick_overrides, run_train_recipe
    from distill.training import TrainingError

    recipe = load_train_recipe(args.recipe, args.overrides)
    if args.quick:  # the user's own overrides still win over the smoke settings
        recipe = load_train_recipe(args.recipe, [*quick_overrides(recipe), *args.overrides])
    try:
        result = run_train_recipe(recipe)
    except TrainingError as error:  # a NaN loss, or checkpoints of another run in the folder
        print(f"accel: error: {error}", file=sys.stderr)
        return 1
    if is_main_launch_process():
        resumed = f", resumed from step {result.resumed_from}" if result.resumed_from is not None else ""
        print(f"trained {recipe.objective.name} for {result.steps_done} steps{resumed} ({result.seconds:.0f} s)")
        print(f"result: {result.exported}")
        print(f"loss log: {result.loss_log}; loss plot: {result.loss_plot}")
    return 0


def _is_training_recipe(name: str) -> bool:
    """A recipe for `accel train` (an `objective` section) rather than for run/ablate."""
    from accel.recipe.load import read_recipe_file

    return "objective" in read_recipe_file(find_recipe(name))


def shipped_recipe_path(name: str) -> Path:
    """The installed file of a shipped recipe or launch config, e.g. "launch/accelerate-cpu-2proc"."""
    root = RECIPES_DIR.resolve()
    path = (root / (name if name.endswith(".yaml") else name + ".yaml")).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise RecipeError(f"no shipped recipe {name!r}; names as `accel recipes list` prints them "
                          "(e.g. embedded-demo, launch/accelerate-cpu-2proc)")
    return path


def _recipes(args: argparse.Namespace) -> int:
    if args.action == "list":
        for group, names in list_recipes().items():
            print(f"{group}: {', '.join(names)}")
        return 0
    if args.name is None:
        raise RecipeError(f"accel recipes {args.action} needs a recipe name (see: accel recipes list)")
    if args.action == "path":
        print(shipped_recipe_path(args.name))
        return 0
    if args.resolved and _is_training_recipe(args.name):
        from accel.recipe.train_schema import load_train_recipe

        print(to_yaml(load_train_recipe(args.name, args.overrides)), end="")
    elif args.resolved:
        print(to_yaml(load_recipe(args.name, args.overrides)), end="")
    else:
        print(find_recipe(args.name).read_text(), end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from accel.bench import SUITES, run_suite
    from accel.io import claim_folder

    if args.suite not in SUITES:
        raise ValueError(f"unknown benchmark {args.suite!r}; choose one of: {', '.join(SUITES)}")
    out_dir = Path(args.out) if args.out else Path("runs") / f"bench-{args.suite}"
    claim_folder(out_dir, f"accel bench {args.suite}")  # before any work: refuses another command's folder
    run_suite(args.suite, quick=args.quick, json_path=Path(args.json) if args.json else None, out_dir=out_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Stacked acceleration for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe beside its full-compute reference")
    run.add_argument("recipe", nargs="?", default=None, help="recipe YAML or shipped name (default: embedded-demo)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sampler.steps=8")
    run.set_defaults(handler=_run)
    ablate = commands.add_parser("ablate", help="run a grid of stacks beside the reference and the equal-FLOPs baseline")
    ablate.add_argument("recipe", help="ablation recipe YAML or shipped name (e.g. ablations/embedded)")
    ablate.add_argument("overrides", nargs="*", help="key=value overrides")
    ablate.add_argument("--keep-going", action="store_true",
                        help="measure every other cell when one fails (exit 0), instead of stopping (exit 1)")
    ablate.set_defaults(handler=_ablate)
    calibrate = commands.add_parser("calibrate", help="search what a recipe marks `calibrated` (on calibration "
                                    "samples) and write calibrations/<name>.json")
    calibrate.add_argument("recipe", help="recipe YAML or shipped name (e.g. embedded-calibrated-cache)")
    calibrate.add_argument("overrides", nargs="*", help="key=value overrides")
    calibrate.add_argument("--out", default=None,
                           help="folder that holds calibrations/ (default: the working directory)")
    calibrate.set_defaults(handler=_calibrate)
    train = commands.add_parser("train", help="train an objective (checkpointed, resumable) from a training recipe")
    train.add_argument("recipe", help="training recipe YAML or shipped name (e.g. train/flow-digits)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")
    train.add_argument("--quick", action="store_true",
                       help="smoke run: 3 steps, a 16-trajectory teacher, files under runs/train-quick/")
    train.set_defaults(handler=_train)
    recipes = commands.add_parser("recipes", help="list shipped recipes, show one, or print its installed path")
    recipes.add_argument("action", choices=["list", "show", "path"],
                         help="path: the installed file, e.g. for accelerate's --config_file")
    recipes.add_argument("name", nargs="?", default=None,
                         help="recipe name or path (show); shipped name, e.g. launch/accelerate-cpu-2proc (path)")
    recipes.add_argument("overrides", nargs="*", help="key=value overrides (with --resolved)")
    recipes.add_argument("--resolved", action="store_true", help="show the merged, validated recipe")
    recipes.set_defaults(handler=_recipes)
    bench = commands.add_parser("bench", help="benchmarks: samplers, caches, distill, overhead")
    bench.add_argument("suite", help="samplers | caches | distill | overhead")
    bench.add_argument("--quick", action="store_true", help="the shortened sweep")
    bench.add_argument("--json", default=None, help="write the records to this JSON file")
    bench.add_argument("--out", default=None, help="folder for the table, plot and JSON (default runs/bench-<suite>)")
    bench.set_defaults(handler=_bench)
    return parser


def _describe_os_error(error: OSError) -> str:
    """`<reason>: <path>` for an OSError that names its path, else its first line."""
    if error.filename is None:
        return first_line(error)
    paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    return f"{error.strerror or type(error).__name__}: {paths}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `accel run key=value` (no recipe): the first positional is an override, not a recipe.
    if len(argv) >= 2 and argv[0] == "run" and "=" in argv[1]:
        argv.insert(1, "embedded-demo")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow flags (`accel recipes show X --resolved a=b`): argparse leaves them over.
    if extra and all("=" in item and not item.startswith("-") for item in extra) and hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except ValueError as error:  # RecipeError, StackError and every validation error are ValueErrors
        print(f"accel: error: {first_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # an unreadable or unwritable path
        print(f"accel: error: {_describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
