"""Heartbeats through a real TCPStore in this process (no process group): who a rank blames."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from megamod.parallel.liveness import Heartbeat, heartbeat_interval, nccl_environment


@pytest.fixture
def store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    yield server
    del server


def _ranks(store, world: int, timeout_s: float = 2.0) -> list[Heartbeat]:
    return [Heartbeat("127.0.0.1", store.port, r, world, timeout_s) for r in range(world)]


def test_interval_follows_the_timeout():
    assert heartbeat_interval(2.0) == 0.5 and heartbeat_interval(20.0) == 2.0 and heartbeat_interval(600.0) == 5.0
    assert nccl_environment(600)["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "630"


def test_diagnose_names_the_rank_whose_heartbeat_stopped(store):
    a, b, c = _ranks(store, 3)
    a.start(), b.start()
    c._beat()  # rank 2 beat once, then died: its counter never moves again
    c.progress = lambda: 7
    c._beat()
    try:
        message = a.diagnose()
    finally:
        a.stop(), b.stop()
    assert a.blamed_other and "rank 2 stopped responding" in message and "last at step 7" in message
    assert "rank 1" not in message  # alive, its thread beating
    assert store.get("megamod/liveness/0/failed").decode() == message  # the others will read this one


def test_diagnose_names_a_rank_that_left_with_an_error_and_not_one_that_finished(store):
    a, b, c = _ranks(store, 3)
    for h in (a, b, c):
        h.start()
    b.stop("error: DataError: token id 999 is outside --model.vocab_size 512")
    c.stop()  # "ok": a normal end is nobody's failure
    message = a.diagnose()
    a.stop()
    assert message == "rank 1 failed: DataError: token id 999 is outside --model.vocab_size 512"


def test_nobody_to_blame_when_every_peer_is_alive(store):
    a, b = _ranks(store, 2)
    a.start(), b.start()
    try:
        message = a.diagnose()
    finally:
        a.stop(), b.stop()
    assert not a.blamed_other and message.startswith("no other rank")


def test_an_unreachable_store_is_blamed_on_its_host(store):
    a, _ = _ranks(store, 2)

    def gone(key):  # what a client sees once the process hosting the store has died
        raise RuntimeError("Connection reset by peer")

    a._get = gone
    message = a.diagnose()
    assert a.blamed_other and "rendezvous store" in message and "(rank 0, unless torchrun's agent" in message
