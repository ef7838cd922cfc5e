"""Multi-process runs exit cleanly: the package's collectives never leave a tensor to a gloo
worker thread, a short soak launches two jobs at once, and the soak runner's verdicts and port
collision handling say what happened (``tests/soak.py`` runs the long version)."""

import subprocess
import sys

import pytest
import soak
import torch
import torch.distributed as dist
from _dist_utils import launch

from hf_compressed_optim.engines import collectives


@pytest.fixture
def one_rank_gloo():
    """A real gloo process group of one rank, in this process (worker threads included)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_all_reduce_returns_after_the_backend_released_the_tensor(one_rank_gloo):
    """``dist.all_reduce`` returns while gloo's worker still holds the tensor in about a third of
    calls; a temporary dropped then is freed by that thread, which needs the GIL, and aborts the
    process if the interpreter is exiting. The package's all_reduce returns after the release."""
    held = 0
    for i in range(3000):
        t = torch.full((7,), float(i))
        collectives.all_reduce(t)
        held += t._use_count() > 1
        assert t[0].item() == i  # one rank: the sum is the tensor
    assert held == 0


@pytest.mark.parametrize("name,extra", [("SparseMFAC", {}), ("SparseGGT", {}), ("MicroAdam", {}),
                                        ("MicroAdam", {"per_param_max_grad_norm": 0.1})])
def test_every_collective_of_a_step_waits_for_the_release(one_rank_gloo, monkeypatch, name,
                                                           extra):
    """On DTensor (FSDP2) parameters the step all-reduces finite flags (and, for EFCP, its
    inner products; with ``per_param_max_grad_norm``, each parameter's squared norm): each of
    those goes through ``collectives.all_reduce``."""
    import hf_compressed_optim as hco
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh,
                                                   [Shard(0)])) for s in [(9, 5), (5,)]]
    opt = getattr(hco, name)(params, lr=1e-2, window_size=3, density=0.5, **extra)
    calls, waits = [], []
    raw, wait = dist.all_reduce, collectives.wait_until_released
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(1) or raw(t, *a, **k))
    monkeypatch.setattr(collectives, "wait_until_released",
                        lambda t, owners, **k: waits.append(1) or wait(t, owners, **k))
    for _ in range(3):
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, [Shard(0)])
        opt.step()
    assert len(calls) >= 3 and len(waits) == len(calls)


needs_proc = pytest.mark.skipif(collectives.wait_for_gloo_workers() is None,
                                reason="reads gloo's worker threads from /proc (Linux)")


@needs_proc
def test_wait_for_gloo_workers_covers_collectives_the_package_did_not_issue(one_rank_gloo):
    """A plain ``dist.all_reduce`` returns with the tensor still held by gloo's worker in some
    calls; once :func:`wait_for_gloo_workers` (what the exit hook runs) returns, the worker has
    let go of it every time, so nothing is left for it to free while the interpreter finalizes."""
    held = 0
    for i in range(500):
        t = torch.full((7,), float(i))
        dist.all_reduce(t)
        assert collectives.wait_for_gloo_workers() is True
        held += t._use_count() > 1
    assert held == 0


@needs_proc
def test_exit_hook_waits_for_workers_of_a_group_the_script_destroyed(monkeypatch):
    """``destroy_process_group`` does not end gloo's worker threads while something references
    the group (here a DeviceMesh, as every FSDP2 parameter does): the exit hook waits for them to
    be idle even when the script destroyed its group itself (the benchmark's exit crash)."""
    from torch.distributed.device_mesh import init_device_mesh

    before = len(collectives._gloo_worker_tids())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    dist.destroy_process_group()
    assert len(collectives._gloo_worker_tids()) > before, "destroy ended the workers"
    calls = []
    monkeypatch.setattr(collectives, "wait_for_gloo_workers",
                        lambda *a, **k: calls.append(1) or True)
    collectives.destroy_gloo_group_at_exit()
    assert calls == [1]
    del mesh


_EXIT_SCRIPT = """
import atexit, os, sys, tempfile
import torch.distributed as dist
seen = []
atexit.register(lambda: print("alive at exit:", seen[0] if seen else dist.is_initialized()))
import hf_compressed_optim  # registers its exit hook after the one above: it runs first
store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
out = [None]
dist.all_gather_object(out, 1)   # a collective of the script's own, not the package's
"""


def test_a_gloo_group_left_alive_is_destroyed_at_exit():
    """The package's atexit hook destroys a gloo process group the script left alive before the
    interpreter finalizes (the exit crash of issue 18 through collectives it did not issue)."""
    run = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "alive at exit: False" in run.stdout, run.stdout + run.stderr


@pytest.mark.multiprocess
def test_short_soak_efcp_fsdp2_two_jobs_at_once():
    """The path the exit crash was seen on (raw FSDP2, DCP save / restore, training on), both
    EFCP optimizers at once; every check of tests/test_fsdp2.py, and a clean exit."""
    runs = soak.soak(["fsdp2"], ["efcp_mfac", "efcp_ggt"], runs=1, jobs=2, log=lambda s: None)
    assert [(r.optim, r.verdict) for r in runs if r.verdict != "ok"] == [], \
        "\n".join(f"{r.optim}: {r.verdict} rc {r.returncode} signals {r.signals}: {r.detail}"
                  for r in runs)


@pytest.mark.parametrize("rc,stderr,collided,result,problems,expected", [
    (0, "", False, {"x": 1}, [], "ok"),
    # did its work (result correct), then SIGABRT at exit: torchrun exits 1
    (1, "terminate called without an active exception\nexitcode  : -6", False, {"x": 1}, [],
     "exit crash"),
    (0, "", False, {"x": 1}, ["resumed run differs by 0.1"], "mismatch"),
    (1, "", False, {"x": 1}, ["ranks hold different parameters"], "mismatch"),
    (1, "Traceback ... ValueError", False, None, [], "failed"),
    (124, "", False, None, [], "timeout"),
    (1, "Address already in use", True, None, [], "collision"),
    # a collision message cannot hide a wrong result
    (1, "Address already in use", True, {"x": 1}, ["restored run differs"], "mismatch"),
])
def test_soak_verdicts(rc, stderr, collided, result, problems, expected):
    assert soak.verdict(rc, stderr, collided, result, problems) == expected


def test_port_collisions_are_relaunched_and_labelled(monkeypatch, tmp_path):
    """A launch that lost a port race is relaunched; one that keeps losing is a collision (no
    verdict on the project); a failure without the signature is never relaunched."""
    replies = []

    def fake_run(cmd, **kw):
        return replies.pop(0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    lost = subprocess.CompletedProcess([], 1, "", "RuntimeError: EADDRINUSE: Address already in use")
    won = subprocess.CompletedProcess([], 0, "done", "")
    replies[:] = [lost, won]
    out = launch("w.py", result=tmp_path / "r.json")
    assert (out.returncode, out.collisions, out.collided) == (0, 1, False)
    replies[:] = [lost, lost, lost]
    out = launch("w.py", result=tmp_path / "r.json")
    assert (out.returncode, out.collisions, out.collided) == (1, 2, True)
    broken = subprocess.CompletedProcess([], 1, "", "Traceback: KeyError 'x'")
    replies[:] = [broken, won]
    out = launch("w.py", result=tmp_path / "r.json")
    assert (out.returncode, out.collisions, out.collided) == (1, 0, False)
