"""``aex watch`` submits by upload until the service's explain form takes references, then by reference (no image)."""

from __future__ import annotations

from aex.commands import watch as cmd
from jobs.settings import Settings
from pacs.read import PacsReference

REF = PacsReference("orthanc", "1.2.3", "1.2.3.4", "1.2.3.4.5")


class FakeClient:
    def __init__(self, spec):
        self.spec, self.posts = spec, []

    def _json(self, method, path, **kwargs):
        if path == "/openapi.json":
            return self.spec
        self.posts.append(kwargs)
        return {"id": f"job{len(self.posts)}"}


def spec_with(fields, ref=False):
    schema = {"properties": {name: {"type": "string"} for name in fields}}
    body = {"$ref": "#/components/schemas/Explain"} if ref else schema
    content = {"multipart/form-data": {"schema": body}}
    return {
        "paths": {"/v1/explain": {"post": {"requestBody": {"content": content}}}},
        "components": {"schemas": {"Explain": schema}},
    }


def test_by_reference_when_the_form_takes_it():
    for ref in (False, True):
        client = FakeClient(
            spec_with(["image", "model", "pacs", "study_uid", "series_uid", "instance_uid", "store"], ref)
        )
        fields = cmd.explain_fields(client)
        assert cmd.takes_references(fields)
        submit = cmd.make_submit(client, Settings(), "tiny", fields, store=False)
        assert submit(REF) == "job1"
        sent = client.posts[0]["files"]
        assert "image" not in sent and {k: v[1] for k, v in sent.items()} == {
            "model": "tiny",
            "store": "false",
            **REF.as_dict(),
        }


def test_by_upload_until_then(monkeypatch):
    client = FakeClient(spec_with(["image", "model", "targets"]))
    fields = cmd.explain_fields(client)
    assert not cmd.takes_references(fields)
    fetched = []
    monkeypatch.setattr("pacs.read.fetch_instance", lambda endpoints, *uids: fetched.append(uids[:4]) or b"DICM")
    submit = cmd.make_submit(client, Settings(), None, fields, store=True)
    assert submit(REF) == "job1"
    assert fetched == [("orthanc", "1.2.3", "1.2.3.4", "1.2.3.4.5")]
    assert client.posts[0]["files"]["image"] == ("1.2.3.4.5.dcm", b"DICM", "application/dicom")
    assert client.posts[0]["data"] == {}


def test_an_unreadable_schema_means_upload():
    class Down(FakeClient):
        def _json(self, method, path, **kwargs):
            from models.errors import ServiceUnavailableError

            raise ServiceUnavailableError("down")

    assert cmd.explain_fields(Down({})) == set()
