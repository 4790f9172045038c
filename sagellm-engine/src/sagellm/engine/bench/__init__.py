"""Benchmarks of the engine against transformers and llama.cpp (``sagellm bench``)."""
