"""AEX_PACS: validated, its secrets never shown (repr, errors, references), passed whole to child processes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from jobs.settings import Settings
from pacs.read import check_reference

SECRET = "s3cret-Value-42"
ENTRY = {
    "url": "https://pacs.example.org/dicom-web/",
    "username": "aex",
    "password": SECRET,
    "dimse": {"ae_title": "PACS", "host": "pacs.example.org", "port": 4242},
}


def test_read_from_the_environment_and_handed_to_children_whole(monkeypatch):
    monkeypatch.setenv(
        "AEX_PACS", json.dumps({"main": ENTRY, "cloud": {"url": "https://c.example/rs", "token": SECRET}})
    )
    settings = Settings()
    assert settings.pacs["main"].url == "https://pacs.example.org/dicom-web"  # no trailing slash
    assert settings.pacs["main"].stores_via() == "stow" and settings.pacs["main"].calling_ae_title == "AEX"
    assert settings.pacs["cloud"].auth_headers() == {"Authorization": f"Bearer {SECRET}"}
    env = settings.as_env()
    monkeypatch.setenv("AEX_PACS", env["AEX_PACS"])
    assert Settings().pacs == settings.pacs
    assert "AEX_PACS" not in Settings(pacs={}).as_env()


def test_secrets_are_never_shown():
    settings = Settings(pacs={"main": ENTRY})
    assert SECRET not in repr(settings) and SECRET not in str(settings.pacs)
    assert SECRET not in json.dumps(settings.model_dump(mode="json"))
    ref = check_reference(settings.pacs, "main", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert SECRET not in json.dumps(ref.as_dict()) and "pacs.example.org" not in json.dumps(ref.as_dict())


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({**ENTRY, "url": f"https://aex:{SECRET}@pacs.example.org/rs"}, "may not hold credentials"),
        ({**ENTRY, "url": "ftp://pacs.example.org/rs"}, "http"),
        ({**ENTRY, "token": SECRET}, "not both"),
        ({"url": "https://p.example/rs", "password": SECRET}, "go together"),
        ({"url": "https://p.example/rs", "token": ""}, "may not be empty"),
        ({**ENTRY, "dimse": {"ae_title": "A\\B", "host": "h", "port": 104}}, "ae_title"),
        ({**ENTRY, "dimse": {"ae_title": "WAY-TOO-LONG-AE-TITLE", "host": "h", "port": 104}}, "ae_title"),
        ({**ENTRY, "dimse": {"ae_title": "A", "host": "h", "port": 0}}, "port"),
        ({"username": "aex", "password": SECRET}, "give url"),
        ({"url": "https://p.example/rs", "store_via": "dimse"}, "needs dimse"),
        ({**ENTRY, "surprise": 1}, "surprise"),
    ],
)
def test_bad_entries_are_refused_without_echoing_the_value(entry, complaint):
    with pytest.raises(ValidationError) as info:
        Settings(pacs={"main": entry})
    text = str(info.value)
    assert complaint in text and "main" in text
    assert SECRET not in text


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"bad name!": {"url": "https://p.example/rs"}}'])
def test_bad_values_are_refused(value):
    with pytest.raises(ValidationError, match="AEX_PACS"):
        Settings(pacs=value)


def test_a_dimse_only_peer_stores_by_c_store():
    settings = Settings(pacs={"scp": {"dimse": {"ae_title": "SCP", "host": "10.0.0.5", "port": 104}}})
    assert settings.pacs["scp"].stores_via() == "dimse" and settings.pacs["scp"].auth_headers() == {}
