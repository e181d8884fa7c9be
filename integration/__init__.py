"""Whole-cluster tests (helpers imported as `integration.<module>`)."""
