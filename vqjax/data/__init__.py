"""Data sources (TFDS, image folders, the embedded set) and Grain pipelines."""
