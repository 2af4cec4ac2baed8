"""server/finetune/jobs.py on SQLite and PostgreSQL: a queued job is claimed by exactly one replica, leases are
renewed by their owner only, and a lapsed lease puts the job back in the queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.finetune.jobs import Job, JobStore
from server.persistence.database import Database, open_database


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[JobStore]]:
    """Four replicas' job stores on one database."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    databases: list[Database] = [open_database(url, tmp_path) for _ in range(4)]
    yield [JobStore(db, tmp_path / "fine_tuning") for db in databases]
    for db in databases:
        db.close()


def queued(store: JobStore, n: int = 0) -> Job:
    job = Job(
        id=f"ftjob-lease{n:020d}",
        tenant="t",
        created_at=int(time.time()),
        model="base",
        kind="chat",
        base_path=Path("/nonexistent"),
        training_file="file-x",
        validation_file=None,
        hyperparameters={},
        suffix=None,
        seed=1,
        metadata={"note": "100% ok?"},
        status="queued",
    )
    return store.create(job)


def test_exactly_one_replica_claims_a_job(stores: list[JobStore]) -> None:
    jobs = [queued(stores[0], n) for n in range(5)]
    wins: dict[str, list[str]] = {job.id: [] for job in jobs}
    start = threading.Barrier(len(stores))

    def replica(i: int) -> None:
        start.wait()
        for job in jobs:
            if stores[i].claim(job.id, f"replica-{i}", 30):
                wins[job.id].append(f"replica-{i}")

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(owners) == 1 for owners in wins.values()), wins
    for job in jobs:
        got = stores[1].get(job.id)
        assert got is not None and got.status == "running" and got.lease_owner == wins[job.id][0]
        assert got.attempts == 1 and got.metadata == {"note": "100% ok?"}


def test_only_the_owner_renews_and_transitions(stores: list[JobStore]) -> None:
    a, b = stores[0], stores[1]
    job = queued(a)
    assert a.claim(job.id, "a", 30)
    assert not b.claim(job.id, "b", 30)
    assert a.renew(job.id, "a", 30) and not b.renew(job.id, "b", 30)
    assert not b.fail(job.id, "not mine", owner="b")
    assert not b.transition(job.id, ("running",), "succeeded", owner="b")
    assert a.transition(job.id, ("running",), "succeeded", owner="a")
    assert not a.renew(job.id, "a", 30)  # finished: nothing left to renew


def test_a_lapsed_lease_is_requeued_once_and_claimed_again(stores: list[JobStore]) -> None:
    a, b, c = stores[0], stores[1], stores[2]
    job = queued(a)
    assert a.claim(job.id, "a", 1)
    assert b.lapsed() == []
    time.sleep(3.2)  # the lease is whole seconds, rounded up, and lapses once passed
    lapsed = b.lapsed()
    assert [j.id for j in lapsed] == [job.id]
    # two replicas see the same lapse: one requeues it
    assert [b.requeue(lapsed[0]), c.requeue(c.lapsed()[0] if c.lapsed() else lapsed[0])].count(True) == 1
    assert not a.renew(job.id, "a", 30)  # the dead replica's lease is gone for good
    assert c.claim(job.id, "c", 30)
    again = a.get(job.id)
    assert again is not None and again.lease_owner == "c" and again.attempts == 2


def test_a_replica_shutting_down_gives_its_job_back(stores: list[JobStore]) -> None:
    a, b = stores[0], stores[1]
    job = queued(a)
    assert a.claim(job.id, "a", 30)
    assert not b.release(job.id, "b")
    assert a.release(job.id, "a")
    back = b.get(job.id)
    assert back is not None and back.status == "queued" and back.lease_owner is None
