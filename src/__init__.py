"""A GPT-style language model built from first principles; each module is a chapter of the book."""
