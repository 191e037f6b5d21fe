"""Event loops created inside ``finishing_pending_tasks`` finish their tasks before closing."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from nnx_peft._event_loops import finishing_pending_tasks

pytestmark = pytest.mark.skipif(
    sys.version_info >= (3, 14), reason="event loop policies are deprecated from 3.14"
)


def _run_leaving_a_task_behind(finished: list[str]) -> None:
    """What Orbax's ``run_sync`` does when a gathered read fails: the loop is closed while
    a sibling task still waits (here on another thread, as TensorStore's reads do)."""

    async def sibling() -> None:
        await asyncio.get_running_loop().run_in_executor(None, threading.Event().wait, 0.2)
        finished.append("sibling")

    async def main() -> None:
        left = asyncio.ensure_future(sibling())
        await asyncio.sleep(0)
        assert not left.done()
        raise OSError("a read failed")

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(OSError, match="a read failed"):
            loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_closed_loop_has_finished_its_pending_tasks() -> None:
    finished: list[str] = []
    with finishing_pending_tasks():
        _run_leaving_a_task_behind(finished)
    assert finished == ["sibling"]


def test_the_previous_policy_is_back_after_nested_uses() -> None:
    before = asyncio.get_event_loop_policy()
    with finishing_pending_tasks():
        inside = asyncio.get_event_loop_policy()
        assert inside is not before
        with finishing_pending_tasks():
            assert asyncio.get_event_loop_policy() is inside
        assert asyncio.get_event_loop_policy() is inside
    assert asyncio.get_event_loop_policy() is before
