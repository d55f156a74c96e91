"""The network: the GPT module and its conversion to and from Hugging Face transformers."""
