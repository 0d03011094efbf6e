"""Aligners: synthetic critique data, aligner models, inspectors and the squad (design.md, "Aligners")."""
