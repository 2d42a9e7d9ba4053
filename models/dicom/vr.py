"""One DICOM element against its VR, as PS3.5 6.2 writes it for a new object: readable, the dictionary's VR and value multiplicity, each value's length, characters, format and range, its text within the declared character set.

Stricter than pydicom's own validation where a new object must be (``sanitize`` decides what a
derived object does with an element that fails): real dates and times (no "19900230", no
"251500"), no DA/TM ranges (those belong to queries), no old forms pydicom still reads
("1997.04.24", "10:15"), UIDs without leading zeros in a component, at most three Person Name
groups of at most five components, no control characters in text but line breaks and tabs in
ST/LT/UT, and non-ASCII text only where the Specific Character Set declares a repertoire that
holds it (pydicom would write such text in Latin-1 under the default repertoire).
"""

from __future__ import annotations

import datetime
import math
import re
import warnings
from collections.abc import Callable

from pydicom.charset import convert_encodings, encode_string, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# PS3.5 6.2, as a new object must write them (pydicom also reads older forms, "1997.04.24" or
# "10:15", and DA/TM ranges, which belong to queries, not to an attribute's value).
_DA = re.compile(r"\d{8}")
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d(([0-5]\d|60)(\.\d{1,6})?)?)?")
_DT = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?")
_AS = re.compile(r"\d{3}[DWMY]")
_CS = re.compile(r"[A-Z0-9 _]*")
_DS = re.compile(r" *[+-]?(\d+|\d+\.\d*|\.\d+)([eE][+-]?\d+)? *")
_IS = re.compile(r" *[+-]?\d+ *")
UID = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*")
_UR = re.compile(r"[A-Za-z_\d:/?#\[\]@!$&'()*+,;=%\-.~]* *")
_AE = re.compile(r"[\x20-\x5b\x5d-\x7e]*")
MAX_LENGTH = {"AE": 16, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "LT": 10240, "SH": 16, "ST": 1024, "UI": 64}
TEXT_VRS = ("LO", "LT", "PN", "SH", "ST", "UC", "UT")
_FORMATTED = ("ST", "LT", "UT")  # text that may hold line breaks and tabs
_ALLOWED_CONTROLS = frozenset("\t\n\r\f")
BINARY = ("OB", "OW", "OD", "OF", "OL", "OV", "UN")  # bytes: readable is valid


def text_of(value) -> str:
    """A value as the text it was written as (IS and DS keep their original string)."""
    if isinstance(value, bytes):
        return value.decode("ascii")  # raises for bytes outside ASCII: malformed
    original = getattr(value, "original_string", None)
    if isinstance(original, str):
        return original
    return str(value)


def _valid_date(text: str) -> bool:
    if not _DA.fullmatch(text):
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def _valid_datetime(text: str) -> bool:
    if not _DT.fullmatch(text):
        return False
    body = re.split(r"[+-]", text, maxsplit=1)[0]
    parts = [int(body[i : i + 2]) for i in range(4, min(len(body), 14), 2)]
    month, day, hour, minute, second = (parts + [1, 1, 0, 0, 0][len(parts) :])[:5]
    try:
        datetime.date(int(body[:4]), month, day)
    except ValueError:
        return False
    if not (hour < 24 and minute < 60 and second <= 60):
        return False
    if len(text) > len(body):  # a UTC offset &ZZXX: hours to 14, minutes below 60
        offset = text[len(body) + 1 :]
        return int(offset[:2]) <= 14 and int(offset[2:]) < 60
    return True


def _controls_ok(text: str, vr: str) -> bool:
    allowed = _ALLOWED_CONTROLS if vr in _FORMATTED else frozenset()
    return all(ch >= " " and ch != "\x7f" or ch in allowed for ch in text) and "\ufffd" not in text


def _repertoire_ok(text: str, encodings: list[str] | None) -> bool:
    """``text`` encodes in the declared character sets (None: the default repertoire, ASCII)."""
    if text.isascii():
        return True
    if encodings is None:
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            encode_string(text, encodings)
        except (UnicodeError, ValueError, LookupError):
            return False
    return not caught  # pydicom warns when it falls back to replacement characters


def _person_name_ok(text: str) -> bool:
    groups = text.split("=")
    return len(groups) <= 3 and all(len(g) <= 64 and g.count("^") <= 4 for g in groups)


