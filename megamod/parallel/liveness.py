"""Liveness: a rank that dies or hangs never leaves the others waiting, and they say which it was.

Two mechanisms, both bounded by ``train.collective_timeout_s`` (T):

1. Collective timeouts. The world group and every group ``ParallelDims`` builds get T (torch's
   ``new_group`` does not inherit the world's timeout), so a gloo collective whose peer never
   arrives raises after T. On NCCL the watchdog aborts a collective that ran past T and, with
   ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (torchrun sets it; ``nccl_environment`` sets it for
   srun and mpirun too), ends the process; ``TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC`` bounds a stuck
   watchdog the same way.
2. Heartbeats through the rendezvous store (``Heartbeat``). Every rank's daemon thread bumps a
   counter every ``interval`` (T/10, clamped to 0.5-5 s) and watches one peer, the next rank:
   a peer whose counter has not moved for T - 2·interval (a SIGKILLed or SIGSTOPped process; the
   thread runs even while the main thread waits inside a collective) is declared failed under
   the store key ``failed``. Every rank also polls that key, so within one more interval every
   survivor prints the same line naming the failed rank and exits with ``EXIT_PEER_FAILED``,
   just before NCCL's watchdog would have ended it without naming anyone. When a collective fails
   first (a killed peer closes its sockets, and gloo raises at once), ``diagnose`` names the ranks
   whose counters stop moving, or that recorded an error on their way out.

Counters, not clocks, so hosts need not agree on the time. Keys live under
``megamod/liveness/{attempt}/`` (a torchrun restart or Slurm requeue starts clean). The store is a
client of the rendezvous address: torchrun's agent hosts it (it outlives any worker); under srun
and mpirun rank 0 does, so when rank 0 dies the store goes with it, which ``diagnose`` reports as
such. What this cannot see: a rank whose process runs but whose main thread is stuck outside a
collective (its heartbeat goes on); the collective timeout still ends the others.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

EXIT_PEER_FAILED = 3  # a survivor of another rank's failure: restarting the job may help
RESTART_HINT = ("exiting so the job can restart (torchrun --max-restarts N or a Slurm requeue resumes from the "
                "newest complete checkpoint)")


def heartbeat_interval(timeout_s: float) -> float:
    return min(5.0, max(0.5, timeout_s / 10))


def nccl_environment(timeout_s: float) -> dict[str, str]:
    """Variables the NCCL backend reads at init, where the launcher has not set them."""
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # abort the communicator and end the process
            "TORCH_NCCL_ENABLE_MONITORING": "1",  # a watchdog stuck inside a CUDA call is caught too
            "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(timeout_s) + 30)}


def _attempt() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"


def rendezvous_store(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """The store ``init_process_group`` meets in, with this attempt's keys apart from earlier ones.

    torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE) and keeps it across
    ``--max-restarts``; torch's own rendezvous reuses the same keys in it, so a restarted rank 0
    would read the dead attempt's gloo addresses ("Connection refused" at init). Elsewhere rank 0
    hosts a fresh store, as torch's tcp:// rendezvous would."""
    import torch.distributed as dist

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0 and not agent,
                          timeout=timedelta(seconds=timeout_s), multi_tenant=True)
    return dist.PrefixStore(f"megamod/attempt_{_attempt()}", store)


