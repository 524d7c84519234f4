"""Options objects: the one definition of a job kind's keyword options.

A job kind's options are a frozen dataclass (:class:`Options`) whose fields
carry their default, their check and their command-line spelling. Everything
else is made from it: the public function's signature (:func:`takes_options`),
the up-front check of a call, the dry run's arguments, the job journal's
record of what was asked, and the CLI's arguments (:meth:`Options.add_arguments`).

The text parsers at the end turn command-line values into option values; they
raise :class:`argparse.ArgumentTypeError`, which argparse prints as a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

from zv_dask.errors import InputError

__all__ = ["Options", "Flag", "option", "takes_options", "bounded", "one_or_tuple", "numbers", "positive_floats",
           "positive_ints", "bounds_text", "names", "int_at_least", "count", "non_negative"]


@dataclass(frozen=True)
class Flag:
    """How an option appears on the command line (``None`` in :func:`option`: it does not)."""

    help: str
    flag: str | tuple[str, ...] | None = None  # default: --the-field-name
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # text -> value (argparse's type=)
    group: str | None = None  # the --help section
    to_value: Callable[[Any], Any] | None = None  # the parsed text -> the option's value
    choices: tuple | None = None  # the command line's choices, when they are fewer than the option's


def option(default: Any = None, *, choices: tuple | None = None, check: Callable[[Any], str | None] | None = None,
           cli: Flag | None = None, written: bool = True) -> Any:
    """A field of an :class:`Options` class.

    ``choices`` are the values allowed (besides ``None`` when the default is
    ``None``); ``check(value)`` returns what is wrong with a value, or ``None``;
    ``written``: the option decides what a job writes (it goes into the job's
    record, so a resumed job must give it again), else it only sizes or shows
    the work.
    """
    return field(default=default, metadata={"choices": choices, "check": check, "cli": cli, "written": written})


class Options:
    """Base of the frozen option dataclasses: checked on construction, spelled once for every caller."""

    what: ClassVar[str] = "options"  # how errors name them, e.g. "pyramid options"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and not (value is None and f.default is None) and value not in choices:
                raise InputError(f"{f.name}={value!r} is not one of {choices}")
            check = f.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise InputError(f"{f.name} {problem}, got {value!r}")

    # -- making them --------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def of(cls, value: Self | Mapping[str, Any] | None = None, /, **kw: Any) -> Self:
        """These options from an instance, a mapping and/or keywords; unknown names are an :class:`InputError`."""
        given: dict[str, Any] = value.to_dict() if isinstance(value, Options) else dict(value or {})
        given.update(kw)
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise InputError(f"{unknown} {'is not one' if len(unknown) == 1 else 'are not'} of the {cls.what}; "
                             f"choose from {list(cls.names())}")
        return cls(**given)

    def replace(self, **kw: Any) -> Self:
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    def changed(self) -> dict[str, Any]:
        """The options given other values than their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if not _same(getattr(self, f.name), f.default)}

    def written(self) -> dict[str, Any]:
        """The options that decide what a job writes (its journal's record: a resumed job must match it)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.metadata.get("written", True)}

    # -- the signature ------------------------------------------------------------------------
    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """The fields as keyword-only parameters with their defaults (for a function's ``__signature__``)."""
        return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    # -- the command line ---------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, groups: dict[str, Any] | None = None,
                      skip: tuple[str, ...] = ()) -> None:
        """Add the options that have a command-line spelling to ``parser`` (in ``groups`` by section)."""
        groups = groups if groups is not None else {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            flag: Flag | None = f.metadata.get("cli")
            if flag is None or f.name in skip:
                continue
            target = parser
            if flag.group is not None:
                if flag.group not in groups:
                    groups[flag.group] = parser.add_argument_group(flag.group)
                target = groups[flag.group]
            spellings = flag.flag if isinstance(flag.flag, tuple) else (flag.flag or "--" + f.name.replace("_", "-"),)
            kw: dict[str, Any] = {"dest": f.name, "help": flag.help}
            choices = flag.choices if flag.choices is not None else f.metadata.get("choices")
            if f.type in (bool, "bool") and choices is None and flag.parse is None:
                kw["action"] = "store_true"
            else:
                kw.update(type=flag.parse, metavar=flag.metavar, choices=choices)
                kw["default"] = f.default
            target.add_argument(*spellings, **{k: v for k, v in kw.items() if v is not None or k == "default"})

    @classmethod
    def from_args(cls, args: argparse.Namespace, **kw: Any) -> Self:
        """These options from parsed command-line arguments (``kw`` for the fields the CLI spells itself)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            flag: Flag | None = f.metadata.get("cli")
            if flag is None or not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            values[f.name] = flag.to_value(value) if flag.to_value is not None and value is not None else value
        values.update(kw)
        return cls.of(values)


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays compare element-wise
        return False


def takes_options(options: type[Options]):
    """Give ``fn(..., **options)`` the signature of its explicit parameters followed by ``options``' fields.

    The options are written once, in the dataclass; ``help()``, IPython and
    ``inspect.signature`` show them as ordinary keyword arguments.
    """
    def wrap(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in params}
        params += [p for p in options.parameters() if p.name not in taken]
        fn.__signature__ = sig.replace(parameters=params)
        return fn
    return wrap


def bounded(minimum: int, none_ok: bool = False) -> Callable[[Any], str | None]:
    """A ``check`` for an integer option of at least ``minimum`` (bools are not integers here)."""
    wanted = f"must be None or an integer >= {minimum}" if none_ok else f"must be >= {minimum}"

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)) or int(value) != value:
            return wanted
        return wanted if value < minimum else None
    return check


# -- text parsers (the CLI's argument types) ------------------------------------------------
def numbers(text: str, cast: type = float, what: str = "numbers") -> list:
    """``"1,2,3"``, ``"1 2 3"`` or a JSON list (nested lists flattened in order) -> a list of finite numbers."""
    s = text.strip()
    if s.startswith("["):
        try:
            value = json.loads(s)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON {what}") from None
        parts: list[Any] = []
        stack = [value]
        while stack:
            v = stack.pop(0)
            if isinstance(v, list):
                stack = list(v) + stack
            else:
                parts.append(v)
    else:
        parts = [p for p in s.replace(",", " ").split() if p]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    out: list[Any] = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{what} must be finite, got {text!r}")
        if cast is int:
            if not v.is_integer():
                raise argparse.ArgumentTypeError(f"expected integers, got {text!r}")
            out.append(int(v))
        else:
            out.append(v)
    return out


def positive_floats(text: str) -> list[float]:
    vals = numbers(text, float, "numbers")
    if any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"values must be > 0, got {text!r}")
    return vals


def positive_ints(text: str) -> list[int]:
    vals = numbers(text, int, "integers")
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"values must be integers >= 1, got {text!r}")
    return vals


def bounds_text(text: str) -> list[list[float]]:
    vals = numbers(text, float, "numbers")
    if len(vals) % 2:
        raise argparse.ArgumentTypeError(
            f"bounds need the minimum and the maximum of every axis (xmin,ymin,zmin,xmax,ymax,zmax), got {text!r}")
    half = len(vals) // 2
    return [vals[:half], vals[half:]]


def names(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return out


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return v
    return parse


count = int_at_least(1)
non_negative = int_at_least(0)


def one_or_tuple(values):
    """``[2]`` -> ``2``, ``[2, 2, 1]`` -> ``(2, 2, 1)`` (a per-axis step from the command line); others as given."""
    if not isinstance(values, list):
        return values
    return values[0] if len(values) == 1 else tuple(values)
