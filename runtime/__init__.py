"""xlaserve.runtime."""
