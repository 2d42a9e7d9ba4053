"""``aex watch``: follow a configured PACS and submit explain jobs for its new instances through the aex service (the engine is ``aex.watcher``)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from aex.commands.common import UrlOpt, friendly_errors

TERMINAL = ("finished", "failed", "cancelled")


def _form_fields(spec: dict[str, Any], path: str) -> set[str]:
    try:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        if "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return set(schema.get("properties", {}))
    except (KeyError, TypeError, AttributeError):
        return set()


REFERENCE_FIELDS = {"pacs", "study_uid", "series_uid", "instance_uid"}


def explain_fields(client) -> set[str]:
    """The form fields of the service's ``POST /v1/explain``, from its OpenAPI schema (empty
    when it cannot be read)."""
    from models.errors import AexError

    try:
        return _form_fields(client._json("GET", "/openapi.json"), "/v1/explain")
    except AexError:
        return set()


def takes_references(fields: set[str]) -> bool:
    """Whether those fields take an input by reference (``pacs`` and the three UIDs)."""
    return REFERENCE_FIELDS.issubset(fields)


def make_submit(client, settings, model: str | None, fields: set[str], store: bool):
    """The one function that submits an instance (a ``pacs.read.PacsReference``) and
    returns its job id: by reference when the service takes references (it then fetches the
    instance, and stores the results back with ``store``), else by fetching the instance here
    and uploading it."""
    from pacs.read import fetch_instance

    by_reference = takes_references(fields)

    def submit(ref) -> str:
        form = {"model": model} if model else {}
        if by_reference:
            form.update(ref.as_dict())
            if "store" in fields:  # an unknown field would be refused
                form["store"] = "true" if store else "false"
            # Plain form fields, sent as multipart/form-data like an upload.
            view = client._json("POST", "/v1/explain", files={k: (None, v) for k, v in form.items()})
        else:
            data = fetch_instance(
                settings.pacs, ref.pacs, ref.study_uid, ref.series_uid, ref.instance_uid, settings.max_upload_bytes
            )
            files = {"image": (f"{ref.instance_uid}.dcm", data, "application/dicom")}
            view = client._json("POST", "/v1/explain", data=form, files=files)
        return str(view["id"])

    return submit


def make_collect(client):
    """collect(job_id): the DICOM objects of a finished job, None while it runs; a failed or
    cancelled job raises its error."""
    from aex.client import job_error

    def collect(job_id: str) -> list[bytes] | None:
        view = client.job(job_id)
        if view.get("status") not in TERMINAL:
            return None
        if view.get("status") != "finished":
            raise job_error(view)
        return [client.download(url) for url in client.dicom_links(view).values()]

    return collect


@friendly_errors
def watch(
    pacs: Annotated[str, typer.Option(help="the PACS to follow: a name of AEX_PACS")],
    url: UrlOpt = None,
    model: Annotated[Optional[str], typer.Option(help="served model name (default: the service's)")] = None,
    modality: Annotated[
        Optional[str], typer.Option(help="only these modalities, separated by commas (e.g. CR,DX); default: any")
    ] = None,
    store: Annotated[bool, typer.Option(help="store the result objects back into the source's study")] = True,
    feed: Annotated[
        str, typer.Option(help="auto (Orthanc's change feed when the PACS is an Orthanc), orthanc, or qido (a poll)")
    ] = "auto",
    interval: Annotated[float, typer.Option(help="seconds between two looks at the PACS when nothing is new")] = 5.0,
    redis_url: Annotated[
        Optional[str],
        typer.Option(
            help="the service's Redis, where the watcher keeps its state (AEX_REDIS_URL; default when the service "
            "is the `aex serve` running as this user: its embedded Redis)"
        ),
    ] = None,
    token: Annotated[
        Optional[str], typer.Option(help="access token (default: AEX_TOKEN, else the token file)", show_default=False)
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each HTTP request to the service")] = 60.0,
) -> None:
    """Follow new stable studies of a PACS and submit an explain job for each matching
    instance, once (state in Redis: it resumes where it stopped). Ctrl-C stops it cleanly.
    Without --url or AEX_URL it uses the `aex serve` running as this user: its API and, unless
    --redis-url or AEX_REDIS_URL says otherwise, its embedded Redis (``aex.address``)."""
    import logging
    import signal
    import threading

    from aex.address import find_service
    from aex.client import AexClient
    from aex.watcher import Watcher, WatchState
    from jobs.queues import connect
    from jobs.settings import Settings
    from models.errors import BadParameterError
    from pacs.read import endpoint

    if feed not in ("auto", "orthanc", "qido"):
        raise BadParameterError(f"--feed takes auto, orthanc or qido, not {feed!r}")
    settings = Settings(**({"redis_url": redis_url} if redis_url else {}))
    where = find_service(url, settings)
    url = where.url
    if not settings.redis_url and where.running is not None and where.running.redis_url:
        settings = settings.model_copy(update={"redis_url": where.running.redis_url})
    if not settings.redis_url:
        raise BadParameterError(
            "aex watch keeps its state in the service's Redis: set AEX_REDIS_URL or --redis-url (the `aex serve` "
            "running as this user with its embedded Redis needs neither)"
        )
    endpoint(settings.pacs, pacs)  # unknown_pacs before anything is contacted
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modalities = frozenset(m.strip().upper() for m in (modality or "").split(",") if m.strip())
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    conn = connect(settings.redis_url)
    try:
        with AexClient(url, timeout=timeout, token=token) as client:
            served = [m.get("name") for m in client.models().get("models", [])]  # the token works
            if model and model not in served:
                raise BadParameterError(f"the service does not serve a model {model!r} (it serves {', '.join(served)})")
            fields = explain_fields(client)
            by_reference = takes_references(fields)
            watcher = Watcher(
                settings,
                pacs,
                WatchState(conn, pacs, model),
                make_submit(client, settings, model, fields, store),
                modalities=modalities,
                interval=interval,
                feed=feed,
                collect=make_collect(client) if store and not by_reference else None,
                stop=stop,
            )
            mode = "by reference" if by_reference else "by upload"
            typer.echo(f"watching PACS {pacs!r} ({watcher.feed} feed, submitting {mode}); Ctrl-C stops", err=True)
            watcher.run()
            typer.echo(f"stopped after submitting {len(watcher.submitted)} jobs", err=True)
    finally:
        conn.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
