"""Break it, chapter "The GPT model": remove LayerNorm; remove the residual connections.

Both train a deeper tiny model (8 layers, ``emb_dim`` 128, 4 heads), deep enough for either piece to
matter, for 200 steps with a 20-step warmup on the default corpus.
"""

import types

import torch
from torch import nn

from benchmarks.harness import markdown_table
from experiments.harness import (
    batches,
    corpus_windows,
    mean_loss,
    next_token_loss,
    pretrain,
    tiny,
    validation,
)
from src.model import GPTModel

DEEP = tiny(n_layers=8, emb_dim=128, n_heads=4)


# --8<-- [start:no-layernorm]
def remove_layernorm(model: GPTModel) -> None:
    """Every LayerNorm becomes the identity: nothing rescales the residual stream any more."""
    for block in model.trf_blocks:
        block.norm1, block.norm2 = nn.Identity(), nn.Identity()
    model.final_norm = nn.Identity()


# --8<-- [end:no-layernorm]


def no_layernorm(rates: tuple[float, ...] = (1e-3, 1e-2), steps: int = 200) -> str:
    """An 8-layer model trained with and without LayerNorm, at a modest and a high learning rate."""
    train_set, val_set = corpus_windows()
    rows = []
    for lr in rates:
        for label, keep_norm in (("with LayerNorm", True), ("LayerNorm removed", False)):
            torch.manual_seed(0)
            model = GPTModel(DEEP)
            if not keep_norm:
                remove_layernorm(model)
            losses = pretrain(model, train_set, steps, lr, warmup=20)
            spans = [(1, 10), (41, 50), (91, 100), (steps - 9, steps)]
            rows.append([f"{lr:g}", label, *(mean_loss(losses, *span) for span in spans),
                         validation(model, losses, val_set)])  # fmt: skip
    header = ["lr", "", "loss, steps 1-10", "41-50", "91-100", f"{steps - 9}-{steps}",
              "validation loss"]  # fmt: skip
    return markdown_table(header, rows)


# --8<-- [start:no-residual]
def without_shortcut(block, x, kv_cache=None):
    """A block that replaces its input, x = ff(norm2(att(norm1(x)))), instead of adding to it."""
    x = block.att(block.norm1(x), kv_cache)
    return block.ff(block.norm2(x))


# --8<-- [end:no-residual]


def first_block_gradient(model: GPTModel, batch) -> float:
    """The gradient norm that reaches the first block's query weights on one batch."""
    next_token_loss(model)(batch).backward()
    norm = model.trf_blocks[0].att.W_query.weight.grad.norm().item()
    model.zero_grad(set_to_none=True)
    return norm


def no_residual(steps: int = 200, lr: float = 1e-3) -> str:
    """An 8-layer model trained with and without its residual connections."""
    train_set, val_set = corpus_windows()
    rows = []
    for label, residual in (("with residual connections", True), ("residuals removed", False)):
        torch.manual_seed(0)
        model = GPTModel(DEEP)
        if not residual:
            for block in model.trf_blocks:
                block.forward = types.MethodType(without_shortcut, block)
        losses = pretrain(model, train_set, steps, lr, warmup=20)
        gradient = first_block_gradient(model, batches(train_set)(steps))  # the next batch
        rows.append([label, *(mean_loss(losses, *s) for s in ((1, 10), (91, 100), (steps - 9, steps))),
                     validation(model, losses, val_set), f"{gradient:.1e}"])  # fmt: skip
    header = ["", "loss, steps 1-10", "91-100", f"{steps - 9}-{steps}", "validation loss",
              "gradient norm, first block's W_query (after training)"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"no-layernorm": no_layernorm, "no-residual": no_residual}
