"""Event loops that finish their reads before closing, for Orbax's synchronous calls.

Orbax runs each synchronous save or restore on a new asyncio loop
(``asyncio_utils.run_sync``), reading and writing arrays as TensorStore futures
gathered with ``asyncio.gather``. When one of them fails (a damaged data file), the
gather raises at once, and Orbax closes its loop while the others are still running
in TensorStore's threads; as each finishes, TensorStore wakes the closed loop, which
raises ``RuntimeError: Event loop is closed`` in that thread, printed as "Exception
ignored in: None" after nnx_peft has already raised its ``CorruptCheckpointError``.
Nothing is lost, but the noise is misleading, and a test run treating such warnings as
errors fails in whatever test runs next.

:func:`finishing_pending_tasks` makes the loops created meanwhile run their pending
tasks to completion when closed, as ``asyncio.run`` does, through asyncio's public
event loop policy. A caller with its own running loop (a notebook) gets Orbax's other
path, which this does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator

#: Event loop policies are deprecated from Python 3.14 on; there nothing is changed.
_POLICIES = sys.version_info < (3, 14)


class _FinishingLoop(asyncio.SelectorEventLoop):
    """A selector loop whose ``close`` first runs its pending tasks to completion."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [task for task in asyncio.all_tasks(self) if not task.done()]
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _FinishingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _FinishingLoop()


class _Installed:
    """How many callers are inside :func:`finishing_pending_tasks`, and the policy before."""

    lock = threading.Lock()
    depth = 0
    previous: asyncio.AbstractEventLoopPolicy | None = None


@contextlib.contextmanager
def finishing_pending_tasks() -> Iterator[None]:
    """Inside, new event loops run their pending tasks before closing (see the module).

    Re-entrant and thread-safe: the first entry installs the policy, the last
    exit puts the previous one back.
    """
    if not _POLICIES:
        yield
        return
    with _Installed.lock:
        if _Installed.depth == 0:
            _Installed.previous = asyncio.get_event_loop_policy()
            asyncio.set_event_loop_policy(_FinishingPolicy())
        _Installed.depth += 1
    try:
        yield
    finally:
        with _Installed.lock:
            _Installed.depth -= 1
            if _Installed.depth == 0:
                asyncio.set_event_loop_policy(_Installed.previous)
                _Installed.previous = None
