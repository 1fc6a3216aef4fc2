"""Building models from open_clip names, configs and checkpoints; locking towers."""
