"""Temporary: the names data/ingest.py imports from here until it imports `cellfm.storage`; delete then."""

from cellfm.storage import filesystem, join  # noqa: F401
