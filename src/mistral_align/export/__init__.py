"""A finished run out of mistral-align: merged into a plain transformers model, or a GGUF file for llama.cpp."""
