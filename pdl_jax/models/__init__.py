"""Model families: one Flax decoder for the own model's math and Hugging Face decoders."""

from pdl_jax.models.decoder import Decoder, DecoderConfig, from_model_config, init_cache

__all__ = ["Decoder", "DecoderConfig", "from_model_config", "init_cache"]
