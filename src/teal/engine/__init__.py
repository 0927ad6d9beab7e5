"""Decoding: sampling, the eager decode loop and the compiled GPU engine."""
