"""Evaluation: pass@1 over k samples, unbiased pass@k, cons@k and greedy accuracy on built-in tasks and
JSONL sets (metrics.py, data.py), sampled through the engine or an OpenAI-compatible server
(sampling.py); ``evaluate`` and the ``minke eval`` stage are in run.py."""

from .data import builtin, grade, read_jsonl
from .metrics import cons_at_k, greedy_accuracy, mean_pass_at_k, pass1, pass_at_k
from .run import evaluate, format_table

__all__ = ["evaluate", "format_table", "builtin", "read_jsonl", "grade",
           "pass_at_k", "mean_pass_at_k", "pass1", "cons_at_k", "greedy_accuracy"]
