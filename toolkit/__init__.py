"""Shared parts of the toolkit: what the entry points at the root, transreid/ and classification/ use."""
