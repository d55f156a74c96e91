"""Text to batches: tokenizers, text sources, the tokenized corpus and its cache, and the global
batch as a function of (seed, step)."""
