"""Trainers: jitted steps over explicit state, one shared loop."""
