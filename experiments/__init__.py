"""The book's "Break it" experiments: remove one idea at a time and measure what goes wrong.

One module per chapter, in the book's order; each holds that chapter's experiments and names them in
``EXPERIMENTS``. An experiment trains or probes a small model twice, once as built and once with one
piece broken, and returns its numbers as a Markdown table, which ``python -m experiments`` writes to
``docs/assets/break-it/<name>.md`` for the chapter to include beside the lines that break it.
"""
