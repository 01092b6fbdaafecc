"""Divergences fused with the LM head: the logits made block by block, never whole."""
