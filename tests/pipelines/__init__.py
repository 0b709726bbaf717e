"""Tests of pipelines/self_forcing: upstream reproducibility, loading, thread-count invariance."""
