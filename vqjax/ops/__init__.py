"""Pure array maths: importable without a config, a trainer or a data set."""
