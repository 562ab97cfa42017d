"""riding out storage outages: an error of the connection (refused, reset, timed out, a 5xx) is retried with backoff
for a bounded time, so a blip of the object store costs a long run a pause, not its progress since the last
checkpoint; an error the storage would give again (a missing object, access refused) is not retried"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

# how long one outage is waited out before its error stands (the environment sets it for every process of a job)
PATIENCE_S = float(os.environ.get("CONTROLNET_STORAGE_PATIENCE_S", "120"))
FIRST_WAIT_S, LONGEST_WAIT_S = 1.0, 15.0
_ANSWERS_FOR_GOOD = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

T = TypeVar("T")


class StorageOutage(OSError):
    """The storage stayed unreachable for the whole patience."""


def is_transient(error: BaseException) -> bool:
    """Whether the storage may answer differently if asked again. OSErrors are (ConnectionError, TimeoutError,
    aiohttp's connection errors, what s3fs makes of a 5xx) but for the answers a retry would only repeat; botocore's
    connection errors are not OSErrors, and are named for what they are (EndpointConnectionError, ReadTimeoutError,
    ConnectionClosedError)."""
    if isinstance(error, (*_ANSWERS_FOR_GOOD, StorageOutage)):
        return False
    if isinstance(error, OSError):
        return True
    return any("Connection" in cls.__name__ or "Timeout" in cls.__name__ for cls in type(error).__mro__)


def wait_before_try(tries: int) -> float:
    """Seconds to wait before retry number `tries` (1, 2, ...): doubling from FIRST_WAIT_S, at most LONGEST_WAIT_S."""
    return min(FIRST_WAIT_S * 2 ** (tries - 1), LONGEST_WAIT_S)


class Outage:
    """One outage, waited out: `wait(error)` sleeps before the next try, and raises StorageOutage (from the error)
    once `patience_s` have passed since the outage's first error; `over()` after a success starts the count again."""

    def __init__(self, what: str, patience_s: float | None = None, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.what, self.clock, self.sleep = what, clock or time.monotonic, sleep or time.sleep
        self.patience_s = PATIENCE_S if patience_s is None else patience_s
        self.began: float | None = None
        self.tries = 0

    def wait(self, error: BaseException) -> None:
        now = self.clock()
        if self.began is None:
            self.began = now
        waited = now - self.began
        if waited >= self.patience_s:
            raise StorageOutage(f"{self.what}: the storage failed for {waited:.0f} s; last error: "
                                f"{type(error).__name__}: {error}") from error
        self.tries += 1
        pause = min(wait_before_try(self.tries), max(self.patience_s - waited, 0.0))
        log.warning("%s: %s: %s; trying again in %.0f s", self.what, type(error).__name__, error, pause)
        self.sleep(pause)

    def over(self) -> None:
        self.began, self.tries = None, 0


def retried(call: Callable[[], T], what: str, patience_s: float | None = None) -> T:
    """call(), tried again while it fails with a transient storage error, for up to `patience_s`. `call` must be
    safe to repeat from its start."""
    outage = Outage(what, patience_s)
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            outage.wait(error)
