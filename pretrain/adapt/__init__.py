"""Adapting a trained CLIP model to a downstream task with few labels (`pretrain adapt`)."""
