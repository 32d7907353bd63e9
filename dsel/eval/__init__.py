"""Evaluation: held-out losses per domain, lm-eval integration, run reports."""
