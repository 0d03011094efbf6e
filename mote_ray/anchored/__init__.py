"""Anchored preference pairs and DPO (design.md, "Anchored preference pairs")."""
