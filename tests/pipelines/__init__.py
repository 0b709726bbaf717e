"""Tests of pipelines/self_forcing: upstream reproducibility, loading, what the thread count may change."""
