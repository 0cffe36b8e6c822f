"""What can go wrong, in two kinds, so that each is shown the right way.

A command fails for one of two reasons. Either the user asked for something that cannot work: a flag
out of range, a file that is missing or damaged, a tokenizer that does not fit the model, a disk that
is full. That deserves one line saying what is wrong and what to do, and no traceback. Or the code
has a bug, and a bug must show its traceback, or nobody can fix it. ``UserError`` marks the first
kind; ``src.cli.run_command`` is the one place that turns it into that line and an exit code.

Training adds a third outcome that is neither: the loss became infinite or NaN. The input was
legal and the code did what it was told, but the run cannot go on. ``NonFiniteLossError`` stops it
before the bad update, and the last good checkpoint stays.
"""


class UserError(ValueError):
    """Input that cannot work. The message names the input and, where it helps, the fix."""


class NonFiniteLossError(RuntimeError):
    """The loss became inf or NaN; training stops and the last good checkpoint is kept."""
