"""``aex evaluate --stability``: the fast stability search's radii on the evaluation subset, its
agreement with the exact radii recorded for the same subset, and ``--record``."""

import json

import pytest
import torch
from typer.testing import CliRunner

from aex.cli import app
from models.perturb.stability import FAST_RADII, stability_report
from models.store.checkpoint import load_checkpoint, read_metadata
from tests.aex.commands.test_science import folder, tiny_checkpoint  # noqa: F401 - fixtures

runner = CliRunner()


def evaluate(ckpt, data, *flags):
    res = runner.invoke(
        app, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--seed", "3", "--no-progress", *flags]
    )
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_fast_radii_are_compared_with_the_exact_ones_and_recorded(tiny_checkpoint, folder):  # noqa: F811
    ckpt, model = tiny_checkpoint
    evaluate(ckpt, folder, "--n", "8", "--ara", "--record")
    out = evaluate(ckpt, folder, "--n", "8", "--stability", "--record")
    assert out["stability"]["recorded"] and out["stability"]["settings"]["mode"] == "fast"
    metrics = read_metadata(ckpt).metrics
    exact, fast = metrics["ara_radii"], metrics[FAST_RADII]
    assert fast["n"] == exact["n"] == 8 and fast["seed"] == exact["seed"] == 3 and fast["data"] == exact["data"]
    for name in ("attack", "btr"):
        figures = out["stability"]["agreement"][name]
        assert figures == fast["agreement"][name]
        e, f = torch.tensor(exact[name]), torch.tensor(fast[name])
        assert figures["compared"] == int((e > 0).sum()) and figures["zeros_coincide"] == bool(
            torch.equal(e == 0, f == 0)
        )
        if figures["compared"]:
            rel = (f[e > 0] / e[e > 0] - 1).abs()
            assert figures["max_rel_err"] == pytest.approx(float(rel.max()), abs=1e-4)
    load_checkpoint(ckpt)  # weights untouched
    # A fast score now ranks against the fast radii, like against like.
    report = stability_report(model, torch.rand(3, 32, 32), ["cat", "dog"], metrics, steps=450, mode="fast")
    assert report["comparable"] is True and report["reference"]["settings"]["mode"] == "fast"
    assert report["reference_n"] == 8 and report["attack_percentile"] is not None
    exact_report = stability_report(model, torch.rand(3, 32, 32), ["cat", "dog"], metrics, steps=450, mode="exact")
    assert exact_report["comparable"] is True and "mode" not in exact_report["reference"]["settings"]


def test_without_exact_radii_of_the_subset_it_says_so(tiny_checkpoint, folder):  # noqa: F811
    ckpt, _ = tiny_checkpoint
    out = evaluate(ckpt, folder, "--n", "4", "--stability")
    assert "records no exact radii" in out["stability"]["agreement"]
    assert FAST_RADII not in read_metadata(ckpt).metrics  # not asked to record
