"""Helpers for tests that need processes or direct driver access (not twophase itself)."""
