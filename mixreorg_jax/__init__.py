"""MixReorg (ICCV 2023) pretraining and GroupViT-protocol zero-shot segmentation in JAX/Flax."""
