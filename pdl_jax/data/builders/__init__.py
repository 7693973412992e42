"""TFDS builders for the offline default corpora (one module each).

Importing this package registers the builders with TFDS under their names:
debian_descriptions, shakespeare_dialogue, bible_style.
"""

from pdl_jax.data.builders.bible_style import BibleStyle
from pdl_jax.data.builders.debian_descriptions import DebianDescriptions
from pdl_jax.data.builders.shakespeare_dialogue import ShakespeareDialogue

__all__ = ["BibleStyle", "DebianDescriptions", "ShakespeareDialogue"]
