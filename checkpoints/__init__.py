"""xlaserve.checkpoints."""
