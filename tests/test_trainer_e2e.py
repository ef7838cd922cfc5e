"""Trainer and accelerate end to end with optim="microadam" on a tiny LLaMA (CPU, fp32 unless
stated): full fine-tuning, LoRA, memory metrics, exact resume, and the accelerate prepare round
trip."""

from __future__ import annotations

import pytest
import torch

import hf_compressed_optim as hco

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from _hf_utils import (  # noqa: E402
    train_lora,
    mean,
    MICROADAM_STATE_DTYPES, inner_optimizer, lm_dataset, losses, state_dtype_errors, tiny_llama,
    token_ids, training_args,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


class _StateDtypesAtTrainBegin(TrainerCallback):
    """Records the optimizer state dtypes Trainer hands to callbacks at train begin (after a
    resume has loaded ``optimizer.pt``)."""

    def __init__(self):
        self.errors = None
        self.n_states = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = inner_optimizer(optimizer)
        self.n_states = len(opt.state)
        self.errors = state_dtype_errors(opt) if opt.state else []


# ---------------------------------------------------------------------- full fine-tuning
def test_full_finetune_loss_falls_and_memory_metrics(tmp_path):
    args = training_args(tmp_path, optim="microadam", optim_args="density=0.05",
                         learning_rate=3e-3, max_steps=30, weight_decay=0.01)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(64))
    cb = hco.add_memory_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()

    loss = losses(trainer)
    assert len(loss) == 30
    assert all(torch.isfinite(torch.tensor(loss)))
    assert mean(loss[-5:]) < mean(loss[:5]) - 0.1, loss

    opt = inner_optimizer(trainer.optimizer)
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    assert type(opt) is hco.MicroAdam
    assert state_dtype_errors(opt) == []
    assert all(int(s["step"]) == 30 for s in opt.state.values())

    # memory metrics reached the log history (Trainer appends it before on_log runs)
    report = hco.optimizer_memory_report(opt)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("optimizer_state_bytes" in h for h in logged)
    last = logged[-1]
    for key in ("optimizer_state_bytes", "optimizer_state_bytes/window",
                "optimizer_state_bytes/error_feedback", "optimizer_state_bytes/counters",
                "optimizer_state_bytes_per_param"):
        assert last[key] == report[key], key
    assert last["optimizer_state_bytes"] == sum(
        v for k, v in last.items() if k.startswith("optimizer_state_bytes/"))
    n_params = sum(p.numel() for p in trainer.model.parameters())
    assert last["optimizer_state_bytes_per_param"] == pytest.approx(
        last["optimizer_state_bytes"] / n_params)
    assert 0 < last["optimizer_state_bytes_per_param"] < 8  # AdamW would hold 8 bytes/param
    assert "optimizer_state_bytes" in trainer.state.log_history[-1]  # the train summary too
    # lazily created state: nothing at train begin
    assert cb.train_begin_report["optimizer_state_bytes"] == 0


# ---------------------------------------------------------------------- LoRA
def test_lora_loss_falls_and_state_dtypes(tmp_path):
    pytest.importorskip("peft")
    trainer, opt, trainable = train_lora(tmp_path, 0.08, optim="microadam",
                                         optim_args="density=0.05", learning_rate=1e-2,
                                         max_steps=40)
    assert type(opt) is hco.MicroAdam
    assert len(trainable) == 28 and all(p.dtype == torch.float32 for p in trainable)
    # Trainer's groups: every LoRA weight decays, the no-decay group is empty (tolerated)
    assert [len(g["params"]) for g in opt.param_groups] == [28, 0]
    assert set(opt.state) == set(trainable)
    assert state_dtype_errors(opt) == []
    for state in opt.state.values():
        for key, dtype in MICROADAM_STATE_DTYPES.items():
            assert state[key].dtype == dtype
    # frozen base weights never got state and did not move
    assert not any(p in opt.state for p in trainer.model.parameters() if not p.requires_grad)


