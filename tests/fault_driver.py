"""train.py with a fault injected, for tests/test_faults.py (run as a script, also under torchrun).

    FAULT=raise|nan FAULT_RANK=1 FAULT_CALL=3 python tests/fault_driver.py --train.max_steps=...
    FAULT=slow_fsync python tests/fault_driver.py ...      # every fsync sleeps, so kills land inside saves
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multimodal  # noqa: E402
import train  # noqa: E402

kind = os.environ["FAULT"]
if kind == "slow_fsync":
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.03)
        real_fsync(fd)
    os.fsync = slow_fsync
else:
    real_forward = multimodal.MultimodalLM.forward
    calls = 0

    def forward(self, batch):
        global calls
        calls += 1
        out = real_forward(self, batch)
        if int(os.environ.get("RANK", 0)) == int(os.environ["FAULT_RANK"]) and calls >= int(os.environ["FAULT_CALL"]):
            if kind == "raise":
                raise RuntimeError("injected fault")
            out.loss_sum = out.loss_sum * float("nan")
        return out
    multimodal.MultimodalLM.forward = forward

train.main(sys.argv[1:])
