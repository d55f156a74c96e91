"""gptexp: Hydra-configured experiments for training small GPT language models."""

__version__ = "0.1.0"
