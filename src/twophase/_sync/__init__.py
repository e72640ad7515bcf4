# WARNING: generated from twophase/_async/__init__.py by tools/async_to_sync.py.
# Edit the async source and run `python tools/async_to_sync.py`; CI checks they agree.
"""The async source of truth; ``_sync`` is generated from it by tools/async_to_sync.py."""
