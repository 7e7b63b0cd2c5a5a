"""train.py with a fault injected, for tests/test_faults.py (run as a script, also under torchrun).

    FAULT_RANK=1 NAN_FROM=3 RAISE_AT=5 python tests/fault_driver.py ...  # on rank 1, the loss of the 3rd and later
                                                                        # forwards is NaN; the 5th raises
    FAULT=slow_fsync python tests/fault_driver.py ...      # every fsync sleeps, so kills land inside saves
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multimodal  # noqa: E402
import train  # noqa: E402

if os.environ.get("FAULT") == "slow_fsync":
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.03)
        real_fsync(fd)
    os.fsync = slow_fsync
else:
    real_forward = multimodal.MultimodalLM.forward
    calls = 0
    never = str(1 << 30)

    def forward(self, batch):
        global calls
        calls += 1
        out = real_forward(self, batch)
        if int(os.environ.get("RANK", 0)) == int(os.environ["FAULT_RANK"]):
            if calls >= int(os.environ.get("RAISE_AT", never)):
                raise RuntimeError("injected fault")
            if calls >= int(os.environ.get("NAN_FROM", never)):
                out.loss_sum = out.loss_sum * float("nan")
        return out
    multimodal.MultimodalLM.forward = forward

train.main(sys.argv[1:])
