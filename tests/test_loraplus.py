"""LoRA+ builds several groups (some empty) with their own lr and calls our class directly."""

import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from hf_compressed_optim import MicroAdam


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.relu(self.q_proj(x)))


def test_loraplus_groups_with_microadam():
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["q_proj"]))
    opt = create_loraplus_optimizer(model, MicroAdam, lr=1e-2, loraplus_lr_ratio=16,
                                    density=0.5, window_size=4)
    assert isinstance(opt, MicroAdam)
    lrs = sorted({g["lr"] for g in opt.param_groups if g["params"]})
    assert lrs == [1e-2, 0.16]
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    b = [p for n, p in model.named_parameters() if "lora_B" in n][0]
    assert b.abs().sum() > 0  # B starts at zero: it moved with its own (16x) lr
