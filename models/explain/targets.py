"""The targets grammar: which classes an explanation request names, one grammar for the CLI,
the API's admission check and the worker.

A request is a list of specs; each text may hold several, separated by commas. A spec is
``predicted`` (aliases ``pred``, ``top``), ``runner-up`` (aliases ``runner_up``,
``runnerup``, ``second``), ``all`` (every class in turn), a class index (digits) or a class
name (exact; a class name wins over an alias it happens to equal). ``parse_targets`` checks
a request against the class names without a model and counts the rows that will be rendered
(torch-free: the API uses it); ``resolve_targets`` turns it into (role, class index) pairs
once the model's probabilities are known.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from models.errors import BadParameterError

WORDS = ("predicted", "runner-up", "all")
ROLE_ALIASES = {
    "predicted": "predicted",
    "pred": "predicted",
    "top": "predicted",
    "runner-up": "runner-up",
    "runner_up": "runner-up",
    "runnerup": "runner-up",
    "second": "runner-up",
}


@dataclass(frozen=True)
class Target:
    """One parsed spec: ``role`` "predicted" or "runner-up" (class known only with the
    model's probabilities), "all" (every class) or "class" with its ``index``."""

    role: str
    index: int | None = None


def split_specs(specs: str | int | Iterable[str | int] | None) -> list[str | int]:
    """``"predicted,cat"``, ``["predicted", "cat,1"]`` or ``[3]`` -> a flat list of specs
    (blank pieces dropped)."""
    if specs is None:
        return []
    if isinstance(specs, (str, int)):
        specs = [specs]
    out: list[str | int] = []
    for spec in specs:
        if isinstance(spec, str):
            out.extend(s.strip() for s in spec.split(",") if s.strip())
        else:
            out.append(spec)
    return out


def _unknown(spec, classes: Sequence[str]) -> BadParameterError:
    names = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    return BadParameterError(
        f"unknown target {spec!r}: use {', '.join(WORDS)}, a class index below {len(classes)} or one of {names}"
    )


def parse_target(spec: str | int, classes: Sequence[str]) -> Target:
    """One spec against the class names; BadParameterError (400) naming what is accepted."""
    if isinstance(spec, bool):
        raise _unknown(spec, classes)
    if isinstance(spec, int):
        if not 0 <= spec < len(classes):
            raise BadParameterError(f"class index {spec} is out of range [0, {len(classes)})")
        return Target("class", spec)
    text = str(spec).strip()
    if text in classes:
        return Target("class", list(classes).index(text))
    key = text.lower()
    if key in ROLE_ALIASES:
        return Target(ROLE_ALIASES[key])
    if key == "all":
        return Target("all")
    if key.isascii() and key.isdigit():
        return parse_target(int(key), classes)
    raise _unknown(spec, classes)


def parse_targets(specs, classes: Sequence[str]) -> list[Target]:
    """Every spec of a request (see ``split_specs``); BadParameterError for an unknown one or
    for none at all."""
    parsed = [parse_target(s, classes) for s in split_specs(specs)]
    if not parsed:
        raise BadParameterError("no targets to explain")
    return parsed


def count_rows(targets: Sequence[Target], num_classes: int) -> tuple[int, int]:
    """(rendered, searched): the explanations a request renders (each listed target, ``all``
    counting every class) and the distinct search rows it needs at most (the predicted and
    runner-up classes may coincide with named ones, so this is an upper bound)."""
    rendered = sum(num_classes if t.role == "all" else 1 for t in targets)
    distinct: set[int | str] = set()
    for t in targets:
        if t.role == "all":
            distinct.update(range(num_classes))
        else:
            distinct.add(t.index if t.role == "class" else t.role)
    return rendered, min(len(distinct), num_classes)


def rank_classes(probs) -> list[int]:
    """Class indices by decreasing probability. A torch tensor is ranked by its own argsort
    (as the explainer ranks it, ties included); any other sequence by a stable sort."""
    if type(probs).__module__.startswith("torch"):
        return probs.argsort(descending=True).tolist()
    values = [float(p) for p in probs]
    return sorted(range(len(values)), key=lambda i: -values[i])


def resolve_targets(specs, probs, classes: Sequence[str]) -> list[tuple[str, int]]:
    """Turn target specs into (role, class index) pairs, in order; ``all`` expands to one
    ("class", i) per class. probs: the model's num_classes probabilities (any sequence or
    tensor) at the image, which decide the predicted and runner-up classes."""
    order = rank_classes(probs)
    predicted = order[0]
    runner_up = order[1] if len(order) > 1 else order[0]
    out: list[tuple[str, int]] = []
    for t in parse_targets(specs, classes):
        if t.role == "all":
            out.extend(("class", i) for i in range(len(classes)))
        elif t.role == "class":
            out.append(("class", t.index))
        else:
            out.append((t.role, predicted if t.role == "predicted" else runner_up))
    return out
