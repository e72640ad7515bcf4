"""The async source of truth; ``_sync`` is generated from it by tools/async_to_sync.py."""
