"""Readers for weight files shipped inside registry packages (no code runs on load)."""
