"""How the ``effi`` command reports bad input: ``effi: error: <reason>`` on one line and exit code 2, instead of a
traceback (``--debug`` or ``EFFI_DEBUG=1`` keeps the traceback).

Bad input is a command-line or config parse error, or a ValueError, TypeError, FileNotFoundError or Lightning
``MisconfigurationException`` raised before the Trainer runs the model's first step: while the command line, the
configs and the checkpoint are parsed and checked, and while the model, data, strategy, plugins and optimizer are
built and set up (``setup``, ``configure_model``, ``configure_optimizers``, the dataloaders). From the first hook of a
loop on (``on_sanity_check_start``, ``on_train_start``, ``on_validation_start``, ``on_test_start``,
``on_predict_start``), a failure is the run's, not the input's, and keeps its traceback.

jsonargparse nests the reason a value was refused inside "Does not validate against any of the Union subtypes"
and "Parser key" wrappers; :func:`reason` digs it out. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import NoReturn

DEBUG_ENV = "EFFI_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_CODE = 2  # argparse's code for a usage error

_KEY = re.compile(r'Parser key "([^"]+)"(?: element \d+)?:')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':")
_UNION = "Does not validate against any of the Union subtypes"
# A union member the value was never meant for: another subtype's "wrong type" says nothing about the value.
_OTHER_SUBTYPE = re.compile(r"Expected a <class '[\w.]+'>(\. Got value: .*)?$|Import path \S+ does not "
                            r"(correspond to a subclass|implement protocol) of |Not a valid subclass of |"
                            r"Does not implement protocol |Expected a path but ", re.S)


@dataclass
class RunState:
    """Whether the Trainer has started a loop; what is raised before that is bad input (the module docstring)."""

    started: bool = False


def debug() -> bool:
    """Whether tracebacks are kept (``EFFI_DEBUG`` set to a non-empty value other than ``0``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def pop_debug(argv: list[str]) -> bool:
    """Remove every ``--debug`` from ``argv`` (in place); True if there was one or :func:`debug` is on."""
    given = DEBUG_FLAG in argv
    argv[:] = [a for a in argv if a != DEBUG_FLAG]
    return given or debug()


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` is of a kind bad input raises (whether it was raised in time is :class:`RunState`'s)."""
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, argparse.ArgumentError)):
        return True
    # Looked up rather than imported: this module must not import Lightning, which is loaded if it raised this.
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.MisconfigurationException)


def reason(exc: BaseException) -> str:
    """The innermost, most specific message of ``exc``, on one line, with the option it concerns where jsonargparse
    named one (``--model.init_args.n_layer: Expected a <class 'int'>. Got value: zero``).

    jsonargparse's wrappers are read through (their text, then their ``__cause__``); any other message is taken as
    it is, since it names its own reason (a wrapped cause there is usually the less specific one, e.g. a KeyError).
    """
    parts: list[tuple[str, str]] = []
    current: BaseException | None = exc
    text = str(exc)
    while current is not None:
        found, text = _unwrap(str(current))
        parts += [p for p in found if not parts or p != parts[-1]]  # a cause repeats its wrapper's key
        # jsonargparse chains what it wraps; an unwrapped union header means its errors were not in the text.
        if not text.startswith(_UNION):
            break
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    message = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    option = _option(parts)
    return f"{option}: {message}" if option else message


def report(exc: BaseException, prog: str = "effi") -> NoReturn:
    """Print ``exc`` as one line (and how to see its traceback) to stderr and exit with :data:`EXIT_CODE`."""
    sys.stderr.write(f"{prog}: error: {reason(exc)}\n"
                     f"{prog}: ({DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback)\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_CODE)


def _unwrap(text: str) -> tuple[list[tuple[str, str]], str]:
    """Strip jsonargparse's wrappers off ``text``: the keys and class paths passed on the way, and the rest."""
    parts: list[tuple[str, str]] = []
    while True:
        text = text.strip("\n")
        m = _KEY.match(text) or _CLASS.match(text)
        if m is not None:
            parts.append(("key" if m.re is _KEY else "class", m.group(1)))
            rest = text[m.end():].lstrip(" ")
            # the message indented on the lines below, or on the same line (its next lines not indented)
            text = textwrap.dedent(rest.lstrip("\n")) if rest.startswith("\n") else rest
            continue
        lines = text.splitlines()
        if text.startswith(_UNION):
            # the members' errors, listed under "Errors:" and above "Given value type:"
            start = next((i for i, line in enumerate(lines) if line.strip() == "Errors:"), None)
            if start is None:
                return parts, text
            block = _block(lines[start + 1:], _indent(lines[start]))
            given = re.search(r"^\s*Given value: (.*)$", text, re.M)
            text = _pick(_items(block), given.group(1) if given else None)
            continue
        if text.lstrip().startswith("- "):  # the alternatives one value was tried as (a config path, a class)
            text = _pick(_items(lines), None)
            continue
        return parts, text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], base: int) -> list[str]:
    """The lines indented deeper than ``base``, up to the first that is not."""
    return list(itertools.takewhile(lambda line: not line.strip() or _indent(line) > base, lines))


def _items(lines: list[str]) -> list[str]:
    """The entries of a "- " list, each with its continuation lines (indented deeper, or not, by jsonargparse)."""
    items: list[list[str]] = []
    bullet = None
    for line in lines:
        if line.lstrip().startswith("- ") and bullet in (None, _indent(line)):
            bullet = _indent(line)
            items.append([line.lstrip()[2:]])
        elif items:
            items[-1].append(line)
    return [item[0] + ("\n" + textwrap.dedent("\n".join(item[1:])) if item[1:] else "") for item in items]


def _pick(items: list[str], given: str | None) -> str:
    """The error of the alternative the value was meant for: the first that is not another subtype's refusal; a
    value that is none of several literals gets them all."""
    meant = [t for t in items if not _OTHER_SUBTYPE.match(t)]
    not_none = [t for t in items if "NoneType" not in t.split("\n", 1)[0]]
    candidates = meant or not_none or items or [""]
    if len(candidates) > 1 and all(t.startswith("Expected a ") and "\n" not in t for t in candidates):
        # jsonargparse drops "Got value" from each member's message; the union names it once
        got = f". Got value: {given}" if given is not None else ""
        return "Expected " + " or ".join(t[len("Expected "):] for t in candidates) + got
    return candidates[0]


def _option(parts: list[tuple[str, str]]) -> str:
    """``--model.init_args.n_layer`` from the keys and class paths jsonargparse named, outermost first."""
    option, last_class = "", ""
    for kind, name in parts:
        if kind == "class":
            last_class = name
        else:
            option = name if not option else f"{option}.init_args.{name}" if last_class else f"{option}.{name}"
            last_class = ""
    if not option:
        return ""
    return f"--{option} ({last_class})" if last_class else f"--{option}"
