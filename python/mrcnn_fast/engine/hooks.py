"""Training hooks: callables `hook(trainer, completed_iterations)` run after each iteration (see Trainer)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Callable


class TimeBudget:
    """Sets the trainer's max_iter so that training ends by `deadline` (a time.perf_counter() value).

    The speed is first measured over iterations skip..calibrate (the first iterations pay one-off costs), then
    re-measured every `recheck` iterations over the latest window only: an iteration gets slower as the RPN
    learns (more positive RoIs reach the mask and keypoint heads), so an early estimate alone overshoots.
    Steps of a step schedule that are still ahead move to the same fractions of the new length (step_fractions;
    default: the fractions of the trainer's schedule when the hook first changes it); steps already passed stay
    where they were. Changed during warm-up, the schedule is as if the run had started with the new length.
    Training stops at once if the deadline has passed (never below `min_iter`). max_iter caps the length
    (default: the trainer's max_iter when the hook first runs).
    """

    def __init__(self, deadline: float, *, calibrate: int = 40, skip: int = 5, recheck: int = 25,
                 min_iter: int = 100, max_iter: int | None = None, safety: float = 0.95,
                 step_fractions: Sequence[float] | None = None, log: Callable[[str], None] | None = None):
        if not 0 <= skip < calibrate or recheck <= 0 or not 0 < safety <= 1:
            raise ValueError(f"TimeBudget needs 0 <= skip < calibrate, recheck > 0, 0 < safety <= 1; got "
                             f"skip={skip} calibrate={calibrate} recheck={recheck} safety={safety}")
        if max_iter is not None and max_iter <= 0:
            raise ValueError(f"TimeBudget max_iter must be positive, got {max_iter}")
        self.deadline, self.calibrate, self.skip, self.recheck = deadline, calibrate, skip, recheck
        self.min_iter, self.cap, self.safety, self.log = min_iter, max_iter, safety, log
        self.step_fractions = None if step_fractions is None else tuple(float(f) for f in step_fractions)
        self.mark: tuple[int, float] | None = None   # (iteration, time) the current speed window starts at
        self.chosen: int | None = None
        self.rate: float | None = None              # iterations per second over the latest window

    def _fit_schedule(self, trainer) -> None:
        if self.cap is None:
            self.cap = int(trainer.max_iter)
        if self.step_fractions is None:
            s = trainer.cfg.solver
            self.step_fractions = tuple(x / trainer.max_iter for x in s.steps) if s.schedule == "step" else ()

    def __call__(self, trainer, done: int) -> None:
        now = time.perf_counter()
        if done == self.skip:
            self.mark = (done, now)
            self._fit_schedule(trainer)
            return
        if self.mark is None or done < self.calibrate or (done - self.calibrate) % self.recheck:
            return
        start, t_start = self.mark
        rate = (done - start) / max(now - t_start, 1e-6)
        self.mark, self.rate = (done, now), rate
        n = done + int(rate * max(self.deadline - now, 0.0) * self.safety)
        n = max(min(self.min_iter, self.cap), done, min(self.cap, n))
        first = self.chosen is None
        self.chosen = n
        if n == trainer.max_iter:
            return
        steps = None
        if trainer.cfg.solver.schedule == "step":
            old = list(trainer.cfg.solver.steps)
            new = [max(round(n * f), done + 1) for f in self.step_fractions]
            steps = [o if o <= done else min(nw, n) for o, nw in zip(old, new)] if len(old) == len(new) else new
        trainer.set_max_iter(n, steps=steps)
        if self.log is not None and (first or (done - self.calibrate) % (4 * self.recheck) == 0):
            self.log(f"{rate:.2f} it/s: training for {n} iterations to fit the time budget")
