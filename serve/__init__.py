"""xlaserve.serve."""
