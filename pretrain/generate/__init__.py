"""Caption generation for CoCa models."""
