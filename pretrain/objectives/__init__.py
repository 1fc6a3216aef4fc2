"""Objectives: what a step minimises (objective, distillation terms)."""
