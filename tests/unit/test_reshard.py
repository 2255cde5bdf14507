"""reshard.py's fix-ups after DeepSpeed loads a universal checkpoint, without processes (the
resumes themselves run in tests/distributed/test_tp_train.py and test_pp_train.py)."""

from types import SimpleNamespace

import torch

from megamod.train.reshard import place_adam_steps


def test_universal_resume_puts_fused_adam_steps_on_the_parameter_device():
    """DeepSpeed's universal loader leaves Adam's ``step`` on the CPU; a fused AdamW on GPU refuses
    that (seen on 2 H200s resuming pp2 at tp2). ``place_adam_steps`` moves it as torch's own
    load_state_dict would: for fused groups only, through the ZeRO wrapper. ("meta" stands in
    for a GPU here.)"""
    fused, plain = (torch.nn.Parameter(torch.zeros(2, device="meta")) for _ in range(2))
    inner = SimpleNamespace(param_groups=[{"params": [fused], "fused": True}, {"params": [plain], "fused": None}],
                            state={fused: {"step": torch.tensor(7.0)}, plain: {"step": torch.tensor(7.0)}})
    place_adam_steps(SimpleNamespace(optimizer=inner))  # a ZeRO-style wrapper
    assert inner.state[fused]["step"].device.type == "meta" and inner.state[fused]["step"].dtype == torch.float32
    assert inner.state[plain]["step"].device.type == "cpu"  # torch keeps a non-fused step on the CPU
