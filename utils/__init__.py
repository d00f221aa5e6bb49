"""Shared pieces of the toolkit scripts."""
