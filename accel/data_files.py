"""Files shipped inside the installed `accel` package, and the one way recipes name them.

Everything the package ships (recipes, launch configs, the embedded models' weights, their
optimised walks, cache placements, adapters and router) lives under the package folder and is
found through it, never through a source tree, so a regular `pip install` or a wheel runs from any
working directory. Nothing is ever written here: benches and training write under their output
folders.

A recipe names a shipped data file with the `embedded:` scheme, relative to the embedded weights
folder (`accel/embedded/weights/`), e.g.

    sampler: {schedule: optimized, schedule_params: {path: "embedded:flux-digits/schedules/unipc_bh2-nfe6.json"}}
    adapters: [{path: "embedded:adapters/step-4", fuse: true}]

Any other name is a filesystem path, relative to the working directory. `resolve_data_file` turns
either into a path and is what every reader of a walk, adapter or router file calls.
"""

from __future__ import annotations

from pathlib import Path

# The installed package folder (holding recipes/ and embedded/weights/).
PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
EMBEDDED_WEIGHTS_DIR = PACKAGE_DIR / "embedded" / "weights"
EMBEDDED_SCHEME = "embedded:"


class DataFileError(ValueError):
    """A data file a recipe names is missing or outside the package; the message is one line."""


def embedded_name(relative: str | Path) -> str:
    """The recipe name of a shipped data file, e.g. "embedded:adapters/step-4"."""
    return EMBEDDED_SCHEME + Path(relative).as_posix()


def resolve_data_file(name: str | Path, *, key: str = "", what: str = "file", how: str = "") -> Path:
    """The path of a data file a recipe names.

    Args:
        name: "embedded:<path under accel/embedded/weights/>" for a shipped file, else a filesystem
            path (relative to the working directory).
        key: the recipe key that named it (prefixes the error message), e.g. "adapters[0].path".
        what: what the file is, for the error ("optimised schedule", "adapter", "router file").
        how: how to make the file, for the error.

    Returns:
        The existing file or folder: inside the installed package for an `embedded:` name, else
        `Path(name)` as given.

    Raises:
        DataFileError: the file does not exist, or an `embedded:` name leaves the weights folder.
    """
    text = str(name)
    prefix = f"{key}: " if key else ""
    if text.startswith(EMBEDDED_SCHEME):
        root = EMBEDDED_WEIGHTS_DIR.resolve()
        found = (root / text[len(EMBEDDED_SCHEME):]).resolve()
        if not found.is_relative_to(root):
            raise DataFileError(f"{prefix}{text} leaves the shipped weights folder; name a file under {root}")
        where = f"{text} ({found})"
    else:
        found = Path(text)
        where = text
    if not found.exists():
        raise DataFileError(f"{prefix}{what} not found: {where}" + (f"; {how}" if how else ""))
    return found
