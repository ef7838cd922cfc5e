"""Mixed precision modes users combine our optimizers with (single process, CPU):

* fp32 master weights with bf16 compute (autocast, what Trainer's ``bf16=True`` does);
* pure bf16 parameters (transformers loads LLaMA in bf16 by default, DDP does not upcast);
* fp16 compute with a ``GradScaler``: steps with inf/NaN gradients are skipped by the scaler and
  leave the optimizer state untouched; the others train.
"""


import pytest
import torch

import hf_compressed_optim as hco

OPTIMIZERS = {
    "microadam": lambda ps: hco.MicroAdam(ps, lr=1e-2, window_size=4, density=0.25,
                                          topk_block_size=64),
    "shampoo_4bit": lambda ps: hco.Shampoo(ps, lr=1e-2, stat_update_interval=1,
                                           root_update_interval=2, min_quant_size=0,
                                           quant_block_size=8),
    "efcp_mfac": lambda ps: hco.SparseMFAC(ps, lr=3e-2, window_size=4, density=0.25),
    "efcp_ggt": lambda ps: hco.SparseGGT(ps, lr=3e-2, window_size=4, density=0.25),
}


def model_and_data(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 1)).to(dtype)
    x = torch.randn(64, 12)
    y = (x[:, :3].sum(1, keepdim=True) > 0).float()
    return model, x, y


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)


def snapshot(opt):
    return {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
            for p, st in opt.state.items()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fp32_master_weights_bf16_autocast(name):
    model, x, y = model_and_data()
    opt = OPTIMIZERS[name](model.parameters())
    first = loss_fn(model, x, y).item()
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss_fn(model, x, y).item() < 0.8 * first


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pure_bf16_parameters(name):
    model, x, y = model_and_data(torch.bfloat16)
    opt = OPTIMIZERS[name](model.parameters())
    first = loss_fn(model, x, y).item()
    for _ in range(30):
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert loss_fn(model, x, y).item() < 0.8 * first


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fp16_autocast_with_grad_scaler_skips_overflow_steps(name):
    model, x, y = model_and_data()
    opt = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    first = loss_fn(model, x, y).item()
    for step in range(30):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        if step == 10:  # an overflow: the scaler must skip this step
            next(model.parameters()).grad.view(-1)[0] = float("inf")
            params_before = [p.detach().clone() for p in model.parameters()]
            state_before = snapshot(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 10:
            assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
            after = snapshot(opt)
            assert after.keys() == state_before.keys()
            for pid, st in state_before.items():
                assert all(torch.equal(v, after[pid][k]) for k, v in st.items())
    assert loss_fn(model, x, y).item() < 0.8 * first
