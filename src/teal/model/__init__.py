"""The model: configuration, the decoder, checkpoint loaders and the tokenizer."""
