"""Evaluating GRACE models: mteb evaluation and the local mteb tasks, quick in-process scores, the general-ability
check of the language model, and the metrics they share (Spearman, bootstrap)."""
