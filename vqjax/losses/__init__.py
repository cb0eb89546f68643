"""Tokenizer losses as registered parts: image-loss terms, GAN losses, regularisers.

Every module here is imported by the registries on first look-up, so a new
term registers itself by being a file in this package.
"""
