"""Stage 2: the ResGen generator (masking, mixture head and loss, transformer, sampler)."""
