"""The job chain that runs background saves and drains one at a time, in order."""

from __future__ import annotations

import threading

import pytest

from unickpt.engine.jobs import JobChain


def _threads(name: str) -> int:
    return sum(t.name == name for t in threading.enumerate())


def test_a_backlog_is_a_queue_on_one_thread_run_in_order() -> None:
    """Drains slower than saves queue up: one worker, not a thread per job (a long run had
    1,694 threads)."""
    chain, release, done = JobChain("test-backlog"), threading.Event(), []
    chain.submit(release.wait)
    for index in range(300):
        chain.submit(lambda index=index: done.append(index))  # type: ignore[misc]
    assert _threads("test-backlog") == 1
    release.set()
    chain.wait()
    assert done == list(range(300))


def test_wait_covers_the_jobs_submitted_before_it_and_a_raising_job_stops_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain, done = JobChain("test-raising"), []

    def broken() -> None:
        raise RuntimeError("a bug in a job")

    chain.submit(broken)
    chain.submit(lambda: done.append("after"))
    chain.wait()
    assert done == ["after"]
    assert "a job of test-raising raised" in caplog.text
    chain.submit(lambda: done.append("again"))  # a new worker once the last one ended
    chain.wait()
    assert done == ["after", "again"]