def _value_ok(vr: str, value, encodings: list[str] | None) -> bool:
    """One value of an element valid for its VR (PS3.5 6.2)."""
    if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return isinstance(value, int)
    if vr in ("FL", "FD"):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if vr in BINARY or vr == "AT":
        return True  # binary: readable is valid
    text = str(value) if isinstance(value, PersonName) else text_of(value)
    if len(text) > MAX_LENGTH.get(vr, len(text)):
        return False
    if vr in TEXT_VRS:
        if not _controls_ok(text, vr) or not _repertoire_ok(text, encodings):
            return False
        return vr != "PN" or _person_name_ok(text)
    # Every other string VR is ASCII by definition, whatever the character set.
    if vr == "DA":
        return _valid_date(text.rstrip())
    if vr == "TM":
        return bool(_TM.fullmatch(text.rstrip()))
    if vr == "DT":
        return _valid_datetime(text.rstrip())
    if vr == "IS":
        return bool(_IS.fullmatch(text)) and -(2**31) <= int(text) < 2**31
    if vr == "DS":
        return bool(_DS.fullmatch(text)) and math.isfinite(float(text))
    pattern = {"AS": _AS, "CS": _CS, "UI": UID, "UR": _UR, "AE": _AE}.get(vr)
    if pattern is not None:
        stripped = text.strip(" ") if vr in ("CS", "AE") else text
        return bool(pattern.fullmatch(stripped)) and (vr != "UI" or bool(text))
    return True


def _vm_ok(spec: str, n: int) -> bool:
    """``n`` values within the dictionary's value multiplicity ("1", "1-n", "2-2n", "1-3"...)."""
    if n == 0:
        return True
    try:
        low, _, high = spec.partition("-")
        if not high:
            return n == int(low)
        if high == "n":
            return n >= int(low)
        if high.endswith("n"):
            return n >= int(low) and n % int(high[:-1]) == 0
        return int(low) <= n <= int(high)
    except ValueError:
        return True  # a multiplicity this parser does not know: not judged


def values_of(elem: DataElement) -> list:
    """The values of an element, one per value multiplicity (none when empty)."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, (MultiValue, list, tuple)) and elem.VR not in BINARY:
        return list(value)
    return [value]


def element_ok(
    elem: DataElement, encodings: list[str] | None, rules: Callable[[str, list], bool] = lambda _k, _v: True
) -> bool:
    """Every check of one element (and, for a sequence, of everything in it); ``rules(keyword,
    values)``: the attribute's own rules besides its VR (enumerated values, say). encodings:
    ``declared_encodings`` of its data set."""
    try:
        if elem.tag.is_private or not keyword_for_tag(elem.tag):
            return True  # private or unknown: no dictionary to judge by (never warned about)
        vr = dictionary_VR(elem.tag)
        if vr == elem.VR and " or " in vr:
            return True  # a VR pydicom left ambiguous (pixel value attributes): not judged
        if elem.VR not in vr.split(" or "):
            return False
        if elem.VR == "SQ":
            return all(element_ok(inner, encodings, rules) for item in elem.value for inner in item)
        values = values_of(elem)
        if elem.VR not in BINARY and not _vm_ok(dictionary_VM(elem.tag), len(values)):
            return False
        return all(_value_ok(elem.VR, v, encodings) for v in values) and rules(elem.keyword, values)
    except Exception:  # a value pydicom cannot read (wrong length for its VR, bad bytes, ...)
        return False


def declared_encodings(ds: Dataset) -> tuple[list[str] | None, bool]:
    """(the Python encodings of the declared Specific Character Set, or None for the default
    repertoire; whether the declaration itself is valid)."""
    if "SpecificCharacterSet" not in ds:
        return None, True
    try:
        value = ds["SpecificCharacterSet"].value
        terms = [value] if isinstance(value, str) else list(value or [])
        terms = [str(t).strip() for t in terms]
        if not terms or all(not t for t in terms):
            return None, True
        if any(t not in python_encoding for t in terms) or "" in terms[1:]:
            return None, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encodings = convert_encodings(terms)
        return (None if encodings == ["iso8859"] and terms[0] in ("", "ISO_IR 6") else encodings), True
    except Exception:
        return None, False
