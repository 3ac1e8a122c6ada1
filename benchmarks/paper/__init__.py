"""Reproductions of the MatFormer paper's claims at small scale (v1, v2, MatViT)."""
