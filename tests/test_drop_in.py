"""Switching only ``optim=`` from AdamW: the learning rate carries over, Shampoo preconditions
within the run, EFCP's defaults fit AdamW's memory, bad optim_args fail at once (issue 16)."""

from __future__ import annotations

import math

import pytest
import torch

import hf_compressed_optim as hco
from hf_compressed_optim.efcp.config import ADAM_UPDATE_RMS
from _hf_utils import load_recipe

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

lr_transfer = load_recipe("benchmarks.lr_transfer")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OURS = ("microadam", "shampoo_4bit", "shampoo_32bit", "efcp_mfac", "efcp_ggt")


# ---------------------------------------------------------------------- learning rate
def _check_transfer(grid: tuple[float, ...]) -> dict:
    out = lr_transfer.sweep(lr_transfer.MLPTask(), ("adamw", *OURS), grid, steps=100)
    adam_best = out["summary"]["adamw"]["best"]
    for name in OURS:
        s = out["summary"][name]
        assert s["at_adam_lr"] <= 1.15 * s["best"], (name, out["adam_lr"], out["losses"][name])
        assert s["best"] <= 3 * adam_best, (name, out["losses"][name], adam_best)
    return out


def test_adamw_learning_rate_carries_over():
    """At the lr best for AdamW on a small task, every optimizer of ours, built from
    TrainingArguments with no optim_args, lands within 15% of its own best (and trains: its
    best is within 3x AdamW's). Here AdamW's best and its neighbours a factor sqrt(10) away;
    the wide sweep below is the slow version. With the papers' raw EFCP steps (lr/damp)
    AdamW's lr diverges."""
    out = _check_transfer((1e-2, 10 ** -1.5, 1e-1))
    assert out["adam_lr"] == 10 ** -1.5  # AdamW's best is inside the grid


@pytest.mark.slow
def test_adamw_learning_rate_carries_over_wide_sweep():
    """The same over 1e-3 ... 1 (BENCHMARKS.md, "Switching from AdamW")."""
    _check_transfer(tuple(10 ** (e / 2) for e in range(-6, 1)))


@pytest.mark.parametrize("cls", [hco.SparseMFAC, hco.SparseGGT])
def test_efcp_step_has_adam_rms_whatever_the_gradient_scale(cls):
    """lr_mode="adam" (default): a step moves each tensor by lr * ADAM_UPDATE_RMS in RMS, for
    tiny and huge gradients alike; lr_mode="raw" scales with the gradient (lr/damp)."""
    for scale in (1e-6, 1.0, 1e3):
        for mode in ("adam", "raw"):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(64, 48))
            before = p.detach().clone()
            opt = cls([p], lr=1e-3, lr_mode=mode, density=0.1)
            p.grad = torch.randn(64, 48) * scale
            opt.step()
            rms = float((p.detach() - before).pow(2).mean().sqrt())
            if mode == "adam":
                assert rms == pytest.approx(1e-3 * ADAM_UPDATE_RMS, rel=1e-4), scale
            elif scale == 1.0:
                assert not math.isclose(rms, 1e-3 * ADAM_UPDATE_RMS, rel_tol=0.5)


# ---------------------------------------------------------------------- EFCP memory
def _main_job_model():
    from recipes.finetune_llama import ModelDataArguments, build_model_and_tokenize

    model, _ = build_model_and_tokenize(ModelDataArguments(), seed=0)
    return model


@pytest.mark.parametrize("name", ["efcp_mfac", "efcp_ggt"])
def test_efcp_defaults_fit_adamw_memory_on_the_main_job_model(name):
    model = _main_job_model()
    params = list(model.parameters())
    args = TrainingArguments("out", optim=name, max_steps=300, report_to="none", use_cpu=True)
    cls, kwargs = hco.optimizer_cls_and_kwargs(name, args)
    opt = cls(params, **kwargs)
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    per_param = hco.optimizer_memory_report(opt)["optimizer_state_bytes_per_param"]
    assert per_param <= 8.0, per_param  # AdamW: 8


