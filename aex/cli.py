"""The ``aex`` command line: one typer app; the commands live in ``aex.commands``.

Commands stay thin: they parse options, call into ``models/`` (or ``worker/``,
``service/``) and print results. Heavy imports (torch) happen inside the commands so
``aex --help`` stays fast. To add a command, write one function in ``aex.commands`` and
register it below. Errors from ``models.errors`` become a one-line message on stderr and
exit status 2.
"""

from __future__ import annotations

import sys

import typer

from aex.commands import admin, checkpoint, explain, science, service, train, watch

app = typer.Typer(
    name="aex",
    help="Adversarial explanations, Grad-CAM and robustness (ARA) for image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("import-reference")(science.import_reference_cmd)
app.command()(science.evaluate)
app.command()(explain.explain)
app.command()(service.classify)
app.command()(train.train)
app.add_typer(checkpoint.checkpoint_app)
app.command()(service.serve)
app.command("worker")(service.worker_cmd)
app.add_typer(admin.keys_app)
app.command()(admin.audit)
app.command("data-key")(admin.data_key)
app.command()(watch.watch)


def main() -> None:  # pragma: no cover - entry point for `python -m aex.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
