"""optim="microadam" registration, optim_args typing and the patch-free routes (CPU, fast)."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch

import hf_compressed_optim as hco
from hf_compressed_optim.integrations import transformers as hco_tf
from hf_compressed_optim.core.config import (
    OptimizerConfig, option, parse_bool, split_optim_args,
)

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402
from transformers.utils.generic import ExplicitEnum  # noqa: E402

from _hf_utils import lm_dataset, tiny_llama, training_args  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- the enum member
MEMBERS = [pytest.param("adamw_torch", "ADAMW_TORCH", id="native"),
           pytest.param("microadam", "MICROADAM", id="ours")]


@pytest.mark.parametrize("value,name", MEMBERS)
def test_member_behaves_like_native(value, name):
    member = OptimizerNames(value)
    assert member is OptimizerNames[name] is getattr(OptimizerNames, name)
    assert type(member) is OptimizerNames
    assert isinstance(member, str) and isinstance(member, OptimizerNames)
    assert member.name == name and member.value == value
    assert member == value and value == member and member != value + "x"
    assert member in OptimizerNames
    assert member in list(OptimizerNames)
    assert OptimizerNames.__members__[name] is member
    assert {member: 1}[OptimizerNames(value)] == 1
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    assert f"{member.value}" == value
    # same str()/repr() conventions as the native members
    native = OptimizerNames.ADAMW_TORCH
    assert str(member).replace(name, "X") == str(native).replace("ADAMW_TORCH", "X")
    assert repr(member).replace(name, "X").replace(value, "x") == \
        repr(native).replace("ADAMW_TORCH", "X").replace("adamw_torch", "x")


def test_enum_iteration_and_len_consistent():
    members = list(OptimizerNames)
    assert len(OptimizerNames) == len(members) == len(OptimizerNames._member_names_)
    assert len({m.value for m in members}) == len(members)
    assert OptimizerNames.MICROADAM in members
    assert members.index(OptimizerNames.MICROADAM) == OptimizerNames.MICROADAM._sort_order_
    assert "microadam" in [m.value for m in OptimizerNames]
    assert hco_tf.is_registered("microadam") and not hco_tf.is_registered("nope")


def test_unknown_name_still_rejected():
    with pytest.raises(ValueError, match="not a valid OptimizerNames.*microadam"):
        OptimizerNames("microadamx")


def test_training_arguments_accept_name(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="microadam", use_cpu=True,
                             report_to=[])
    assert args.optim is OptimizerNames.MICROADAM
    assert json.loads(args.to_json_string())["optim"] == "microadam"
    assert pickle.loads(pickle.dumps(args)).optim is OptimizerNames.MICROADAM
    args.set_optimizer(name="microadam", learning_rate=1e-3)
    assert args.optim is OptimizerNames.MICROADAM and args.learning_rate == 1e-3


def test_hf_argument_parser_cli(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "microadam", "--optim_args", "window_size=4",
         "--use_cpu", "--report_to", "none"])
    assert args.optim is OptimizerNames.MICROADAM
    assert args.optim_args == "window_size=4"
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is hco.MicroAdam and kwargs["window_size"] == 4
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "nope"])


def test_register_twice_is_harmless():
    import transformers.trainer_optimizer as trainer_optimizer

    names_before = list(OptimizerNames._member_names_)
    handler_before = trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames.MICROADAM]
    original_static = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    expected = [OptimizerNames(name) for name in hco_tf.HANDLERS]
    assert [m.value for m in expected] == ["microadam", "shampoo_4bit", "shampoo_32bit",
                                           "efcp_mfac", "efcp", "efcp_ggt"]
    for _ in range(2):
        members = hco.register()
        assert members == expected
        assert all(a is b for a, b in zip(members, expected))
    assert OptimizerNames._member_names_ == names_before
    assert OptimizerNames._member_names_.count("MICROADAM") == 1
    assert trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames.MICROADAM] is handler_before
    # transformers >= 5.2: dispatch goes through the handler table, Trainer is not patched
    assert Trainer.__dict__["get_optimizer_cls_and_kwargs"] is original_static
    assert not getattr(Trainer.get_optimizer_cls_and_kwargs, hco_tf.WRAPPER_MARK, False)


def test_register_unknown_name():
    with pytest.raises(ValueError, match="no handler"):
        hco.register(["not_an_optimizer"])


# ---------------------------------------------------------------------- shim internals
def _fresh_enum():
    class Names(ExplicitEnum):
        ADAMW_TORCH = "adamw_torch"
        SGD = "sgd"

    return Names


def test_ensure_member_on_fresh_enum():
    Names = _fresh_enum()
    member = hco_tf.ensure_member(Names, "microadam")
    assert Names("microadam") is member is Names.MICROADAM is Names["MICROADAM"]
    assert list(Names) == [Names.ADAMW_TORCH, Names.SGD, member] and len(Names) == 3
    assert member == "microadam" and member in Names and member._sort_order_ == 2
    assert hco_tf.ensure_member(Names, "microadam") is member
    assert len(Names) == 3
    with pytest.raises(ValueError, match="not a valid Names"):
        Names("other")
    # a plain attribute (the naive approach) would not be a member; ours is
    assert Names.__members__["MICROADAM"] is member


def test_ensure_member_name_clash():
    class Names(ExplicitEnum):
        MICROADAM = "something_else"

    with pytest.raises(hco_tf.RegistrationError, match="already exists"):
        hco_tf.ensure_member(Names, "microadam")


class _Args:
    def __init__(self, optim, **kw):
        self.optim = optim
        self.learning_rate = kw.get("learning_rate", 1e-3)
        self.adam_beta1, self.adam_beta2, self.adam_epsilon = 0.8, 0.9, 1e-6
        self.weight_decay = 0.0
        self.optim_args = kw.get("optim_args")


def test_fallback_wrapper_for_old_transformers():
    """transformers < 5.2 has no handler table: the staticmethod is wrapped exactly once."""
    Names = _fresh_enum()
    calls = []

    class OldTrainer:
        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            calls.append(args.optim)
            if args.optim == "sgd":
                return torch.optim.SGD, {"lr": args.learning_rate}
            raise ValueError(f"Trainer cannot instantiate unsupported optimizer: {args.optim}")

    original = OldTrainer.__dict__["get_optimizer_cls_and_kwargs"].__func__
    for _ in range(3):
        hco_tf.register_into(Names, None, OldTrainer, ["microadam"])
    static = OldTrainer.__dict__["get_optimizer_cls_and_kwargs"]
    assert isinstance(static, staticmethod)
    wrapper = static.__func__
    assert getattr(wrapper, hco_tf.WRAPPER_MARK)
    assert wrapper.__wrapped_original__ is original  # not a wrapper of a wrapper
    assert list(Names).count(Names.MICROADAM) == 1

    cls, kwargs = OldTrainer.get_optimizer_cls_and_kwargs(
        _Args(Names("microadam"), optim_args="window_size=3"))
    assert cls is hco.MicroAdam
    assert kwargs == {"lr": 1e-3, "betas": (0.8, 0.9), "eps": 1e-6, "window_size": 3}
    assert calls == []
    assert OldTrainer().get_optimizer_cls_and_kwargs(_Args(Names.SGD))[0] is torch.optim.SGD
    assert calls == [Names.SGD]
    with pytest.raises(ValueError, match="unsupported optimizer"):
        OldTrainer.get_optimizer_cls_and_kwargs(_Args("adamw_torch"))


def test_detection_failure_points_to_patch_free_route():
    class NotAnEnum:
        pass

    with pytest.raises(hco_tf.RegistrationError, match="optimizer_cls_and_kwargs"):
        hco_tf.register_into(NotAnEnum, {}, None)
    with pytest.raises(hco_tf.RegistrationError, match="optimizer_cls_and_kwargs"):
        hco_tf.register_into(_fresh_enum(), None, None)

    class NoStatic:
        pass

    with pytest.raises(hco_tf.RegistrationError, match="optimizer_cls_and_kwargs"):
        hco_tf.install_dispatch_wrapper(NoStatic)


def test_register_into_handler_table():
    Names = _fresh_enum()
    table = {Names.SGD: object()}
    hco_tf.register_into(Names, table, None, ["microadam"])
    hco_tf.register_into(Names, table, None, ["microadam"])
    assert set(table) == {Names.SGD, Names.MICROADAM}
    cls, kwargs = table[Names.MICROADAM](hco_tf.make_context(_Args(Names.MICROADAM)))
    assert cls is hco.MicroAdam and kwargs["betas"] == (0.8, 0.9)


# ---------------------------------------------------------------------- optim_args typing
def _build(optim_args, base=None, config=hco.MicroAdamConfig, name="microadam"):
    """Constructor kwargs as the Trainer handler builds them."""
    return config.trainer_kwargs(name, hco_tf._optim_args_dict(optim_args), base or {})


def test_optim_args_typed():
    parsed = _build(
        "window_size=20, density=0.02,quant_block_size=128,topk_block_size=4096,"
        "stochastic_rounding=Yes,seed=7,nonfinite=RAISE,beta1=0.8,beta2=0.95,eps=1e-7,"
        "weight_decay=0.01")
    assert parsed == {"window_size": 20, "density": 0.02, "quant_block_size": 128,
                      "topk_block_size": 4096, "stochastic_rounding": True, "seed": 7,
                      "nonfinite": "raise", "betas": (0.8, 0.95), "eps": 1e-7,
                      "weight_decay": 0.01}
    for key, typ in [("window_size", int), ("density", float), ("stochastic_rounding", bool),
                     ("seed", int), ("nonfinite", str), ("eps", float)]:
        assert type(parsed[key]) is typ, key
    kwargs = _build("beta2=0.95,m=5,k_init=0.1", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8})
    assert kwargs == {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "window_size": 5,
                      "density": 0.1}
    assert _build(None) == {} and _build("") == {}
    assert _build({"m": "3"}) == {"window_size": 3}
    assert split_optim_args("a=1,,b=2,") == [("a", "1"), ("b", "2")]


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("YES", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("No", False),
])
def test_bool_values(text, expected):
    assert parse_bool("k", text) is expected
    assert _build(f"stochastic_rounding={text}") == {"stochastic_rounding": expected}


@pytest.mark.parametrize("optim_args,key,fragment", [
    ("window_sz=4", "window_sz", "valid keys"),
    ("betas=0.9", "betas", "beta1"),
    ("window_size=2.5", "window_size", "integer"),
    ("window_size=abc", "window_size", "integer"),
    ("seed=", "seed", "integer"),
    ("density=lots", "density", "number"),
    ("eps=nan", "eps", "finite"),
    ("stochastic_rounding=maybe", "stochastic_rounding", "true/false"),
    ("stochastic_rounding=False2", "stochastic_rounding", "true/false"),
    ("nonfinite=ignore", "nonfinite", "skip"),
    ("m=4,window_size=8", "window_size", "twice"),
    ("density=0.1,density=0.2", "density", "twice"),
    ("window_size", "window_size", "key=value"),
    ("window_size=1=2", "window_size", "key=value"),
])
def test_optim_args_parse_errors(optim_args, key, fragment):
    with pytest.raises(ValueError) as info:
        _build(optim_args, {"lr": 1e-3})
    assert key in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("optim_args,key,fragment", [
    ("window_size=0", "window_size", "[1, 4096]"),
    ("m=5000", "'m'", "window_size"),
    ("density=0", "density", "(0.0, 1.0]"),
    ("k_init=1.5", "'k_init'", "density"),
    ("quant_block_size=3", "quant_block_size", "even"),
    ("topk_block_size=40000", "topk_block_size", "32768"),
    ("seed=-1", "seed", "[0, "),
    ("beta1=1.0", "beta1", "betas[0]"),
    ("beta2=-0.1", "beta2", "betas[1]"),
    ("eps=0", "eps", "eps"),
    ("weight_decay=-1", "weight_decay", "weight_decay"),
])
def test_optim_args_range_errors_from_constructor(optim_args, key, fragment):
    with pytest.raises(ValueError) as info:
        _build(optim_args, {"lr": 1e-3, "betas": (0.9, 0.999)})
    msg = str(info.value)
    assert key in msg and fragment in msg, msg


def test_unknown_key_lists_valid_choices():
    with pytest.raises(ValueError) as info:
        _build("foo=1")
    msg = str(info.value)
    for key in ("window_size", "density", "stochastic_rounding", "skip|raise", "beta1", "m",
                "k_init"):
        assert key in msg


def test_config_declares_everything_once():
    """A new optimizer's config gets constructor checks, optim_args parsing and the README table
    from its one declaration."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ToyConfig(OptimizerConfig):
        lr: float = option(0.1, "step size", lo=0.0)
        rank: int = option(4, "rank", lo=1, aliases=("r",))
        mode: str = option("a", "mode", choices=("a", "b"))

    assert _build("r=8,mode=B", {"lr": 1.0}, ToyConfig, "toy") == {"lr": 1.0, "rank": 8,
                                                                   "mode": "b"}
    with pytest.raises(ValueError, match="'rank'.*rank must be an integer in \\[1, inf\\]"):
        _build("rank=0", None, ToyConfig, "toy")
    with pytest.raises(ValueError, match="rank must be an integer in"):
        ToyConfig(rank=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        ToyConfig.from_options({"foo": 1})
    table = ToyConfig.markdown_table()
    assert "| `rank`, `r` | `4` | int in [1, inf] | rank |" in table
    assert "`a` / `b`" in table


def test_readme_tables_match_the_configs():
    """The README's option tables are generated from the configs (no third declaration)."""
    import pathlib

    import os
    import re

    path = pathlib.Path(__file__).parents[1] / "README.md"
    readme = path.read_text()
    for config in (hco.MicroAdamConfig, hco.ShampooConfig, hco.SparseMFACConfig,
                   hco.SparseGGTConfig):
        block = re.compile(rf"(<!-- options: {config.__name__} .*?-->\n).*?(<!-- end options -->)",
                           re.S)
        assert block.search(readme), config.__name__
        if os.environ.get("HCO_WRITE_README") == "1":  # regenerate the tables
            readme = block.sub(lambda m: m.group(1) + config.markdown_table() + "\n" + m.group(2),
                               readme)
            path.write_text(readme)
        assert f"-->\n{config.markdown_table()}\n<!-- end options -->" in readme, config.__name__


# ---------------------------------------------------------------------- the handler via Trainer
def _trainer(tmp_path, model=None, **arg_overrides):
    args = training_args(tmp_path, **arg_overrides)
    return Trainer(model=model or tiny_llama(), args=args, train_dataset=lm_dataset(16))


def test_handler_maps_training_arguments(tmp_path):
    trainer = _trainer(tmp_path, optim="microadam", learning_rate=2e-3, adam_beta1=0.8,
                       adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1,
                       optim_args="window_size=4,density=0.05,stochastic_rounding=true,"
                                  "nonfinite=raise,seed=3")
    opt = trainer.create_optimizer()
    assert type(opt) is hco.MicroAdam
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and no_decay["params"]  # LLaMA norms are in the no-decay group
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    for group in opt.param_groups:
        assert group["lr"] == 2e-3
        assert group["betas"] == (0.8, 0.95)
        assert group["eps"] == 1e-7
        assert group["window_size"] == 4 and type(group["window_size"]) is int
        assert group["density"] == 0.05
        assert group["stochastic_rounding"] is True
    assert opt.nonfinite == "raise" and opt.config.seed == 3
    n_params = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params


def test_handler_optim_args_override_adam_args(tmp_path):
    trainer = _trainer(tmp_path, optim="microadam", adam_beta1=0.8, adam_epsilon=1e-7,
                       optim_args="beta1=0.7,eps=1e-5")
    opt = trainer.create_optimizer()
    assert opt.param_groups[0]["betas"] == (0.7, trainer.args.adam_beta2)
    assert opt.param_groups[0]["eps"] == 1e-5


def test_handler_warns_about_weight_decay_in_optim_args(tmp_path):
    trainer = _trainer(tmp_path, optim="microadam", weight_decay=0.1,
                       optim_args="weight_decay=0.5")
    with pytest.warns(UserWarning, match="weight_decay"):
        opt = trainer.create_optimizer()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("optim_args,key", [
    ("window_size=0", "window_size"), ("stochastic_rounding=maybe", "stochastic_rounding"),
    ("foo=1", "foo"), ("density=x", "density"), ("beta2=1.5", "beta2"),
])
def test_handler_errors_name_the_key(tmp_path, optim_args, key):
    with pytest.raises(ValueError, match=key):  # raised as TrainingArguments are created
        _trainer(tmp_path, optim="microadam", optim_args=optim_args).create_optimizer()


def test_handler_rejects_bad_learning_rate(tmp_path):
    with pytest.raises(ValueError, match="lr"):
        _trainer(tmp_path, optim="microadam", learning_rate=-1.0).create_optimizer()


# ---------------------------------------------------------------------- patch-free routes
def test_optimizer_cls_and_kwargs_reads_arguments(tmp_path):
    args = training_args(tmp_path, learning_rate=4e-3, weight_decay=0.05, adam_beta1=0.85,
                         adam_beta2=0.98, adam_epsilon=1e-6, optim_args="m=6,density=0.1")
    assert args.optim != "microadam"
    cls, kwargs = hco.optimizer_cls_and_kwargs("microadam", args)
    assert cls is hco.MicroAdam
    assert kwargs == {"lr": 4e-3, "betas": (0.85, 0.98), "eps": 1e-6, "window_size": 6,
                      "density": 0.1, "weight_decay": 0.05}
    cls, kwargs = hco.optimizer_cls_and_kwargs(OptimizerNames.MICROADAM, args, lr=1e-2,
                                               window_size="3", beta2=0.9,
                                               stochastic_rounding="yes")
    assert kwargs["lr"] == 1e-2 and kwargs["window_size"] == 3
    assert kwargs["betas"] == (0.85, 0.9) and kwargs["stochastic_rounding"] is True
    cls, kwargs = hco.optimizer_cls_and_kwargs("microadam", args, betas=(0.5, 0.6))
    assert kwargs["betas"] == (0.5, 0.6)


def test_optimizer_cls_and_kwargs_errors(tmp_path):
    args = training_args(tmp_path, optim_args="window_size=2")
    with pytest.raises(ValueError, match="unknown optimizer"):
        hco.optimizer_cls_and_kwargs("adamw9", args)
    with pytest.raises(ValueError, match="bogus"):
        hco.optimizer_cls_and_kwargs("microadam", args, bogus=1)
    with pytest.raises(ValueError, match="density"):
        hco.optimizer_cls_and_kwargs("microadam", args, density=2.0)
    with pytest.raises(ValueError, match="given twice"):
        hco.optimizer_cls_and_kwargs(
            "microadam", training_args(tmp_path, optim_args="m=2,m=3"))


def test_optimizer_cls_and_kwargs_with_trainer(tmp_path):
    args = training_args(tmp_path, max_steps=3, learning_rate=3e-3, weight_decay=0.1,
                         optim_args="window_size=2")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(24),
                      optimizer_cls_and_kwargs=hco.optimizer_cls_and_kwargs("microadam", args))
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert type(opt) is hco.MicroAdam
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["window_size"] == 2
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {3}


