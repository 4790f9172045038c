"""Building blocks of the Llama-family models, one layer per module."""
