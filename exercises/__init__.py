"""Your turn: the exercises of every chapter, and the checker that says whether your answer is right.

Write the functions in ``exercises/CHAPTER.py`` (each stub says what to build, shapes included), then

    uv run python -m exercises CHAPTER            # check them
    uv run python -m exercises CHAPTER --only NAME
    uv run python -m exercises --list             # every exercise, one line each
    uv run python -m exercises CHAPTER --answers  # the book's answers, through the same checks

The answers are in ``exercises/solutions/``; the book shows each one, folded, below its exercise.
"""
