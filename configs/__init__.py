"""Experiment configs (ml-collections); base.py holds every default."""
