"""Console output a person reads: the training progress line (rate, data wait, ETA) and the filter that
keeps Ray's known harmless messages off the console without hiding anything else."""

from __future__ import annotations

import pytest

from cellfm.runtime import KNOWN_RAY_NOISE, WithoutKnownRayNoise, quiet_known_ray_noise
from cellfm.progress import eta_seconds, format_duration
from cellfm.train.progress import TrainingProgress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_measures_rate_and_eta_from_the_clock():
    clock = Clock()
    progress = TrainingProgress(total_steps=120, images_per_step=64, clock=clock)
    clock.now += 20.0  # 10 steps in 20 s: 32 images/s, 110 steps left at 2 s each
    line = progress.line(epoch=0, epochs=12, step=10, loss=4.12345, data_wait_fraction=0.25, lr=1.6e-3)
    assert line == "epoch 1/12 step 10/120 loss 4.1235 | 32.0 images/s, data wait 25% | lr 1.60e-03 | ETA 3m40s"
    clock.now += 5.0  # 10 more steps in 5 s: 128 images/s now; ETA from the whole run: 100 steps at 1.25 s
    line = progress.line(epoch=1, epochs=12, step=20, loss=3.0, data_wait_fraction=0.0)
    assert line == "epoch 2/12 step 20/120 loss 3.0000 | 128.0 images/s, data wait 0% | ETA 2m05s"
    assert progress.eta_s(120) == 0.0


def test_a_resumed_run_counts_only_its_own_steps():
    clock = Clock()
    progress = TrainingProgress(total_steps=100, images_per_step=8, first_step=60, clock=clock)
    clock.now += 10.0
    assert progress.eta_s(70) == pytest.approx(30.0)  # 10 steps in 10 s, 30 left
    assert "images/s" in progress.line(epoch=5, epochs=10, step=70, loss=1.0, data_wait_fraction=0.1,
                                       images_per_s=12.5)
    assert TrainingProgress(10, 1, first_step=3, clock=clock).eta_s(3) == float("inf")


def test_eta_from_the_average_rate():
    assert eta_seconds(done=5, total=20, elapsed_s=10.0) == 30.0
    assert eta_seconds(20, 20, 10.0) == 0.0 and eta_seconds(0, 20, 10.0) == float("inf")


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (185, "3m05s"), (3600, "1h00m"),
                                           (7620, "2h07m"), (float("inf"), "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def _forwarded(lines: list[str]) -> dict:
    return {"lines": lines, "is_err": True, "pid": 1234, "actor_name": "PlacementGroupCleaner"}


def test_known_ray_noise_is_dropped_and_everything_else_kept():
    printed: list[dict] = []
    handler = WithoutKnownRayNoise(printed.append)
    cleaner = ("2026-11-29 10:00:01,000\tWARNING placement_group_cleaner.py:85 -- Failed to query Ray Train "
               "Controller actor state. State API may be temporarily unavailable. Continuing to monitor.")
    restart = ("[2026-11-29 10:04:01,758 E 25669 25751] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
               "and ID: '43e9' has constructor arguments in the object store and max_restarts > 0. If the arguments "
               "in the object store go out of scope or are lost, the actor restart will fail.")
    report = ("(RayTrainWorker pid=30117) Reporting training result 3: TrainingReport(checkpoint=None, "
              "metrics={'loss': 3.9}, validation=False) from rank 0")
    saved = "(RayTrainWorker pid=30117) Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/c)"
    real = "ValueError: the loss is nan at epoch 3 step 40"
    handler(_forwarded([cleaner, real, restart, report, saved]))
    handler(_forwarded([cleaner]))  # nothing left to print: the printer is not called at all
    assert printed == [_forwarded([real])]
    # a message that merely starts like a known one is not dropped
    near = "Failed to query Ray Train Controller actor state: permission denied"
    handler(_forwarded([near]))
    assert printed[-1]["lines"] == [near]
    assert len(KNOWN_RAY_NOISE) == 4


def test_the_filter_wraps_the_drivers_printer_once():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[dict] = []
    dispatcher.add_handler("ray_print_logs", printed.append)
    try:
        quiet_known_ray_noise()
        quiet_known_ray_noise()
        [(name, handler)] = [h for h in dispatcher.handlers if h[0] == "ray_print_logs"]
        assert isinstance(handler, WithoutKnownRayNoise) and handler.handler == printed.append
        dispatcher.emit(_forwarded([KNOWN_RAY_NOISE[0], "kept"]))
        assert printed == [_forwarded(["kept"])]
    finally:
        dispatcher.remove_handler("ray_print_logs")
