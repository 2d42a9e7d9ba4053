"""Classes as standard coded concepts: the grammar, the accepted schemes and their checks, the map, and the SR coding findings in SNOMED CT where the map says so (99AEX for the rest)."""

from __future__ import annotations

import io
import re

import pydicom
import pytest

from models.data.geometry import map_to_source
from models.dicom.class_codes import ClassCode, class_code_map, parse_assignment, parse_code, verhoeff_ok
from models.dicom.equipment import Provenance
from models.dicom.results import explanation_objects
from models.errors import BadParameterError
from tests.models.dicom.test_sr import CLASSES, METRICS, PARAMETERS, SHA, concept, content_items, images, summary
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy

PNEUMONIA = "SCT:233604007:Pneumonia"  # SNOMED CT 233604007 |Pneumonia (disorder)|
NORMAL = "SCT:17621005:Normal"  # SNOMED CT 17621005 |Normal| (PS3.16's concept for a normal finding)


def test_codes_parse_and_each_scheme_is_checked():
    assert parse_code(PNEUMONIA) == ClassCode("SCT", "233604007", "Pneumonia")
    assert parse_code("SCT:17621005:Normal: no finding") == ClassCode("SCT", "17621005", "Normal: no finding")
    assert parse_code("DCM:130403:Gradient-weighted class activation").scheme == "DCM"
    assert parse_code("LN:18748-4:Diagnostic imaging study").value == "18748-4"
    assert parse_code("RADLEX:RID5350:pneumonia").value == "RID5350"
    # SCTIDs known from PS3.16 (and SNOMED International) pass Verhoeff's check, one digit off fails.
    assert all(verhoeff_ok(v) for v in ("233604007", "17621005", "363679005", "51185008"))
    assert not verhoeff_ok("233604008") and not verhoeff_ok("17621006")


@pytest.mark.parametrize(
    "text, fault",
    [
        ("SNOMED:233604007:Pneumonia", "unknown coding scheme 'SNOMED'; aex accepts DCM, LN, RADLEX, SCT"),
        ("99AEX:pneumonia:Pneumonia", "unknown coding scheme '99AEX'"),
        ("SCT:233604008:Pneumonia", "'233604008' is not a valid SCT code"),
        ("SCT:0233604007:Pneumonia", "is not a valid SCT code"),
        ("LN:18748-5:Diagnostic imaging study", "is not a valid LN code"),
        ("RADLEX:5350:pneumonia", "is not a valid RADLEX code"),
        ("SCT:233604007", "is not SCHEME:VALUE:MEANING"),
        ("SCT::Pneumonia", "is not SCHEME:VALUE:MEANING"),
        ("SCT:233604007:" + "x" * 65, "at most 64 characters"),
        ("SCT:233604007:a\\b", "no '\\'"),
    ],
)
def test_a_malformed_code_is_refused_precisely(text, fault):
    with pytest.raises(BadParameterError, match=re.escape(fault)):
        parse_code(text)


def test_the_map_names_classes_of_the_model_and_can_be_changed():
    classes = ["normal", "pneumonia"]
    mapping = class_code_map([f"pneumonia={PNEUMONIA}", f"normal={NORMAL}"], classes)
    assert mapping == {
        "normal": {"scheme": "SCT", "value": "17621005", "meaning": "Normal"},
        "pneumonia": {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"},
    }
    assert class_code_map(["normal="], classes, mapping) == {"pneumonia": mapping["pneumonia"]}  # removed
    assert parse_assignment("normal=") == ("normal", None)
    with pytest.raises(BadParameterError, match="'effusion' is not a class of the model"):
        class_code_map([f"effusion={PNEUMONIA}"], classes)
    with pytest.raises(BadParameterError, match="is not NAME=SCHEME:VALUE:MEANING"):
        class_code_map([PNEUMONIA], classes)


def finding_codes(sr) -> dict[tuple[str, str], str]:
    """(scheme, value) -> meaning of every coded value (a CODE item's concept) in the SR."""
    out = {}
    for item in content_items(sr.ContentSequence):
        if item.ValueType == "CODE":
            code = item.ConceptCodeSequence[0]
            out[(code.CodingSchemeDesignator, code.CodeValue)] = code.CodeMeaning
    return out


def test_the_sr_codes_mapped_classes_in_snomed_ct_and_the_rest_in_99aex(tmp_path, dicom_file):
    import numpy as np

    pixels = (np.mgrid[0:64, 0:80].sum(0) * 30).clip(0, 4095).astype(np.uint16)
    source = pydicom.dcmread(io.BytesIO(dicom_file(pixels, "MONOCHROME2")))
    s = summary()
    codes = class_code_map([f"pneumonia={PNEUMONIA}", f"normal={NORMAL}"], CLASSES)
    values = map_to_source(np.zeros((28, 28), np.float32), 80, 64)
    objects = explanation_objects(
        source, values, images(s), s, METRICS, PARAMETERS, Provenance("tiny", SHA), "how", class_codes=codes
    ).objects
    sr = pydicom.dcmread(io.BytesIO(objects[-1].data))
    coded = finding_codes(sr)
    assert coded[("SCT", "233604007")] == "Pneumonia" and coded[("SCT", "17621005")] == "Normal"
    assert ("99AEX", "pneumonia") not in coded and ("99AEX", "normal") not in coded
    assert ("99AEX", "effusion") in coded  # no standard code in the map: the private scheme
    # The per-class measurement groups' finding types too.
    types = {
        (c.ConceptCodeSequence[0].CodingSchemeDesignator, c.ConceptCodeSequence[0].CodeValue)
        for i in content_items(sr.ContentSequence)
        for c in i.get("ContentSequence", [])
        if concept(c) == ("DCM", "121071")
    }
    assert {("SCT", "233604007"), ("SCT", "17621005"), ("99AEX", "effusion")} <= types
    require_dciodvfy()
    assert check_with_dciodvfy(tmp_path, {o.name: o.data for o in objects}) == {}
