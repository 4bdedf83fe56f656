"""Losses: perceptual (LPIPS, DISTS, EA-DISTS)."""
