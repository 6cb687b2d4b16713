"""Paged attention on the jaxkv layout."""
