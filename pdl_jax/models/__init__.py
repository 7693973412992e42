"""Model definitions: one Flax decoder (decoder.py) for the project's own model and
the Hugging Face families; the own model's presets (config.py); the choice by
config (factory.py)."""
