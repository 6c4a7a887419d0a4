"""Stage 1: the RVQ tokenizer (quantizer math, autoencoder, losses, training task)."""
