"""Evaluators: zero-shot classification (retrieval follows the same shape)."""
