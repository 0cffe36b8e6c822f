"""The book's answers to the exercises, and for each exercise its reference and its cases."""
