"""xlaserve.runtime.models."""
