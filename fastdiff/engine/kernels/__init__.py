"""Fused Triton kernels, one file per update family, each with its launcher and torch reference."""