# ---------------------------------------------------------------------- resume exactness
def test_resume_from_checkpoint_is_bitwise_exact(tmp_path):
    common = dict(optim="microadam", optim_args="window_size=3,density=0.05",
                  learning_rate=3e-3, max_steps=10, weight_decay=0.01,
                  lr_scheduler_type="linear", warmup_steps=2, save_steps=5)
    data = lm_dataset(32)  # 4 steps per epoch: the checkpoint is mid-epoch, the ring wraps

    full = Trainer(model=tiny_llama(seed=0), train_dataset=data,
                   args=training_args(tmp_path / "full", save_strategy="steps", **common))
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-5"
    assert (ckpt / "optimizer.pt").is_file()

    # the checkpoint itself holds MicroAdam's compact dtypes, loadable with weights_only=True
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    for state in saved["state"].values():
        for key, dtype in MICROADAM_STATE_DTYPES.items():
            assert state[key].dtype == dtype, key

    probe = _StateDtypesAtTrainBegin()
    resumed = Trainer(model=tiny_llama(seed=1), train_dataset=data, callbacks=[probe],
                      args=training_args(tmp_path / "resumed", **common))
    cb = hco.add_memory_callback(resumed)
    resumed.train(resume_from_checkpoint=str(ckpt))

    assert resumed.state.global_step == full.state.global_step == 10
    # the loaded state kept its dtypes (torch's load_state_dict would cast it to fp32)
    assert probe.n_states == len(list(resumed.model.parameters()))
    assert probe.errors == []
    assert cb.train_begin_report["optimizer_state_bytes"] == \
        hco.optimizer_memory_report(full.optimizer)["optimizer_state_bytes"]
    assert state_dtype_errors(resumed.optimizer) == []

    full_params = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, full_params[name]), name
    opt_full, opt_res = inner_optimizer(full.optimizer), inner_optimizer(resumed.optimizer)
    for p_full, p_res in zip(full.model.parameters(), resumed.model.parameters()):
        s_full, s_res = opt_full.state[p_full], opt_res.state[p_res]
        for key in MICROADAM_STATE_DTYPES:
            assert torch.equal(s_full[key], s_res[key]), key
    # the history restored from the checkpoint plus the resumed steps: identical losses
    assert losses(resumed) == losses(full)


# ---------------------------------------------------------------------- plain accelerate
def _batches(n_steps, batch_size=8, seed=0):
    ids = torch.tensor(token_ids(n_steps * batch_size, 16, seed))
    return [ids[i * batch_size:(i + 1) * batch_size] for i in range(n_steps)]


def test_accelerate_loop_trains_and_keeps_dtypes():
    model = tiny_llama()
    opt = hco.MicroAdam(model.parameters(), lr=3e-3, density=0.05)
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    assert isinstance(opt, AcceleratedOptimizer)
    assert not inner_optimizer(opt).state  # lazy: nothing for prepare's round trip to damage
    batches = _batches(4)
    history = []
    for epoch in range(5):
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            history.append(loss.item())
    assert mean(history[-4:]) < mean(history[:4]) - 0.1, history
    assert state_dtype_errors(opt) == []
    assert all(int(s["step"]) == 20 for s in inner_optimizer(opt).state.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerate_prepare_after_state_exists(dtype):
    """``prepare`` runs state_dict() -> load_state_dict(); torch would cast int16/uint8/bf16 state
    to the parameter dtype (and bf16 cannot hold indices above 256)."""
    model = tiny_llama().to(dtype)
    opt = hco.MicroAdam(model.parameters(), lr=3e-3, density=0.05, window_size=3)
    (ids,) = _batches(1)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    before = {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
              for i, s in enumerate(opt.state.values())}
    assert max(int(s["window_indices"].max()) for s in before.values()) > 256
    model_ref = [p.detach().clone() for p in model.parameters()]

    accelerator = Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    assert state_dtype_errors(prepared) == []
    for i, state in enumerate(inner_optimizer(prepared).state.values()):
        for key, value in before[i].items():
            assert state[key].dtype == value.dtype, key
            assert torch.equal(state[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_ref))

    # and it keeps training with the restored state
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    prepared.step()
    prepared.zero_grad()
    assert state_dtype_errors(prepared) == []
    assert all(int(s["step"]) == 3 for s in inner_optimizer(prepared).state.values())
    assert all(p.dtype == dtype for p in model.parameters())
