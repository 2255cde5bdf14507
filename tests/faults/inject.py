"""Run the real trainer (``megamod.train.cli.main``) with faults injected, as $MEGAMOD_FAULTS says.

$MEGAMOD_FAULTS is a JSON list of faults, each {"kind": ..., "rank": R, "step": S, ...}; a fault
fires on global rank R while it computes optimizer step S (after the step's first forward, before
its backward: mid-step), and only in the first attempt (torchrun's and Slurm's restart count 0)
unless "every_attempt" is true. Kinds:

- "kill": SIGKILL this process;  "stop": SIGSTOP it (a hang: it never answers again);
- "nan_loss": this micro-batch's loss becomes NaN (so do its gradients);
- "nan_grad": one element of the first parameter's gradient becomes NaN in this backward;
- "enospc": the first file this rank writes for checkpoint tag "tag" gets half its bytes, then
  the write raises OSError(ENOSPC), as a full disk does;
- "record_samples": every rank appends the sample indices of each training micro-batch, with the
  step, to {dir}/samples_rank{R}.jsonl.

Before a kill or a stop the rank writes {dir}/{kind}_rank{R}.json with its pid and the time, so a
test can measure how long the others take to notice; when ``main`` returns, each rank writes its
exit code and the time to $MEGAMOD_FAULTS_DIR/exit_rank{R}_attempt{A}.json.
"""

import errno
import io
import json
import os
import signal
import sys
import time

import torch

FAULTS = json.loads(os.environ.get("MEGAMOD_FAULTS", "[]"))
RANK = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or 0)
NOW = {"step": 0, "trainer": None, "training": False}


def _active(kind):
    return [f for f in FAULTS if f["kind"] == kind and f.get("rank", RANK) == RANK
            and (ATTEMPT == 0 or f.get("every_attempt"))]


def _note(fault, what):
    path = os.path.join(fault["dir"], f"{what}_rank{RANK}.json")
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "time": time.time(), "step": NOW["step"], "attempt": ATTEMPT}, f)


def _mid_step(loss):
    """Called with each training micro-batch's loss, after the forward."""
    for f in _active("kill") + _active("stop"):
        if f["step"] == NOW["step"]:
            _note(f, f["kind"])
            os.kill(os.getpid(), signal.SIGKILL if f["kind"] == "kill" else signal.SIGSTOP)
    for f in _active("nan_loss"):
        if f["step"] == NOW["step"]:
            loss = loss * float("nan")
    for f in _active("nan_grad"):
        if f["step"] == NOW["step"] and not f.get("done"):
            f["done"] = True  # one backward only

            def poison(g, fault=f):
                if fault.pop("armed", False):
                    g = g.clone()
                    g.view(-1)[0] = float("nan")
                return g

            f["armed"] = True
            next(NOW["trainer"].model.parameters()).register_hook(poison)
    return loss


def _patch_trainer():
    from megamod.train import trainer as trainer_mod

    build_loss_fn = trainer_mod.build_loss_fn

    def guarded_build_loss_fn(*args, **kwargs):
        fn = build_loss_fn(*args, **kwargs)

        def loss_fn(*a, **k):
            loss = fn(*a, **k)
            return _mid_step(loss) if NOW["training"] and torch.is_grad_enabled() else loss

        return loss_fn

    trainer_mod.build_loss_fn = guarded_build_loss_fn
    train_step = trainer_mod.Trainer.train_step

    def counted_train_step(self, batches):
        NOW.update(step=self.state.step + 1, trainer=self, training=True)
        try:
            return train_step(self, batches)
        finally:
            NOW["training"] = False

    trainer_mod.Trainer.train_step = counted_train_step


def _patch_save():
    faults = _active("enospc")
    if not faults:
        return
    save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        hit = [x for x in faults if isinstance(f, (str, os.PathLike)) and x["tag"] in str(f) and not x.get("done")]
        if not hit:
            return save(obj, f, *args, **kwargs)
        hit[0]["done"] = True
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    torch.save = full_disk_save


def _patch_sampler():
    faults = [f for f in FAULTS if f["kind"] == "record_samples"]
    if not faults:
        return
    from megamod.data.sampler import DistributedBatchSampler

    iterate = DistributedBatchSampler.__iter__
    path = os.path.join(faults[0]["dir"], f"samples_rank{RANK}.jsonl")

    def recorded(self):
        for indices in iterate(self):
            if NOW["training"]:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": NOW["step"], "attempt": ATTEMPT, "indices": indices}) + "\n")
            yield indices

    DistributedBatchSampler.__iter__ = recorded


_patch_trainer()
_patch_save()
_patch_sampler()

from megamod.train.cli import main  # noqa: E402

rc = main()  # an exit from the heartbeat thread (os._exit) does not come back here
with open(os.path.join(os.environ.get("MEGAMOD_FAULTS_DIR", "."), f"exit_rank{RANK}_attempt{ATTEMPT}.json"), "w") as f:
    json.dump({"rc": rc, "time": time.time()}, f)
sys.exit(rc)