class Heartbeat:
    """See the module docstring. ``start()`` after the process group exists; ``stop()`` at exit."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.where = f"{host}:{port}"
        # Its own client: the store's operations then time out on our terms (a stopped store host
        # blocks them), and the thread never shares a connection with the main thread.
        self.store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=timedelta(seconds=max(5.0, 2 * self.interval)))
        self.prefix = f"megamod/liveness/{_attempt()}/"
        self.progress: Callable[[], int] | None = None  # the trainer's step, for the messages
        self._count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handling = False  # set by diagnose(): the thread only beats from then on
        self._blamed = False

    def _key(self, kind: str, rank: int | None = None) -> str:
        return self.prefix + kind + ("" if rank is None else f"/{rank}")

    def _step(self) -> int | None:
        try:
            return self.progress() if self.progress else None
        except Exception:  # noqa: BLE001  the trainer may be half built
            return None

    def _beat(self) -> None:
        self._count += 1
        self.store.set(self._key("hb", self.rank), f"{self._count} {self._step()}")

    # ---- the thread -----------------------------------------------------------------------------
    def start(self) -> Heartbeat:
        self._beat()  # the key exists before anyone watches it
        if self.world_size > 1:
            self._thread = threading.Thread(target=self._run, name="megamod-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        peer = (self.rank + 1) % self.world_size
        patience = max(3 * self.interval, self.timeout_s - 2 * self.interval)
        seen, changed = None, time.monotonic()
        unreachable_since: float | None = None
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                if self._handling:
                    continue  # the main thread is diagnosing a failure and will exit itself
                failed = self._get(self._key("failed"))
                if failed:
                    self._exit(failed)
                reason = self._get(self._key("exit", peer)) if peer is not None else None
                if reason is not None and reason.startswith("error"):
                    self.declare(f"rank {peer} failed: {reason.removeprefix('error: ')}")
                if reason is not None:
                    peer = None  # it left for a reason every rank shares, or at the end: nothing to watch
                if peer is not None:
                    value = self._get(self._key("hb", peer))
                    now = time.monotonic()
                    if value != seen:
                        seen, changed = value, now
                    elif now - changed > patience:
                        self.declare(f"rank {peer} stopped responding: no heartbeat for {now - changed:.0f} s"
                                     f"{_at_step(value)}")
                unreachable_since = None
            except Exception as e:  # noqa: BLE001  the store is gone or stopped
                if self._stop.is_set():
                    return
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > patience:
                    self._exit(f"{self._store_gone()} ({type(e).__name__}: {gist(e)})")

    def _get(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def declare(self, message: str) -> None:
        """Record ``message`` as the job's failure (the first one recorded wins) and exit."""
        self.store.compare_set(self._key("failed"), "", message)
        self._exit(self._get(self._key("failed")) or message)

    def _exit(self, message: str) -> None:
        self.mark_exit(f"peer failure: {message}")
        print(f"megamod-train: error: [rank {self.rank}] {message}; {RESTART_HINT}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_FAILED)  # the main thread may be blocked inside a collective for good

    def _store_gone(self) -> str:
        return (f"the rendezvous store at {self.where} is unreachable: its host (rank 0, unless torchrun's agent "
                f"hosts it) has failed")

    # ---- the main thread ------------------------------------------------------------------------
    def mark_exit(self, reason: str) -> None:
        """Say why this rank leaves ("ok" for a normal end) so no peer takes it for a failure."""
        try:
            self.store.set(self._key("exit", self.rank), reason)
        except Exception:  # noqa: BLE001  the store may already be gone; the peers then see that
            pass

    def stop(self, reason: str = "ok") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
        self.mark_exit(reason)

    def diagnose(self) -> str:
        """After a collective failed: which ranks failed, as one sentence. Waits ~2.5 intervals
        to see whose heartbeat still moves. Marks this rank as a survivor only if it names another."""
        self._handling = True
        try:
            failed = self._get(self._key("failed"))
            if failed:
                self._blamed = True
                self.mark_exit(f"peer failure: {failed}")
                return failed
            before = self._read_all()
            time.sleep(2.5 * self.interval)
            after = self._read_all()
        except Exception as e:  # noqa: BLE001
            self._blamed = True
            return f"{self._store_gone()} ({type(e).__name__}: {gist(e)})"
        parts = []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            hb, exit_reason = after[r]
            if exit_reason is not None and exit_reason.startswith("error"):
                parts.append(f"rank {r} failed: {exit_reason.removeprefix('error: ')}")
            elif exit_reason is None and hb == before[r][0]:
                parts.append(f"rank {r} stopped responding (no heartbeat for {2.5 * self.interval:.1f} s"
                             f"{_at_step(hb)})")
        self._blamed = bool(parts)
        message = "; ".join(parts) or "no other rank stopped or reported an error"
        if parts:
            self.store.compare_set(self._key("failed"), "", message)
            message = self._get(self._key("failed")) or message
            self.mark_exit(f"peer failure: {message}")
        return message

    @property
    def blamed_other(self) -> bool:
        """Whether the last ``diagnose`` found another rank to blame."""
        return self._blamed

    def _read_all(self) -> list[tuple[str | None, str | None]]:
        return [(self._get(self._key("hb", r)), self._get(self._key("exit", r))) for r in range(self.world_size)]



def _at_step(value: str | None) -> str:
    step = value.split()[1] if value and len(value.split()) == 2 else "None"
    return "" if step == "None" else f", last at step {step}"


def gist(e: BaseException) -> str:
    """The first sentence of an error, without the C++ source location gloo puts in front."""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(e).strip())
    return text.split(". ")[0].splitlines()[0][:200] if text else ""