# ---------------------------------------------------------------------- Shampoo schedule
def _shampoo_vs_adamw(steps: int, **options) -> bool:
    """Whether Shampoo moved a matrix parameter differently from AdamW in ``steps`` steps."""
    torch.manual_seed(0)
    start = torch.randn(24, 16)
    grads = [torch.randn(24, 16) for _ in range(steps)]
    out = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
                 lambda ps: hco.Shampoo(ps, lr=1e-2, min_quant_size=0, **options)):
        p = torch.nn.Parameter(start.clone())
        opt = make([p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
    return not torch.equal(out[0], out[1])


def test_shampoo_preconditions_within_a_short_trainer_run():
    """The Trainer's max_steps reaches Shampoo as total_steps: a 30-step run preconditions
    (the paper's T2 = 500 would leave it AdamW bit for bit)."""
    args = TrainingArguments("out", optim="shampoo_4bit", max_steps=30, report_to="none",
                             use_cpu=True)
    _, kwargs = hco.optimizer_cls_and_kwargs("shampoo_4bit", args)
    assert kwargs["total_steps"] == 30
    opt = hco.Shampoo([torch.nn.Parameter(torch.zeros(24, 16))], **kwargs)
    assert opt.intervals(opt.param_groups[0]) == (1, 3, True)
    assert _shampoo_vs_adamw(30, total_steps=30)
    assert not _shampoo_vs_adamw(30, stat_update_interval=100, root_update_interval=500)


def test_shampoo_plain_pytorch_default_preconditions_from_the_first_statistics_update():
    opt = hco.Shampoo([torch.nn.Parameter(torch.zeros(24, 16))])
    group = opt.param_groups[0]
    assert opt.intervals(group) == (100, 500, True)
    assert opt.schedule(group, 99) == (False, False, False)
    assert opt.schedule(group, 100) == (True, True, True)    # early root refresh
    assert opt.schedule(group, 300) == (True, True, True)
    assert opt.schedule(group, 600) == (True, False, True)   # then every T2
    explicit = hco.Shampoo([torch.nn.Parameter(torch.zeros(24, 16))], T1=100, T2=500)
    assert explicit.schedule(explicit.param_groups[0], 100) == (True, False, False)  # the paper's


# ---------------------------------------------------------------------- optim_args checked early
@pytest.mark.parametrize("optim,optim_args,fragment", [
    ("efcp_mfac", "window_size", "'window_size' is not of the form key=value"),
    ("efcp_mfac", "window_size=0", "window_size must be an integer in [1, 8192]"),
    ("microadam", "bogus=1", "unknown optim_args key 'bogus'"),
    ("shampoo_4bit", "T1=-1", "stat_update_interval"),
])
def test_optim_args_checked_when_training_arguments_are_created(optim, optim_args, fragment):
    with pytest.raises(ValueError) as err:
        TrainingArguments("out", optim=optim, optim_args=optim_args, report_to="none",
                          use_cpu=True)
    assert fragment in str(err.value)
    parser = HfArgumentParser(TrainingArguments)
    with pytest.raises(ValueError, match="optim_args"):
        parser.parse_args_into_dataclasses(["--output_dir", "out", "--optim", optim,
                                            "--optim_args", optim_args, "--report_to", "none"])


# ---------------------------------------------------------------------- the main job's CLI
def test_main_job_cli_bf16_on_cpu_and_help_shows_defaults_and_our_names(capsys):
    from recipes import finetune_llama

    if finetune_llama.accelerator_available():
        pytest.skip("checks the CPU-only default of --use_cpu")
    _, targs = finetune_llama.parse_args(["--bf16", "--output_dir", "out"])
    assert targs.bf16 and targs.use_cpu
    with pytest.raises(SystemExit):
        finetune_llama.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    options = [chunk for chunk in text.split("\n  --")[1:]]
    assert options and all("default" in chunk for chunk in options), \
        [c.split()[0] for c in options if "default" not in c]
    optim_help = text[text.index("\n  --optim "):text.index("\n  --optim_args")]
    for name in OURS:
        assert optim_help.count(name) >= 2, name  # in the choices and in the help text
