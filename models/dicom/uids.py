"""Deterministic DICOM UIDs (2.25 + a name-based UUID) for derived objects, so re-storing a result replaces it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

# The namespace of every name-based UUID aex derives (uuid5 of the project's name): fixed for
# ever, or every UID changes and a re-store duplicates instead of replacing.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/aex/aex#dicom-uids")

# (role) -> UID: the UIDs of one result, every other input fixed (see ``result_uids``).
UidFor = Callable[[str], str]


def _uid(material: Mapping[str, Any]) -> str:
    name = json.dumps(material, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return f"2.25.{uuid.uuid5(NAMESPACE, name).int}"  # PS3.5 B.2: at most 44 characters


def derived_uid(source_uid: str, checkpoint_sha256: str, parameters: Mapping[str, Any], role: str) -> str:
    """The UID of one derived object (or its series): the same source SOP Instance UID, checkpoint
    file, canonical parameters (``jobs.params``) and role ("series/pm", "instance/sr", ...)
    always give the same UID; any difference gives another."""
    return _uid(
        {
            "source": str(source_uid),
            "checkpoint_sha256": checkpoint_sha256,
            "parameters": dict(parameters),
            "role": role,
        }
    )


def result_uids(source_uid: str, checkpoint_sha256: str, parameters: Mapping[str, Any]) -> UidFor:
    """``derived_uid`` with everything but the role fixed."""
    return lambda role: derived_uid(source_uid, checkpoint_sha256, parameters, role)


def device_uid(checkpoint_sha256: str) -> str:
    """The Device UID of a served model: one per checkpoint file, so it changes when the model is
    retrained (or its recorded metrics change) and not otherwise."""
    return _uid({"device": checkpoint_sha256})


def nominal_frame_of_reference_uid(source_uid: str) -> str:
    """The Frame of Reference of a source image that has none (a projection radiograph): one per
    source instance, shared by every object derived from it in its pixel grid."""
    return _uid({"frame_of_reference_of": str(source_uid)})


def unusable_uid(keyword: str, material: Mapping[str, str]) -> str:
    """The UID a derived object carries in place of the source's malformed ``keyword`` (Study,
    Series or SOP Instance UID; see ``sanitize``): the same malformed value (and ``material``)
    always gives the same UID, and a valid one never enters it."""
    return _uid({"unusable": keyword, **material})
