"""xlaserve.sharding."""
