"""pdl_jax: finetuning text generators with the Power-Law Decay Loss in JAX/Flax."""
