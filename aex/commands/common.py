"""What every command shares: project errors as one line and exit status 2, JSON on stdout, the
options a user typed, and progress bars on stderr."""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated, Optional

import typer

from models.errors import AexError

# --url of every command that talks to a service; None is resolved by aex.address.
UrlOpt = Annotated[
    Optional[str],
    typer.Option(
        help="the aex service (default: AEX_URL, else the `aex serve` running as this user, from service.json "
        "beside the token file, else http://AEX_HOST:AEX_PORT)",
        show_default=False,
    ),
]


def friendly_errors(fn):
    """Report project errors as ``error [code]: message`` instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AexError as exc:
            typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False))


def typed(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed (typer vendors click, so compare by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def typed_command(ctx: typer.Context) -> str:
    """The options typed on the command line, as one shell line (``aex train ...``)."""
    import shlex

    parts = ["aex", ctx.info_name or "train"]
    for param in ctx.command.params:
        if not typed(ctx, param.name):
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            parts.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
        elif isinstance(value, (list, tuple)):
            for v in value:
                parts += [param.opts[0], str(v)]
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


class PhaseProgress:
    """progress(done, total, phase) as a tqdm bar on stderr (offline explanations)."""

    def __init__(self, enabled: bool, what: str):
        from tqdm import tqdm

        self.what = what
        self.bar = tqdm(total=None, desc=what, unit="step", file=sys.stderr, disable=not enabled, leave=True)

    def __call__(self, done: int, total: int, phase: str) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.set_description(f"{self.what}: {phase}", refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class JobProgress:
    """on_progress for AexClient: a tqdm bar on stderr over the job's search steps (its
    queue position while it waits)."""

    def __init__(self, enabled: bool, what: str):
        self.what, self.enabled, self.bar = what, enabled, None

    def __call__(self, view: dict) -> None:
        if self.bar is None:  # created at the first answer: nothing is drawn when the upload fails
            from tqdm import tqdm

            self.bar = tqdm(
                total=None,
                desc=self.what,
                unit="step",
                file=sys.stderr,
                disable=not self.enabled,
                dynamic_ncols=True,
                leave=True,
            )
        status, prog = view.get("status"), view.get("progress") or {}
        if status == "queued":
            pos = view.get("queue_position")
            self.bar.set_description(f"{self.what}: queued" + (f" (position {pos})" if pos is not None else ""))
        elif prog.get("total"):
            if self.bar.total != prog["total"]:
                self.bar.reset(total=prog["total"])
            self.bar.set_description(f"{self.what}: {prog.get('phase') or status}")
            self.bar.n = prog["done"]
            self.bar.refresh()
        if status == "finished":
            if not self.bar.total:
                self.bar.reset(total=1)
            self.bar.n = self.bar.total
            self.bar.set_description(f"{self.what}: finished")
        elif status in ("failed", "cancelled"):
            self.bar.set_description(f"{self.what}: {status}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
