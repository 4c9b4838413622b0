"""Flax modules of the GroupViT image and text towers."""
