"""FSDP1 / DeepSpeed flat partitions: vector methods train on them, Shampoo refuses clearly."""

import json
import pathlib

import pytest
import torch
from _dist_utils import torchrun

import hf_compressed_optim as hco
from hf_compressed_optim.engines import engine_of

WORKER = pathlib.Path(__file__).parent / "distributed" / "fsdp1_worker.py"


def run_worker(tmp_path, optim):
    out = tmp_path / f"{optim}.json"
    torchrun(WORKER, "--optim", optim, "--out", str(out), log=tmp_path / f"{optim}.stderr")
    return json.loads(out.read_text())


@pytest.mark.multiprocess
def test_fsdp1_vector_method_trains_and_shampoo_refuses(tmp_path):
    res = run_worker(tmp_path, "microadam")
    assert res["world_size"] == 2
    flat, orig = res["orig=False"], res["orig=True"]
    assert flat["shapes"] == [[366]]  # one flat shard per unit
    assert [0] in orig["shapes"]      # size-0 views of the original parameters
    for r in (flat, orig):
        assert r["last"] < 0.5 * r["first"]
    res = run_worker(tmp_path, "efcp_mfac")  # EFCP's window works on flat partitions too
    for key in ("orig=False", "orig=True"):
        assert res[key]["last"] < res[key]["first"]
    res = run_worker(tmp_path, "shampoo_4bit")
    for key in ("orig=False", "orig=True"):
        msg = res[key]["error"]
        assert "FSDP1" in msg and "FSDP2" in msg


def _engine_name(param):
    engine = engine_of(torch.optim.SGD([param], lr=0.1))
    return engine.name if engine.flat_partitions else None


def test_flat_partition_detection():
    w = torch.nn.Parameter(torch.randn(4, 3))
    assert _engine_name(w) is None
    flat = torch.nn.Parameter(torch.randn(12))
    flat._fsdp_flattened = True
    assert _engine_name(flat) == "FSDP1"
    ds = torch.nn.Parameter(torch.randn(0))
    ds.ds_id = 3
    assert _engine_name(ds) == "DeepSpeed ZeRO-3"
    opt = hco.Shampoo([flat])
    flat.grad = torch.randn(12)
    with pytest.raises(RuntimeError, match="FSDP1"):
        opt.step()
