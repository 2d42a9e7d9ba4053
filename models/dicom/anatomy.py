"""The body part and laterality a derived image copies from its source: present where the source says them, absent (never empty) where they do not apply.

Laterality (General Series) is Type 2C: required, if need be empty, only when the body part is
paired and the image carries no Image Laterality; otherwise it shall not be present (dciodvfy
says so too: "present when condition unsatisfied"). So a derived image (the Parametric Map, a
Secondary Capture) gets:

- Body Part Examined (Type 3): the source's, when it has a value;
- Image Laterality (General Image, Type 3; Secondary Captures only, the Parametric Map has no
  General Image module): the source's, when it has a value; then no Laterality;
- else Laterality: none when the body part is known to be unpaired (``UNPAIRED``: the PS3.16
  Annex L body parts without laterality that dciodvfy knows, such as CHEST); else the
  source's Laterality (R or L), else its Image Laterality when that is R or L (one image a
  series: the series is that side); else, and only then, present and empty: the body part
  may be paired and nothing says which side.

The source's values are checked first (``sanitize.usable_source``: a malformed one is gone).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

# Body Part Examined defined terms (PS3.16 Annex L) of unpaired structures: no laterality.
UNPAIRED = frozenset(
    {
        "ABDOMEN",
        "BRAIN",
        "CHEST",
        "COCCYX",
        "CSPINE",
        "HEAD",
        "HEART",
        "JAW",
        "LIVER",
        "LSPINE",
        "NECK",
        "PELVIS",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "TSPINE",
        "UTERUS",
        "WHOLEBODY",
    }
)
SIDES = ("R", "L")


def _value(source: Dataset, keyword: str) -> str:
    return str(source.get(keyword) or "").strip().upper()


def copy_anatomy(source: Dataset, ds: Dataset, image_laterality: bool) -> Dataset:
    """Set on ``ds`` (a derived image of ``source``) the body part and laterality attributes
    the module's docstring gives, and remove any it must not carry; in place, returned.
    image_laterality: whether ``ds`` has a General Image module (a Secondary Capture)."""
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if keyword in ds:
            delattr(ds, keyword)
    body_part = _value(source, "BodyPartExamined")
    if body_part:
        ds.BodyPartExamined = source.BodyPartExamined
    side = _value(source, "ImageLaterality")
    if image_laterality and side:
        ds.ImageLaterality = side
        return ds
    if body_part in UNPAIRED:
        return ds
    laterality = _value(source, "Laterality")
    if laterality in SIDES:
        ds.Laterality = laterality
    elif side in SIDES:
        ds.Laterality = side
    else:
        ds.Laterality = ""  # the body part may be paired, and nothing says which side
    return ds
