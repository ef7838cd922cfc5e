"""Trainer and accelerate end to end with optim="efcp_mfac" / "efcp" / "efcp_ggt" on a tiny LLaMA
(CPU): full fine-tuning with memory metrics, LoRA, bitwise resume, the prepare round trip, and
optim_args errors."""

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
    mean,
    inner_optimizer, lm_dataset, losses, tiny_llama, token_ids, training_args,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")

# global (anchor) tensors and per-parameter tensors with their dtypes
ANCHOR_DTYPES = {"gram": torch.float64, "window_count": torch.int64}
PARAM_DTYPES = {"step": torch.int64, "window_indices": torch.int16,
                "window_values": torch.bfloat16, "ef": torch.float32}
# the papers' raw steps (lr_mode=raw) and fp32 error buffer: lr ~ 0.1 for M-FAC (Newton-like
# steps), ~1 for GGT (AdaGrad-like) on this task; the defaults: tests/test_drop_in.py
RAW = "lr_mode=raw,ef_bits=32"
MFAC = dict(optim="efcp_mfac", optim_args=f"window_size=8,density=0.05,damp=1e-4,{RAW}",
            learning_rate=0.1)
GGT = dict(optim="efcp_ggt", optim_args=f"window_size=8,density=0.05,eps=1e-4,{RAW}",
           learning_rate=1.0)


def dtype_errors(optimizer, param_dtypes=PARAM_DTYPES) -> list[str]:
    opt = inner_optimizer(optimizer)
    states = list(opt.state.values())
    if not states:
        return ["no state"]
    errors = []
    for key, dtype in ANCHOR_DTYPES.items():
        if states[0].get(key) is None or states[0][key].dtype != dtype:
            errors.append(f"anchor {key}")
    for i, state in enumerate(states):
        for key, dtype in param_dtypes.items():
            value = state.get(key)
            if not torch.is_tensor(value) or value.dtype != dtype:
                errors.append(f"state {i}: {key} {getattr(value, 'dtype', None)}")
    return errors


def test_names_are_registered_and_optim_args_errors_name_the_key(tmp_path):
    for name in ("efcp_mfac", "efcp", "efcp_ggt"):
        assert hco.integrations.transformers.is_registered(name)
    args = training_args(tmp_path, optim="efcp", optim_args="m=16,k_init=0.02,lambda=1e-5,"
                         "fix_scaling=yes,ef_bits=4,compressor=lowrank,rank=2")
    cls, kwargs = hco.optimizer_cls_and_kwargs("efcp", args)
    assert cls is hco.SparseMFAC
    assert kwargs["window_size"] == 16 and kwargs["density"] == 0.02 and kwargs["damp"] == 1e-5
    assert kwargs["fix_scaling"] is True and kwargs["ef_bits"] == 4 and kwargs["rank"] == 2
    # Trainer's adam_epsilon is not GGT's eps
    cls, kwargs = hco.optimizer_cls_and_kwargs("efcp_ggt", training_args(tmp_path,
                                                                         optim="efcp_ggt"))
    assert cls is hco.SparseGGT and "eps" not in kwargs
    for bad, key in (("window_size=0", "window_size"), ("ef_bits=8", "ef_bits"),
                     ("damp=-1", "damp"), ("compressor=svd", "compressor"),
                     ("fix_scaling=maybe", "fix_scaling"), ("beta1=0.9", "beta1")):
        with pytest.raises(ValueError, match=f"'{key}'"):  # as TrainingArguments are created
            Trainer(model=tiny_llama(), train_dataset=lm_dataset(8),
                    args=training_args(tmp_path, optim="efcp_mfac", optim_args=bad,
                                       max_steps=1)).create_optimizer()


@pytest.mark.parametrize("cfg", [MFAC, GGT], ids=["mfac", "ggt"])
def test_full_finetune_loss_falls_and_memory_metrics(tmp_path, cfg):
    args = training_args(tmp_path, max_steps=25, weight_decay=0.01, **cfg)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(64))
    cb = hco.add_memory_callback(trainer)
    trainer.train()
    loss = losses(trainer)
    assert len(loss) == 25 and all(torch.isfinite(torch.tensor(loss)))
    assert mean(loss[-5:]) < mean(loss[:5]) - 0.1, loss

    opt = inner_optimizer(trainer.optimizer)
    assert dtype_errors(opt) == []
    # Trainer's no-decay group: weight decay honoured per group
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.01]
    assert int(next(iter(opt.state.values()))["window_count"]) == 25
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    report = hco.optimizer_memory_report(opt)
    for key in ("window", "error_feedback", "preconditioner", "counters"):
        assert last[f"optimizer_state_bytes/{key}"] == report[f"optimizer_state_bytes/{key}"] > 0
    assert report["optimizer_state_bytes/preconditioner"] == 8 * 8 * 8  # the m x m fp64 Gram
    assert cb.train_begin_report["optimizer_state_bytes"] == 0  # lazy state


def test_lora_loss_falls_and_state(tmp_path):
    pytest.importorskip("peft")
    # LoRA's gradients are small, so M-FAC's Newton-like steps (~ m / |c|) are large: small lr
    trainer, opt, trainable = train_lora(tmp_path, 0.05, max_steps=40, **{
        **MFAC, "learning_rate": 0.03,
        "optim_args": "window_size=8,density=0.2,damp=1e-2,ef_bits=4,lr_mode=raw"})
    assert [len(g["params"]) for g in opt.param_groups] == [28, 0]
    assert set(opt.state) == set(trainable)
    assert dtype_errors(opt, {"step": torch.int64, "window_indices": torch.int16,
                              "ef_codes": torch.uint8}) == []
    assert not any(p in opt.state for p in trainer.model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("cfg", [MFAC, GGT], ids=["mfac", "ggt"])
def test_resume_from_checkpoint_is_bitwise_exact(tmp_path, cfg):
    common = dict(max_steps=8, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=2,
                  save_steps=4, **{**cfg, "optim_args": cfg["optim_args"].replace(
                      "window_size=8", "window_size=3")})
    full, resumed, saved = train_and_resume(tmp_path, 4, **common)
    states = list(saved["state"].values())
    assert states[0]["gram"].dtype == torch.float64
    assert all(s["window_indices"].dtype == torch.int16 for s in states)
    assert dtype_errors(resumed.optimizer) == []
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerate_prepare_after_state_exists(dtype):
    model = tiny_llama().to(dtype)
    opt = hco.SparseMFAC(model.parameters(), lr=0.05, damp=1e-4, density=0.05, window_size=3,
                         ef_bits=32, lr_mode="raw")
    ids = torch.tensor(token_ids(8, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    before = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
              for s in opt.state.values()]
    assert max(int(s["window_indices"].max()) for s in before) > 256
    accelerator = Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    for state, ref in zip(inner_optimizer(prepared).state.values(), before):
        for key, value in ref.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    prepared.step()
    assert dtype_errors(prepared) == []
    assert all(p.dtype == dtype for p in model.parameters())
