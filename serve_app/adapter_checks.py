"""The ingress's checks of adapters added at run time (serve_app/ingress.py `reconfigure`):
each in a thread, bounded in time, on threads of their own.

A check reads an adapter's files; nothing can stop a read that never returns (a stuck network
mount). So a check past its time is given up, not stopped: its thread stays blocked, and the
same directory is not checked again while that thread runs (each later user_config would
otherwise block one more), and the checks never take the event loop's default threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

THREADS = 4  # checks at once; a stuck one holds its thread until its read returns


class CheckTimedOut(RuntimeError):
    """The check did not finish in its time (its thread goes on)."""


class CheckStillRunning(RuntimeError):
    """A check of this directory given up earlier has not returned yet."""


class AdapterChecks:
    def __init__(self, threads: int = THREADS):
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "adapter-check")
        self._late: dict[str, concurrent.futures.Future] = {}  # directory -> its given-up check

    async def run(self, directory: str, check: Callable[[], T], timeout_s: float) -> T:
        """check() in a thread: its result or exception, CheckTimedOut after `timeout_s`, or
        CheckStillRunning while an earlier check of `directory` that timed out still runs."""
        late = self._late.get(directory)
        if late is not None:
            if not late.done():
                raise CheckStillRunning(
                    "an earlier check of it, given up after its timeout, is still reading it; "
                    "deploy the user_config again once that read has returned"
                )
            del self._late[directory]
        running = self._pool.submit(check)
        waiter = asyncio.wrap_future(running)
        # Its outcome is always read, also once given up: an exception never retrieved is
        # logged with its traceback when the future is collected.
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            done, _ = await asyncio.wait([waiter], timeout=timeout_s)
        except asyncio.CancelledError:
            self._give_up(directory, running)
            raise
        if not done:
            if not self._give_up(directory, running):
                raise CheckTimedOut(
                    f"not checked within check_timeout_s={timeout_s:g} s: never started, "
                    f"every one of the {self.threads} check threads is held by a "
                    "read that has not returned (a stuck mount?)"
                )
            raise CheckTimedOut(
                f"not checked within check_timeout_s={timeout_s:g} s (its files still being "
                "read: a slow or stuck mount?)"
            )
        return waiter.result()

    def _give_up(self, directory: str, running: concurrent.futures.Future) -> bool:
        """Whether `running` had started: if so it is left to finish (nothing can cancel a
        thread) and its directory waits for it; if not it is cancelled."""
        if running.cancel():
            return False
        self._late[directory] = running
        return True
