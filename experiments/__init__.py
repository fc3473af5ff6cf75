"""Experiments: one script per committed doc, each regenerating it from scratch (resumable).

    python -m experiments.ril      the paper's RIL experiment at mini scale -> docs/mini_results.md
"""
