"""Break it, appendix "LoRA": start B random instead of zero; an alpha far too large.

Both start from the same base, the tiny model pretrained for 200 steps on the default corpus. LoRA of
rank 16 wraps every Linear layer, and 100 more steps at lr 1e-3, on the batches the base has not
seen yet, train only the LoRA matrices.
"""

import math

import torch
from torch import nn

from benchmarks.harness import markdown_table
from experiments.harness import corpus_windows, evaluate, fmt, pretrain, pretrained_tiny
from src.lora import LoRALinear, apply_lora

BASE_STEPS, LORA_STEPS = 200, 100
RANK = 16


def finetune(model: nn.Module, train_set, lr: float = 1e-3) -> list[float]:
    """``LORA_STEPS`` steps, continuing the base's run through the corpus where it stopped."""
    return pretrain(model, train_set, LORA_STEPS, lr, first_step=BASE_STEPS)


# --8<-- [start:lora-init]
def randomize_b(model: nn.Module) -> None:
    """Draw every LoRA B like A (Kaiming-uniform) instead of leaving it at zero."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            nn.init.kaiming_uniform_(module.lora_B, a=math.sqrt(5))


# --8<-- [end:lora-init]


def lora_init() -> str:
    """Wrap a briefly pretrained tiny model with LoRA, with B at zero (as built) or random."""
    train_set, val_set = corpus_windows()
    base = pretrained_tiny(BASE_STEPS)
    x = val_set.batch(torch.arange(4))[0]  # 4 validation windows, (4, T)
    with torch.no_grad():
        base_logits, base_loss = base(x), evaluate(base, val_set)
    rows = []
    for label, random_b in (("B = 0 (as built)", False), ("B random, like A", True)):
        torch.manual_seed(0)
        model = pretrained_tiny(BASE_STEPS)
        apply_lora(model, rank=RANK, alpha=RANK)
        if random_b:
            randomize_b(model)
        with torch.no_grad():
            difference = (model(x) - base_logits).abs().max().item()
        at_start = evaluate(model, val_set)
        finetune(model, train_set)
        rows.append([label, f"{difference:.2e}", fmt(at_start), fmt(evaluate(model, val_set))])
    header = ["", "max abs logit change at step 0",
              f"validation loss at step 0 (base: {base_loss:.2f})", f"after {LORA_STEPS} LoRA steps"]  # fmt: skip
    return markdown_table(header, rows)


# --8<-- [start:lora-alpha]
ALPHAS = (16, 256, 4096)  # at rank 16: an update scaled by alpha / rank = 1, 16 and 256
# --8<-- [end:lora-alpha]


def lora_alpha(alphas: tuple[float, ...] = ALPHAS) -> str:
    """LoRA finetuning of the same base at alpha/rank = 1, 16 and 256 (rank 16, same lr)."""
    train_set, val_set = corpus_windows()
    base_loss = evaluate(pretrained_tiny(BASE_STEPS), val_set)
    rows = []
    for alpha in alphas:
        torch.manual_seed(0)
        model = pretrained_tiny(BASE_STEPS)
        apply_lora(model, rank=RANK, alpha=alpha)
        losses = finetune(model, train_set)
        rows.append([f"{alpha:g}", f"{alpha / RANK:g}", fmt(max(losses[:20])),
                     fmt(sum(losses[-10:]) / 10), fmt(evaluate(model, val_set))])  # fmt: skip
    header = ["alpha (rank 16)", "scale alpha/rank", "worst loss, first 20 steps",
              "final train loss", f"validation (base: {base_loss:.2f})"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"lora-init": lora_init, "lora-alpha": lora_alpha}
