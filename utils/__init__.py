"""Shared pieces of the toolkit scripts."""
from utils import log_filters  # noqa: F401  (filters known-harmless library messages; some come at import time)
