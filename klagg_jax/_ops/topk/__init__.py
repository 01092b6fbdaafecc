"""Distillation from a stored teacher: top-k log-probs with a tail bucket."""
