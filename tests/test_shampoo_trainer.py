"""Trainer / accelerate end to end with optim="shampoo_4bit" and "shampoo_32bit" on a tiny LLaMA
(CPU): full fine-tuning with memory metrics, LoRA, bitwise resume from a checkpoint loaded with
weights_only, the accelerate prepare round trip and optim_args validation."""

from __future__ import annotations

import pytest
import torch

import hf_compressed_optim as hco

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from transformers import Trainer  # noqa: E402

from _hf_utils import (  # noqa: E402
    train_and_resume, train_lora,
    inner_optimizer, lm_dataset, losses, mean, tiny_llama, token_ids, training_args,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")

FAST = "T1=2,T2=4"  # short runs: refresh statistics every 2 and roots every 4 steps


def _dtypes(opt):
    return [{k: v.dtype for k, v in s.items() if torch.is_tensor(v)}
            for s in inner_optimizer(opt).state.values()]


@pytest.mark.parametrize("optim", ["shampoo_4bit", "shampoo_32bit"])
def test_full_finetune_loss_falls_and_reports_preconditioner_bytes(tmp_path, optim):
    args = training_args(tmp_path, optim=optim, optim_args=FAST, learning_rate=3e-3,
                         max_steps=24, weight_decay=0.01)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(64))
    hco.add_memory_callback(trainer)
    trainer.train()
    loss = losses(trainer)
    assert all(torch.isfinite(torch.tensor(loss)))
    assert mean(loss[-5:]) < mean(loss[:5]) - 0.1, loss
    opt = inner_optimizer(trainer.optimizer)
    assert isinstance(opt, hco.Shampoo)
    assert opt.param_groups[0]["precond_bits"] == (4 if optim == "shampoo_4bit" else 32)
    assert opt.param_groups[0]["stat_update_interval"] == 2
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    pre, first = last["optimizer_state_bytes/preconditioner"], last["optimizer_state_bytes/first_order"]
    n = sum(p.numel() for p in trainer.model.parameters())
    assert first == 8 * n  # AdamW moments in the fp32 parameter dtype
    assert pre > 0
    if optim == "shampoo_4bit":
        codes = [s["eigvec_codes"] for s in opt.state.values() if "eigvec_codes" in s]
        assert any(c.numel() for c in codes) and all(c.dtype == torch.uint8 for c in codes)
    assert sum(int(s.get("precond_failures", 0)) for s in opt.state.values()) == 0


def test_lora_loss_falls(tmp_path):
    pytest.importorskip("peft")
    _, opt, trainable = train_lora(tmp_path, 0.05, optim="shampoo_4bit",
                                   optim_args=FAST + ",min_quant_size=256", learning_rate=1e-2,
                                   max_steps=30)
    assert set(opt.state) == set(trainable)
    # LoRA A (8 x 32) and B (32 x 8): 32-order factors quantized with min_quant_size=256
    assert all(s["eigvec_codes"].numel() > 0 for s in opt.state.values())


def test_resume_from_checkpoint_is_bitwise_exact(tmp_path):
    common = dict(optim="shampoo_4bit", optim_args="T1=2,T2=3,min_quant_size=256",
                  learning_rate=3e-3, max_steps=10, weight_decay=0.01,
                  lr_scheduler_type="linear", warmup_steps=2, save_steps=5)
    full, resumed, saved = train_and_resume(tmp_path, 5, **common)
    assert any(s["eigvec_codes"].dtype == torch.uint8 for s in saved["state"].values()
               if "eigvec_codes" in s)
    full_params = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, full_params[name]), name
    assert _dtypes(resumed.optimizer) == _dtypes(full.optimizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerate_prepare_keeps_state_dtypes(dtype):
    model = tiny_llama().to(dtype)
    opt = hco.Shampoo(model.parameters(), lr=3e-3, stat_update_interval=1,
                      root_update_interval=2)
    ids = torch.tensor(token_ids(8, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    before = _dtypes(opt)
    snapshot = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                for s in opt.state.values()]
    model, prepared = Accelerator(cpu=True).prepare(model, opt)
    assert _dtypes(prepared) == before
    for s_old, s_new in zip(snapshot, inner_optimizer(prepared).state.values()):
        for k, v in s_old.items():
            assert torch.equal(s_new[k], v), k
    model(input_ids=ids, labels=ids).loss.backward()
    prepared.step()
    assert _dtypes(prepared) == before
    assert all(p.dtype == dtype for p in model.parameters())


def test_registered_names_and_bad_optim_args(tmp_path):
    from transformers.training_args import OptimizerNames

    assert {"shampoo_4bit", "shampoo_32bit"} <= set(OptimizerNames._value2member_map_)
    args = training_args(tmp_path, optim="shampoo_32bit",
                         optim_args="T1=10,T2=50,rectify_t2=3,inverse_root=schur_newton,"
                                    "first_order=adamw_8bit")
    cls, kwargs = hco.optimizer_cls_and_kwargs("shampoo_32bit", args)
    opt = cls([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)
    g = opt.param_groups[0]
    assert (g["precond_bits"], g["stat_update_interval"], g["root_update_interval"],
            g["rectify_iters"], g["inverse_root"], g["first_order"]) == \
        (32, 10, 50, (1, 3), "schur_newton", "adamw_8bit")
    for name, bad, key in (("shampoo_4bit", "precond_bits=8", "precond_bits"),
                           ("shampoo_4bit", "stat_decay=2", "stat_decay"),
                           ("shampoo_4bit", "codebook=nf4", "codebook"),
                           ("shampoo_4bit", "first_order=adamw_2bit", "first_order"),
                           ("shampoo_32bit", "precond_bits=4", "precond_bits"),
                           ("shampoo_4bit", "T1=-1", "T1")):  # 0: automatic
        with pytest.raises(ValueError, match=key):
            hco.optimizer_cls_and_kwargs(name, training_args(tmp_path, optim_args=bad))
