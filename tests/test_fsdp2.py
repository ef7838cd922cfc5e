"""FSDP2 (raw ``fully_shard`` on 2 gloo ranks): DTensor state, DCP checkpoints, shard-consistent
skipping. See ``tests/distributed/fsdp2_worker.py`` for what each figure means."""

import json

import pytest
from _dist_utils import WORKERS, fsdp2_problems, torchrun

WORKER = WORKERS / "fsdp2_worker.py"


def run_worker(tmp_path, optim):
    out = tmp_path / "result.json"
    torchrun(WORKER, "--optim", optim, "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
             log=tmp_path / "stderr.txt", result=out)
    return json.loads(out.read_text())


@pytest.mark.multiprocess
# EFCP's two optimizers run this worker in tests/test_soak.py (two jobs at once, same checks)
@pytest.mark.parametrize("optim", ["microadam", "shampoo_4bit", "shampoo_32bit"])
def test_fsdp2_state_checkpoint_and_skips(tmp_path, optim):
    """Sharded training equals one process at density 1 (not Shampoo: row blocks); the DCP
    template step changes nothing; a DCP save / load into a fresh optimizer continues bit for
    bit with dtypes kept; the full state dict holds both ranks' rows; a NaN in rank 1's shard
    skips the parameter on both ranks; bf16 mixed precision trains (``fsdp2_problems``)."""
    res = run_worker(tmp_path, optim)
    assert fsdp2_problems(res, optim) == []
