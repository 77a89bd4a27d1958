"""Run ``fastrlhf <stage> ...`` under torchrun with one injected failure: FASTRLHF_TEST_FAULT="rank:step" makes that
rank raise inside its ``step``-th SFT loss call (one call per micro-batch; with grad_accum 1 that is optimizer step
``step``). Used by tests/test_distributed.py to check that a failing rank stops the whole job with its own error."""
import os
import sys

from fastrlhf.stages import sft
from fastrlhf.tools.cli import main

fail_rank, fail_step = (int(x) for x in os.environ["FASTRLHF_TEST_FAULT"].split(":"))
rank = int(os.environ.get("RANK", "0"))
_loss, _calls = sft.packed_lm_loss, [0]


def _faulty(model, batch, normalizer=None):
    _calls[0] += 1
    if rank == fail_rank and _calls[0] == fail_step:
        raise RuntimeError(f"injected fault on rank {rank} at step {fail_step}")
    return _loss(model, batch, normalizer)


sft.packed_lm_loss = _faulty
sys.exit(main(sys.argv[1:]))
