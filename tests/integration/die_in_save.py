"""Run the trainer, but kill the process (as SIGKILL would) right after the first file of the
checkpoint tag named by $MEGAMOD_TEST_DIE_IN is written: a crash in the middle of a save."""

import os
import sys

import torch

_target = os.environ["MEGAMOD_TEST_DIE_IN"]
_save = torch.save


def _dying_save(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    if _target in str(f):
        os._exit(9)


torch.save = _dying_save

from megamod.train.cli import main  # noqa: E402

sys.exit(main())
