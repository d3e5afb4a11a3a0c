"""Shared test fixtures. Sharding tests run their own subprocess with 8 simulated devices."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
