"""The `accel` command line."""

from __future__ import annotations

import argparse
import sys

from accel.recipe import RecipeError, load_recipe


def _run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from accel.run import run_recipe

    run_recipe(recipe)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Stacked acceleration for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe beside its full-compute reference")
    run.add_argument("recipe", nargs="?", default=None, help="recipe YAML or shipped name (default: embedded-demo)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sampler.steps=8")
    run.set_defaults(handler=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `accel run key=value` (no recipe): the first positional is an override, not a recipe.
    if len(argv) >= 2 and argv[0] == "run" and "=" in argv[1]:
        argv.insert(1, "embedded-demo")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (RecipeError, FileNotFoundError) as error:
        print(f"accel: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
