"""What a recipe may contain: data only, finite numbers, and paths that stay where they belong.

A recipe (a file, the group files it composes, or `key=value` overrides) is data. These checks
run on every recipe `accel` loads (run, ablate and training recipes) and each failure is one
`RecipeError` line naming the key or file:

* Interpolation between recipe keys (`${sampler.steps}`) is allowed; resolvers (`${oc.env:...}`,
  `${oc.decode:...}`, any registered one) are not: they would read the environment or decode
  text into the run's folder names and outputs.
* `???` (omegaconf's "missing") is refused: merged onto the schema it would silently keep the
  default.
* Numbers are finite: NaN or infinity anywhere, typed or inside a parameter mapping, is refused.
* A run name is one safe path component (no separators, not starting with "."), and a folder a
  recipe file writes to (`output.dir`, ...) stays inside the working directory. On the command
  line (an override) such a folder may be anything: the user chose it.
* Group entries of `defaults` are simple names inside the recipe folders.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf._utils import ValueKind, get_value_kind
from omegaconf.errors import GrammarParseError, OmegaConfBaseException

SIMPLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
NON_FINITE_TEXT = {"nan", "inf", "infinity", ".nan", ".inf"}
MAX_NAME_LENGTH = 200


def _error(message: str):
    from accel.recipe.load import RecipeError

    return RecipeError(message)


def _raw_leaves(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, raw value) of every leaf of a plain container, interpolations unresolved."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _raw_leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _raw_leaves(value, f"{path}[{index}]")
    else:
        yield path, node


def _has_resolver(text: str) -> bool:
    """Whether an interpolation string calls a resolver (anything but a plain `${key}` reference)."""
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    tree = grammar_parser.parse(text)
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            return True
        pending.extend(node.getChild(i) for i in range(node.getChildCount()))
    return False


def check_data_only(config: DictConfig | ListConfig, source: str) -> None:
    """Refuses resolvers and `???` in a raw (unmerged, unresolved) recipe part.

    Args:
        config: a recipe file, group file or the parsed overrides, as loaded.
        source: where it came from (a file path, or "overrides"), for the message.
    """
    container = OmegaConf.to_container(config, resolve=False)
    for key, value in _raw_leaves(container, ""):
        if not isinstance(value, str):
            continue
        kind = get_value_kind(value)
        if kind == ValueKind.MANDATORY_MISSING:
            raise _error(f"{key}: '???' (a missing value) in {source}; give a value or leave the key out")
        if kind != ValueKind.INTERPOLATION:
            continue
        try:
            resolver = _has_resolver(value)
        except GrammarParseError:
            raise _error(f"{key}: {value!r} in {source} is not a valid interpolation; "
                         "use ${other.key} or escape the '$'") from None
        if resolver:
            raise _error(f"{key}: {value!r} in {source} calls a resolver; a recipe is data: only "
                         "interpolation of another recipe key (${section.key}) is allowed")


def _typed_leaves(node: Any, path: str) -> Iterator[tuple[str, Any, bool]]:
    """(dotted key, resolved value, inside a free-form parameter mapping) of every leaf."""
    if isinstance(node, (DictConfig, ListConfig)):
        free = isinstance(node, DictConfig) and node._metadata.object_type in (None, dict)
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            child = node._get_node(key)
            name = f"{path}[{key}]" if isinstance(node, ListConfig) else (f"{path}.{key}" if path else str(key))
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _typed_leaves(child, name)
            else:
                yield name, node[key], free or isinstance(node, ListConfig)
    else:
        yield path, node, True


def check_finite(recipe: DictConfig) -> None:
    """Resolves every value of a merged recipe and refuses NaN and infinity anywhere.

    Text that reads as a non-finite number ("nan", "inf") is refused too where a value is free-form
    (parameter mappings, lists), since solvers and schedules turn it into a float.

    Raises:
        RecipeError: the first non-finite value, or an interpolation that does not resolve.
    """
    try:
        leaves = list(_typed_leaves(recipe, ""))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise _error(f"{key}: cannot resolve: {str(error).splitlines()[0]}") from None
    for key, value, free in leaves:
        if isinstance(value, float) and not math.isfinite(value):
            raise _error(f"{key}: {value} is not a finite number")
        if free and isinstance(value, str) and value.strip().lower().lstrip("+-") in NON_FINITE_TEXT:
            raise _error(f"{key}: {value!r} is not a finite number")


def check_path_component(value: Any, key: str) -> None:
    """Refuses a name that is not one safe path component (a run name becomes a folder name)."""
    text = str(value) if value is not None else ""
    if (not text or text.startswith(".") or len(text) > MAX_NAME_LENGTH
            or any(bad in text for bad in ("/", "\\", "\0")) or not text.isprintable()):
        raise _error(f"{key}: {text!r} must be one folder name: not empty, no '/' or '\\', not starting "
                     f"with '.', at most {MAX_NAME_LENGTH} printable characters")


def check_inside_working_dir(value: Any, key: str, source: str) -> None:
    """Refuses a folder from a recipe file that points outside the working directory."""
    text = str(value)
    normal = os.path.normpath(text)
    if os.path.isabs(text) or normal == ".." or normal.startswith(".." + os.sep) or "\0" in text:
        raise _error(f"{key}: {text!r} from {source} points outside the working directory; a recipe file "
                     f"may only write below it (give an outside folder on the command line: {key}=...)")


def check_written_paths(merged: DictConfig, overrides: DictConfig, keys: tuple[str, ...], source: str) -> None:
    """Checks the written folders (`keys`) that the overrides did not set stay inside the working dir."""
    for key in keys:
        if OmegaConf.select(overrides, key, default=None) is not None:
            continue
        value = OmegaConf.select(merged, key, default=None)
        if value is not None:
            check_inside_working_dir(value, key, source)


def check_group_entry(group: str, name: Any) -> None:
    """A `defaults` entry names a file of its group folder: a simple name, no separators or '..'."""
    text = str(name)
    if not SIMPLE_NAME.fullmatch(text) or ".." in text:
        raise _error(f"defaults: {group}: {text!r} must be the simple name of a file in the {group} "
                     "recipe folder (letters, digits, '_', '-', '.', no '/' or '..')")
