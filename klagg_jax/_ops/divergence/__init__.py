"""The per-position divergence of two next-token distributions given as logits."""
