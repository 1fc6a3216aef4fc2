"""Export, model card, push to a hub or URL."""
