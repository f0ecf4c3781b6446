"""Evaluation: the nine zero-shot tasks in four scoring modes (DESIGN.md §7)."""
