"""LoRA: finetune a large model by training a small low-rank correction to its weights.

Finetuning every weight of a model means storing a full copy of it per task and keeping AdamW's two
moments for every parameter while training. Hu et al. (2021) observed that the *change* a finetune
makes to a weight matrix has low intrinsic rank. LoRA therefore freezes the pretrained weight
``W`` (``out x in``) and learns the change as a product of two thin matrices:

    W' = W + (alpha / rank) * B @ A        A: (rank, in),  B: (out, rank)

A layer of ``in * out`` weights then trains only ``rank * (in + out)`` numbers; for GPT-2 small's
768 x 768 projections at rank 8 that is 12,288 instead of 589,824 (2%). ``B`` starts at zero, so
the wrapped model computes exactly what the base model computes until training moves it; ``A``
starts random (Kaiming-uniform, as ``nn.Linear`` initialises its weight) so that the gradient of
``B`` is not zero too. ``alpha / rank`` scales the update so that ``alpha`` can be set once: Hu et
al. found that with this scaling, fewer hyperparameters need retuning when the rank changes.

After training, ``merge_lora`` folds ``B @ A`` into ``W``: the model is again a plain model with no
extra cost at inference. ``unmerge_lora`` subtracts it back out, to continue training or to swap
adapters.
"""

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from src.errors import UserError


# --8<-- [start:lora_linear]
def check_rank(rank: int) -> None:
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank}")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / rank) * B @ A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        check_rank(rank)
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))  # (rank, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, rank)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        out = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return out
        # Two thin matmuls, never the full (out, in) product: (..., in) -> (..., rank) -> (..., out).
        return out + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.scaling * (self.lora_B @ self.lora_A)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.scaling * (self.lora_B @ self.lora_A)
            self.merged = False


# --8<-- [end:lora_linear]


# --8<-- [start:apply_lora]
def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: Sequence[str] | None = None
) -> list[str]:
    """Freeze ``model`` and wrap its Linear layers with ``LoRALinear``, in place.

    ``targets`` selects the layers by name: a Linear is wrapped when its qualified name (for example
    ``trf_blocks.3.att.W_query``) equals a target or ends with ``"." + target``. ``None`` wraps
    every Linear layer. Afterwards only the LoRA matrices are trainable; a caller that wants another
    module to train fully (a new classification head, say) sets its ``requires_grad`` afterwards.
    Returns the names of the wrapped layers.
    """
    check_rank(rank)
    model.requires_grad_(False)

    def selected(name: str) -> bool:
        return targets is None or any(name == t or name.endswith("." + t) for t in targets)

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and selected(n)]
    if not names:
        raise ValueError(f"no Linear layer of the model matches the LoRA targets {targets}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight: the model then costs what the base costs."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged LoRA update back out of its base weight."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()


def merged_model(model: nn.Module) -> nn.Module:
    """A plain copy of ``model``: every LoRA update folded into its weight and every wrapper replaced
    by that Linear layer. It loads wherever the base model loads; ``model`` is left as it was."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent_name), child, module.base)
    return plain


# --8<-- [end:apply_lora]


# --8<-- [start:lora_count]
def lora_parameter_count(model: nn.Module) -> int:
    """Numbers in the LoRA matrices: what an adapter trains and what it needs to store."""
    return sum(
        m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear)
    )


# --8<-- [end:lora_count]
