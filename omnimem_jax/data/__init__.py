"""Training and evaluation data (a procedural world where long-range memory matters)."""