# ---------------------------------------------------------------------- the mixin
def test_mixin_dispatch_and_callback(tmp_path):
    class MyTrainer(hco.CompressedTrainerMixin, Trainer):
        pass

    trainer = MyTrainer(model=tiny_llama(), args=training_args(tmp_path, optim="microadam"),
                        train_dataset=lm_dataset(8))
    assert isinstance(trainer.callback_handler.callbacks[0], hco.OptimizerMemoryCallback)
    assert type(trainer.create_optimizer()) is hco.MicroAdam
    cls, _ = MyTrainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="sgd"))
    assert cls is torch.optim.SGD
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(
        training_args(tmp_path, optim="microadam", optim_args="m=2"))
    assert cls is hco.MicroAdam and kwargs["window_size"] == 2


def test_mixin_defers_to_next_class_in_mro(tmp_path):
    sentinel = object()

    class Middle(Trainer):
        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            return sentinel, {"model": model}

    class MyTrainer(hco.CompressedTrainerMixin, Middle):
        memory_callback = False

    assert MyTrainer.get_optimizer_cls_and_kwargs(training_args(tmp_path), "m") == \
        (sentinel, {"model": "m"})
    cls, _ = MyTrainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="microadam"))
    assert cls is hco.MicroAdam
    trainer = MyTrainer(model=tiny_llama(), args=training_args(tmp_path))
    assert not any(isinstance(cb, hco.OptimizerMemoryCallback)
                   for cb in trainer.callback_handler.callbacks)


