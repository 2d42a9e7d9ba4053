"""A classifier's classes as standard coded concepts: the ``NAME=SCHEME:VALUE:MEANING`` grammar, the coding schemes aex accepts with each one's check, and the class -> code map a checkpoint stores.

A checkpoint may say which standard concept each of its classes is (``CheckpointMeta.class_codes``,
set by ``aex train --class-code`` or ``aex checkpoint codes``); the SR then codes a finding
of that class with it (``sr.class_code``), and with the private scheme 99AEX only where the
map has none. For example the bundled pneumonia checkpoint's:

    pneumonia=SCT:233604007:Pneumonia   (SNOMED CT 233604007 |Pneumonia (disorder)|)
    normal=SCT:17621005:Normal          (SNOMED CT 17621005 |Normal|, as PS3.16 uses it)

Only schemes whose values can be checked are accepted (``SCHEMES``): SNOMED CT (``SCT``: an
SCTID of 6 to 18 digits whose last is its Verhoeff check digit), DICOM (``DCM``: PS3.16's own
codes), LOINC (``LN``: digits, a hyphen and the mod-10 check digit) and RadLex (``RADLEX``:
``RID`` and digits); anything else is refused with the list. The meaning is the concept's
name as the scheme gives it (at most 64 characters, no backslash): aex does not look it up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from models.errors import BadParameterError

# Verhoeff's tables (dihedral group D5): multiplication, permutation.
_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_P = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]


def verhoeff_ok(digits: str) -> bool:
    """Whether a digit string ends in its Verhoeff check digit (SNOMED CT identifiers do)."""
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _D[check][_P[i % 8][int(ch)]]
    return check == 0


def _sct(value: str) -> bool:
    return re.fullmatch(r"[1-9][0-9]{5,17}", value) is not None and verhoeff_ok(value)


def _loinc(value: str) -> bool:
    match = re.fullmatch(r"([0-9]{1,7})-([0-9])", value)
    if match is None:
        return False
    # LOINC's check digit: Luhn's mod 10 over the number part.
    total = 0
    for i, ch in enumerate(reversed(match.group(1))):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return (10 - total % 10) % 10 == int(match.group(2))


# Scheme designator -> (what a value looks like, in words; its check).
SCHEMES = {
    "SCT": ("an SCTID: 6 to 18 digits ending in its Verhoeff check digit", _sct),
    "DCM": ("a PS3.16 code: 1 to 16 letters or digits", lambda v: re.fullmatch(r"[A-Za-z0-9]{1,16}", v) is not None),
    "LN": ("a LOINC code: digits, '-' and its check digit", _loinc),
    "RADLEX": ("a RadLex ID: RID and digits", lambda v: re.fullmatch(r"RID[0-9]{1,10}", v) is not None),
}
GRAMMAR = "NAME=SCHEME:VALUE:MEANING, e.g. pneumonia=SCT:233604007:Pneumonia"


@dataclass(frozen=True)
class ClassCode:
    """One coded concept: its scheme designator, code value and code meaning."""

    scheme: str
    value: str
    meaning: str

    def to_json(self) -> dict[str, str]:
        return {"scheme": self.scheme, "value": self.value, "meaning": self.meaning}


def parse_code(text: str, what: str = "a class code") -> ClassCode:
    """``SCHEME:VALUE:MEANING`` as a checked ``ClassCode`` (the meaning may hold ':');
    ``BadParameterError`` naming ``what`` and the fault otherwise."""
    parts = str(text).split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise BadParameterError(f"{what} {text!r} is not SCHEME:VALUE:MEANING ({GRAMMAR})")
    scheme, value, meaning = (p.strip() for p in parts)
    if scheme not in SCHEMES:
        raise BadParameterError(
            f"{what} {text!r}: unknown coding scheme {scheme!r}; aex accepts {', '.join(sorted(SCHEMES))}"
        )
    shape, check = SCHEMES[scheme]
    if not check(value):
        raise BadParameterError(f"{what} {text!r}: {value!r} is not a valid {scheme} code ({shape})")
    if len(meaning) > 64 or "\\" in meaning or not meaning.isprintable():
        raise BadParameterError(f"{what} {text!r}: the meaning must be printable, at most 64 characters, no '\\'")
    return ClassCode(scheme, value, meaning)


def parse_assignment(text: str) -> tuple[str, ClassCode | None]:
    """``NAME=SCHEME:VALUE:MEANING`` as (class name, code); ``NAME=`` as (name, None): the
    class's code removed."""
    name, sep, code = str(text).partition("=")
    if not sep or not name.strip():
        raise BadParameterError(f"class code {text!r} is not {GRAMMAR}")
    name = name.strip()
    return name, (parse_code(code, f"the code of class {name!r}") if code.strip() else None)


def class_code_map(
    assignments: Iterable[str], classes: Sequence[str], current: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, dict[str, str]]:
    """The class -> code map (JSON, as a checkpoint stores it) of ``current`` with each
    assignment applied in turn (``NAME=`` removes a class's code); ``BadParameterError`` for
    a name that is not one of ``classes`` or a malformed code."""
    out = {name: dict(code) for name, code in (current or {}).items()}
    for text in assignments:
        name, code = parse_assignment(text)
        if name not in classes:
            raise BadParameterError(f"class code {text!r}: {name!r} is not a class of the model ({', '.join(classes)})")
        if code is None:
            out.pop(name, None)
        else:
            out[name] = code.to_json()
    return dict(sorted(out.items()))


def stored_codes(mapping: Mapping[str, Mapping[str, str]], classes: Sequence[str]) -> dict[str, ClassCode]:
    """A stored class -> code map, checked (``BadParameterError`` naming the fault)."""
    out = {}
    for name, code in mapping.items():
        if name not in classes:
            raise BadParameterError(f"class_codes names {name!r}, which is not a class of the model")
        try:
            text = f"{code['scheme']}:{code['value']}:{code['meaning']}"
        except (KeyError, TypeError):
            raise BadParameterError(f"class_codes of {name!r} is not {{scheme, value, meaning}}") from None
        out[name] = parse_code(text, f"the code of class {name!r}")
    return out
