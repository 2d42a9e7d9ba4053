"""Job parameters (``jobs.params``): the canonical dicts and cache keys are those of the dict-building
functions they replaced, byte for byte; defaults are applied once, by the models; one StabilityMode."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from jobs.params import (
    ClassifyParameters,
    ExplainParameters,
    StabilityMode,
    classify_parameters,
    explain_parameters,
    result_cache_key,
)
from jobs.settings import Settings
from models.defaults import ARA_STEPS, STABILITY_MODE
from models.errors import BadParameterError
from models.perturb.minimal import RADIUS_MODES

A, B = "a" * 64, "b" * 64

# Computed with the former dict-building jobs/params.py (commit 6a1c10d): results are
# reused by these keys, so they must not change.
KEYS = {
    "classify plain": "e5cf37916abb86d3674558f3e256cdc52027f64aee64e6160b84823b1ffc5a6f",
    "classify stability exact": "5581e5464e8202cee0478c5cb7d3c4deaac2dd364eef7b3b2a017e247f78d57f",
    "explain window": "d06a978005dd6044bdffac130135834dd632a16c77a58e0033e8ed9d75780f85",
}


def test_the_canonical_dicts_and_keys_are_the_former_ones():
    plain = classify_parameters(5, False, 0)
    assert plain == {"top_k": 5, "stability": False, "stability_steps": None, "stability_mode": None, "window": None}
    exact = classify_parameters(3, True, 450, stability_mode="exact")
    assert json.dumps(exact) == (
        '{"top_k": 3, "stability": true, "stability_steps": 450, "stability_mode": "exact", "window": null}'
    )
    windowed = explain_parameters(["predicted,runner-up", 3], 0.1, 35, "pipe.5", 450, 1800, 3600)
    assert json.dumps(windowed) == (
        '{"targets": ["predicted", "runner-up", "3"], "rho": 0.1, "steps": 35, "layer": "pipe.5", '
        '"stability_steps": 450, "stability_mode": "fast", "window": [1800.0, 3600.0]}'
    )
    assert result_cache_key("classify", "tiny-grey", A, B, plain, "0.1.0") == KEYS["classify plain"]
    assert result_cache_key("classify", "tiny-grey", A, B, exact, "0.1.0") == KEYS["classify stability exact"]
    assert result_cache_key("explain", "tiny-grey", A, B, windowed, "0.1.0") == KEYS["explain window"]
    # The model and its kwargs() key alike.
    model = ExplainParameters.build(
        targets=["predicted", "runner-up", 3], rho=0.1, steps=35, layer="pipe.5", window=[1800, 3600]
    )
    assert model.kwargs() == windowed
    assert result_cache_key("explain", "tiny-grey", A, B, model, "0.1.0") == KEYS["explain window"]


def test_a_job_read_back_from_its_kwargs_has_the_same_parameters():
    """The worker reads the rq job's kwargs (which also name the model and the result TTL)."""
    kwargs = explain_parameters(["predicted"], 0.2, 7, "pipe.5", 12, stability_mode="exact")
    again = ExplainParameters.from_kwargs({"model": "tiny-grey", "result_ttl": 60, **kwargs})
    assert again.kwargs() == kwargs and again.stability_mode is StabilityMode.EXACT
    kwargs = classify_parameters(4, True, 9)
    assert ClassifyParameters.from_kwargs({"model": "tiny-grey", **kwargs}).kwargs() == kwargs


def test_defaults_are_applied_by_the_model_once():
    # A job queued without them (an older API) gets the same defaults as a new request.
    queued = ClassifyParameters.from_kwargs({"model": "m", "top_k": 2, "stability": True})
    assert (queued.stability_steps, queued.stability_mode) == (ARA_STEPS, StabilityMode(STABILITY_MODE))
    # Without stability, no stability settings, whatever was sent.
    plain = ClassifyParameters.build(stability=False, stability_steps=30, stability_mode="exact")
    assert (plain.top_k, plain.stability_steps, plain.stability_mode) == (5, None, None)
    explain = ExplainParameters.from_kwargs({"targets": "predicted", "rho": 0.1, "steps": 3, "stability_mode": None})
    assert (explain.stability_steps, explain.stability_mode, explain.layer) == (ARA_STEPS, StabilityMode.FAST, None)
    assert explain.targets == ["predicted"]


def test_parameters_are_frozen_and_refuse_unknown_fields():
    params = ClassifyParameters.build(top_k=3)
    with pytest.raises(ValidationError):
        params.top_k = 4
    with pytest.raises(BadParameterError, match="colour: Extra inputs"):
        ClassifyParameters.build(top_k=3, colour="red")


@pytest.mark.parametrize("mode", ["quick", "FAST", ""])
def test_an_unknown_stability_mode_is_a_bad_parameter(mode):
    with pytest.raises(BadParameterError, match="stability_mode must be one of fast, exact"):
        classify_parameters(5, True, 3, stability_mode=mode or "none")
    with pytest.raises(BadParameterError, match="stability_mode must be one of fast, exact"):
        explain_parameters(["predicted"], 0.1, 3, None, 3, stability_mode=mode or "none")


def test_one_stability_mode_enum_for_the_wire_the_settings_and_the_core():
    assert [m.value for m in StabilityMode] == ["fast", "exact"]
    assert json.dumps({"mode": StabilityMode.EXACT}) == '{"mode": "exact"}' and f"{StabilityMode.FAST}" == "fast"
    assert StabilityMode(STABILITY_MODE) in StabilityMode
    # The science core takes the same values (models/ cannot import jobs/).
    assert tuple(m.value for m in StabilityMode) == RADIUS_MODES
    setting = Settings.model_fields["stability_mode"]
    assert StabilityMode(setting.default) is StabilityMode.FAST
    # AEX_STABILITY_MODE accepts exactly the enum's values.
    allowed = setting.annotation.__args__ if hasattr(setting.annotation, "__args__") else tuple(StabilityMode)
    assert {str(v) for v in allowed} == {m.value for m in StabilityMode}
