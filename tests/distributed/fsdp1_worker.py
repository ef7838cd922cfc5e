"""FSDP1 worker (torchrun, 2 gloo ranks on CPU): the optimizer sees flat 1-D shards.

Vector methods train on them (``use_orig_params`` False and True, the latter with size-0 views);
Shampoo refuses with an explanation. Rank 0 writes JSON to ``--out``.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _worker_common import finish, start_watchdog  # noqa: E402
import hf_compressed_optim as hco


def make(name, params):
    if name == "microadam":
        return hco.MicroAdam(params, lr=1e-2, window_size=3, density=0.25, topk_block_size=64)
    if name == "shampoo_4bit":
        return hco.Shampoo(params, lr=1e-2)
    if name == "efcp_mfac":
        return hco.SparseMFAC(params, lr=3e-2, window_size=4, density=0.25)
    if name == "efcp_ggt":
        return hco.SparseGGT(params, lr=3e-2, window_size=4, density=0.25)
    raise ValueError(name)


def main():
    start_watchdog()
    ap = argparse.ArgumentParser()
    ap.add_argument("--optim", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    res = {"world_size": dist.get_world_size()}
    for orig in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(),
                                    torch.nn.Linear(33, 5))
        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=orig)
        opt = make(args.optim, model.parameters())
        g = torch.Generator().manual_seed(1 + dist.get_rank())
        losses = []
        try:
            for _ in range(8):
                loss = model(torch.randn(16, 16, generator=g)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss))
            res[f"orig={orig}"] = {"first": losses[0], "last": losses[-1],
                                   "shapes": [list(p.shape) for p in model.parameters()]}
        except RuntimeError as err:
            res[f"orig={orig}"] = {"error": str(err)}
    finish(res, args.out)


if __name__ == "__main__":
    main()
