"""Pieces shared by several kernel families (device functions, launch helpers)."""
