"""xlaserve.pallas_kernels."""
