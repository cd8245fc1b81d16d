"""qwen2vl-jax: Qwen2-VL in JAX/Flax."""
