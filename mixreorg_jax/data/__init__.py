"""Input pipelines, tokenizers, synthetic data and evaluation datasets."""
