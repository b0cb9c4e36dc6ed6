"""xlaserve.serve.proto."""
