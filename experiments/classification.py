"""Break it, chapter "Finetuning for classification": pool the first token; imbalanced classes.

Both train the tiny model (vocabulary 64) with a two-class head from scratch, in batches of 32, on
synthetic texts of 8 to 24 random tokens, where the rule that decides the label is known.
"""

import torch
from torch import nn

from benchmarks.harness import markdown_table
from experiments.harness import batches, tiny, train
from src.classify import balance, collate, confusion_matrix, last_token_logits, make_classifier
from src.model import GPTModel

BATCH_SIZE = 32


def random_ids(generator: torch.Generator) -> torch.Tensor:
    """A text of 8-24 random tokens from 4-63 (0-3 are left free for keywords and padding)."""
    length = int(torch.randint(8, 25, (1,), generator=generator))
    return torch.randint(4, 64, (length,), generator=generator)


def train_classifier(examples: list, epochs: int, pool=last_token_logits, lr: float = 1e-3):
    """The tiny model with a two-class head, trained on ``(ids, label)`` examples with the output
    of ``pool``; returns it in eval mode, and the loss of its last step."""
    torch.manual_seed(0)
    model = make_classifier(GPTModel(tiny(vocab_size=64)), 2)

    def loss_fn(group) -> torch.Tensor:
        ids, lengths, labels = collate(group, pad_id=0)
        return nn.functional.cross_entropy(pool(model(ids), lengths), labels)

    steps = epochs * (len(examples) // BATCH_SIZE)
    losses = train(model, loss_fn, batches(examples, BATCH_SIZE), steps, lr)
    return model.eval(), losses[-1]


@torch.no_grad()
def predictions(model: nn.Module, examples: list, pool=last_token_logits) -> tuple:
    """The predicted and the true labels of ``examples``."""
    ids, lengths, labels = collate(examples, pad_id=0)
    return pool(model(ids), lengths).argmax(-1), labels


def keyword_examples(n: int, generator: torch.Generator) -> list[tuple[list[int], int]]:
    """Texts of class 1 hold the keyword token 3 somewhere after the first token; half are."""
    out = []
    for _ in range(n):
        ids = random_ids(generator).tolist()
        label = int(torch.randint(0, 2, (1,), generator=generator))
        if label:
            ids[int(torch.randint(1, len(ids), (1,), generator=generator))] = 3
        out.append((ids, label))
    return out


# --8<-- [start:first-token-pooling]
def first_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, C): every row read at position 0, which the causal mask lets see only
    itself."""
    return logits[:, 0]


# --8<-- [end:first-token-pooling]


def first_token_pooling(n_train: int = 6400, epochs: int = 1) -> str:
    """Classify with the first token's output instead of the last one's, on a synthetic task."""
    generator = torch.Generator().manual_seed(0)
    train_set, test_set = keyword_examples(n_train, generator), keyword_examples(1000, generator)
    rows = []
    for label, pool in (
        ("last token (as built)", last_token_logits),
        ("first token", first_token_logits),
    ):
        model, loss = train_classifier(train_set, epochs, pool)
        predicted, true = predictions(model, test_set, pool)
        rows.append([label, f"{loss:.2f}", f"{100 * (predicted == true).float().mean():.1f}%"])
    return markdown_table(
        ["pooled output", "final train loss", "test accuracy (chance: 50%)"], rows
    )


def spam_examples(n: int, generator: torch.Generator, share: float = 0.13) -> list:
    """Class 1, ``share`` of the texts: each token replaced with probability 1/4 by one of 8 "spam
    words" (tokens 4-11). Class-0 texts hold spam words too, by chance (8 of the 60 tokens drawn),
    so the classes overlap: no rule separates them all."""
    out = []
    for _ in range(n):
        ids = random_ids(generator)
        length = len(ids)
        label = int(torch.rand(1, generator=generator) < share)
        if label:
            spam = torch.rand(length, generator=generator) < 0.25
            ids = torch.where(spam, torch.randint(4, 12, (length,), generator=generator), ids)
        out.append((ids.tolist(), label))
    return out


def scores(label: str, n_train: str, predicted: torch.Tensor, true: torch.Tensor) -> list[str]:
    """A row of the table: accuracy, the recall of each class, and their mean."""
    matrix = confusion_matrix(predicted, true, 2)  # matrix[true][predicted]
    recall = [matrix[c][c] / sum(matrix[c]) for c in (0, 1)]
    accuracy = (predicted == true).float().mean().item()
    return [label, n_train] + [f"{100 * x:.1f}%" for x in (accuracy, *recall, sum(recall) / 2)]


# --8<-- [start:imbalanced-classes]
def training_sets(examples: list) -> dict[str, list]:
    """The texts as they come, 87% of class 0, and balanced: every class-1 text and as many
    class-0 ones (``balance`` undersamples the larger class)."""
    return {
        "trained on the data as it comes": examples,
        "trained on balanced data": balance(examples, seed=0),
    }


# --8<-- [end:imbalanced-classes]


def imbalanced_classes(n_train: int = 6400, epochs: int = 2) -> str:
    """A rare class (13% of texts), trained on as it comes and on a balanced, undersampled set."""
    generator = torch.Generator().manual_seed(0)
    train_set = spam_examples(n_train, generator)
    test_set = spam_examples(2000, generator)  # the test set keeps the real mix
    true = collate(test_set, pad_id=0)[2]
    rows = [scores("always class 0 (no model)", "none", torch.zeros_like(true), true)]
    for label, examples in training_sets(train_set).items():
        model, _ = train_classifier(examples, epochs)
        rows.append(scores(label, str(len(examples)), *predictions(model, test_set)))
    share = true.float().mean().item()
    header = ["", "training texts", "test accuracy",
              f"recall, class 0 ({100 * (1 - share):.0f}% of the test set)",
              f"recall, class 1 ({100 * share:.0f}%)", "balanced accuracy (mean recall)"]  # fmt: skip
    return markdown_table(header, rows)


EXPERIMENTS = {"first-token-pooling": first_token_pooling, "imbalanced-classes": imbalanced_classes}
