"""Offline search."""
