"""An explanation's stability searches beside its other phases (models/explain/beside.py, through models.explain.pipeline.explain_images): the very numbers of the phases one after the other (with the searches on the inference copy and, past its rows, on the model Grad-CAM hooks at the same time), one progress bar whose total never moves, a failure of either phase raised once both have stopped, and where it applies."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from models.defaults import DEFAULT_TARGETS
from models.errors import JobCancelledError
from models.explain.beside import side_by_side
from models.explain.pipeline import explain_images
from models.nn.layout import SMALL_BATCH


def explained(model, images, beside, progress=None, steps=30):
    """explain_images of ``images`` with an exact stability search of ``steps``."""
    return explain_images(
        model, None, images, [DEFAULT_TARGETS] * images.shape[0], stability_steps=steps, rho=0.5, steps=8,
        beside=beside, progress=progress, faithfulness_steps=4,
    )  # fmt: skip


class Reports:
    """A progress callback counting the reports made from the stability searches' thread."""

    def __init__(self, then=None):
        self.then = then
        self.searches = 0

    def __call__(self, done: int, total: int, phase: str) -> None:
        if threading.current_thread().name == "aex-stability":
            self.searches += 1
        if self.then is not None:
            self.then(done, total, phase)

    def stopped(self) -> bool:
        """Whether the searches make no more reports (they report every step: a tiny model's
        steps take about a millisecond)."""
        before = self.searches
        time.sleep(0.5)
        return self.searches == before


@pytest.mark.parametrize("count", [2, SMALL_BATCH // 2 + 1])  # 2 searches an image: the copy's rows, then the model's
def test_side_by_side_gives_the_numbers_of_one_phase_after_the_other(tiny_hh_model, images, count):
    x = torch.cat([images] * 2)[:count]
    after, beside = explained(tiny_hh_model, x, False), explained(tiny_hh_model, x, True, progress=Reports())
    for a, b in zip(after, beside, strict=True):
        assert json.dumps(a.summary, sort_keys=True) == json.dumps(b.summary, sort_keys=True)
        assert "stability" in b.summary and b.summary["stability"]["settings"]["mode"] == "exact"
        assert torch.equal(a.gradcam, b.gradcam)
        for name, pictures in a.pictures().items():
            assert (pictures == b.pictures()[name]).all(), name


def test_one_bar_over_both_phases_whose_total_never_moves(tiny_hh_model, images):
    seen: list[tuple[int, int, str]] = []
    explained(tiny_hh_model, images[:2], True, progress=lambda done, total, phase: seen.append((done, total, phase)))
    (total,) = {total for _, total, _ in seen}
    assert seen[-1] == (total, total, "stability")
    dones = [done for done, _, _ in seen]
    assert dones == sorted(dones)
    phases = [phase for _, _, phase in seen]
    assert phases == sorted(phases, key=["search", "stability"].index)  # search, then stability, never back


@pytest.mark.parametrize("failing", ["aex-stability", "MainThread"])
def test_a_failure_of_either_phase_stops_both_and_is_raised(tiny_hh_model, images, failing):
    calls = {"n": 0}

    def progress(done: int, total: int, phase: str) -> None:
        if threading.current_thread().name == failing:
            calls["n"] += 1
            if calls["n"] == 3:
                raise JobCancelledError("cancelled while searching")

    reports = Reports(progress)
    with pytest.raises(JobCancelledError, match="cancelled while searching"):
        explained(tiny_hh_model, images[:2], True, progress=reports, steps=200_000)
    assert reports.stopped()  # no search outlives the call


def test_a_time_limit_s_signal_while_waiting_for_the_searches_stops_them(tiny_hh_model, images):
    # A worker's job time limit is a SIGALRM raised in its main thread, here while it waits
    # for the stability searches (its own phase is over within the first tenth of a second).
    def expire(_signum, _frame):
        raise TimeoutError("the job's time limit")

    def arm(done: int, total: int, phase: str) -> None:
        if phase == "stability" and not armed:
            armed.append(threading.current_thread().name)
            signal.setitimer(signal.ITIMER_REAL, 0.5)  # the search is over: its Grad-CAM and faithfulness take ms

    armed: list[str] = []
    reports = Reports(arm)
    # pytest-timeout's own timer and handler (the same signal), given back afterwards.
    before, timer = signal.signal(signal.SIGALRM, expire), signal.getitimer(signal.ITIMER_REAL)
    try:
        with pytest.raises(TimeoutError, match="time limit"):
            explained(tiny_hh_model, images[:2], True, progress=reports, steps=200_000)
    finally:
        signal.signal(signal.SIGALRM, before)
        signal.setitimer(signal.ITIMER_REAL, *timer)
    assert armed and reports.stopped()


def test_it_applies_on_a_cpu_with_cores_beyond_torch_s_threads():
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not side_by_side(torch.device("cpu"))
        torch.set_num_threads(1)
        assert side_by_side(torch.device("cpu")) == (cores >= 2)
        assert not side_by_side(torch.device("cuda"))
    finally:
        torch.set_num_threads(before)