# ---------------------------------------------------------------------- the callback helper
def test_add_memory_callback_front_and_idempotent(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, optim="microadam"),
                      callbacks=[hco.OptimizerMemoryCallback()])
    n = len(trainer.callback_handler.callbacks)
    assert not isinstance(trainer.callback_handler.callbacks[0], hco.OptimizerMemoryCallback)
    cb = hco.add_memory_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    assert hco.add_memory_callback(trainer) is cb
    assert len(trainer.callback_handler.callbacks) == n
    assert sum(isinstance(c, hco.OptimizerMemoryCallback)
               for c in trainer.callback_handler.callbacks) == 1
    with pytest.raises(TypeError):
        hco.add_memory_callback(object())


def test_memory_callback_without_optimizer_is_quiet():
    cb = hco.OptimizerMemoryCallback()
    logs = {"loss": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_log(None, None, None, logs=logs, optimizer=None)
        cb.on_train_begin(None, None, None, optimizer=None)
    assert logs == {"loss": 1.0} and cb.train_begin_report is None


# ---------------------------------------------------------------------- import-time registration
def test_import_survives_failed_registration(monkeypatch):
    import importlib

    def broken(names=None):
        raise hco_tf.RegistrationError("simulated: no OptimizerNames")

    monkeypatch.setattr(hco, "register", hco.register)  # restored after the reloads
    monkeypatch.setattr(hco_tf, "register", broken)
    monkeypatch.delenv("HF_COMPRESSED_OPTIM_NO_REGISTER", raising=False)
    with pytest.warns(RuntimeWarning, match="optimizer_cls_and_kwargs"):
        importlib.reload(hco)
    assert hco.MicroAdam is hco_tf.config_handler("microadam")(
        hco_tf.make_context(_Args("microadam")))[0]
    monkeypatch.setenv("HF_COMPRESSED_OPTIM_NO_REGISTER", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(hco)  # opted out: register() is not even called


def test_add_optimizer_registry(monkeypatch):
    monkeypatch.setattr(hco_tf, "HANDLERS", dict(hco_tf.HANDLERS))
    monkeypatch.setattr(hco_tf, "_REGISTERED", set())  # do not touch the real enum

    def handler(ctx):
        return torch.optim.SGD, {"lr": ctx.optimizer_kwargs["lr"]}

    hco_tf.add_optimizer("Toy_SGD", handler)
    assert hco_tf.HANDLERS["toy_sgd"] is handler
    Names = _fresh_enum()
    table = {}
    hco_tf.register_into(Names, table, None)
    assert set(table) == {Names(name) for name in hco_tf.HANDLERS}
    assert Names.TOY_SGD in table and Names.MICROADAM in table
    assert table[Names.TOY_SGD](hco_tf.make_context(_Args("toy_sgd"))) == \
        (torch.optim.SGD, {"lr": 1e-3})
    with pytest.raises(ValueError, match="registered"):
        hco_tf.add_optimizer("no_schema_here")


def test_constructor_takes_a_config_or_its_options():
    import inspect

    p = torch.nn.Parameter(torch.zeros(4))
    sig = inspect.signature(hco.MicroAdam)
    assert sig.parameters["window_size"].default == 10 and "density" in sig.parameters
    by_config = hco.MicroAdam([p], hco.MicroAdamConfig(window_size=4, betas=(0.8, 0.9)))
    by_alias = hco.MicroAdam([p], m=4, beta1=0.8, beta2=0.9)
    overridden = hco.MicroAdam([p], hco.MicroAdamConfig(window_size=7), m=4, beta1=0.8,
                               beta2=0.9)
    for opt in (by_config, by_alias, overridden):
        assert opt.param_groups[0]["window_size"] == 4
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match=r"window_size must be an integer in \[1, 4096\]"):
        hco.MicroAdam([p], window_size=0)
    with pytest.raises(TypeError, match="window_sz"):
        hco.MicroAdam([p], window_sz=4)
    with pytest.raises(TypeError, match="MicroAdamConfig"):
        hco.MicroAdam([p], hco.ShampooConfig())
