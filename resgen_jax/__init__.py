"""resgen_jax: ResGen (masked discrete diffusion over RVQ tokens) in JAX/Flax."""
