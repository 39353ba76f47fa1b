"""How long featurize and fine-tuning will take: one line from the speed of the first batches,
then the time left as the work goes on.

    featurize: 2,400 images ≈ 1 min 13 s at 33.1 img/s on CPU (mixed_bfloat16)
    finetune: 50 epochs × 2,000 images ≈ 2 h 40 min at 12.4 img/s on CPU (float32)

The first batch is not timed (it builds the graph); the speed is measured over the batches after
it, for at least `MIN_SECONDS` or `MIN_BATCHES` batches, whichever is later.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import keras

log = logging.getLogger(__name__)

MIN_BATCHES = 3
MIN_SECONDS = 2.0


def duration(seconds: float) -> str:
    """'2 h 40 min', '12 min 5 s', '45 s', '0.4 s': two units at most, rounded."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if round(seconds) < 3600:
        minutes, secs = divmod(round(seconds), 60)
        return f"{minutes} min {secs} s" if minutes else f"{secs} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min"


def eta_line(stage: str, work: str, seconds: float, speed: float, *, device: str, policy: str) -> str:
    return f"{stage}: {work} ≈ {duration(seconds)} at {speed:.1f} img/s on {device} ({policy})"


class Pace:
    """Counts images as batches finish; once the speed is known, logs the ETA line for `images`
    images in all (`work` says what they are: "2,400 images", "50 epochs × 2,000 images")."""

    def __init__(
        self,
        stage: str,
        work: str,
        images: int,
        device: str,
        policy: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._line = functools.partial(eta_line, stage, work, device=device, policy=policy)
        self._total = images
        self._clock = clock
        self._since: float | None = None  # the end of the first, untimed batch
        self._images = 0
        self._batches = 0
        self.speed: float | None = None  # images/s, once measured

    def batch_done(self, images: int) -> None:
        now = self._clock()
        if self._since is None:
            self._since = now
            return
        if self.speed is not None:
            return
        self._images += images
        self._batches += 1
        elapsed = now - self._since
        if self._batches >= MIN_BATCHES and elapsed >= MIN_SECONDS:
            self.speed = self._images / elapsed
            log.info("%s", self._line(self._total / self.speed, self.speed))


class TimeLeft(keras.callbacks.Callback):
    """During `fit`: the ETA line after the first batches, then after each epoch the time left."""

    def __init__(self, stage: str, epochs: int, images: int, batch_size: int, device: str, policy: str) -> None:
        super().__init__()
        self.epochs, self.images, self.batch_size = epochs, images, batch_size
        work = f"{epochs} epoch{'s' if epochs != 1 else ''} × {images:,} images"
        self.pace = Pace(stage, work, epochs * images, device, policy)
        self._started = 0.0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # The last batch of an epoch may be short; the speed is measured well before it.
        self.pace.batch_done(min(self.batch_size, self.images - batch * self.batch_size))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        done = epoch + 1
        elapsed = time.perf_counter() - self._started
        left = elapsed / done * (self.epochs - done)
        log.info("epoch %d/%d done after %s; about %s left", done, self.epochs, duration(elapsed), duration(left))
