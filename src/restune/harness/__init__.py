"""The training harness: recipes, the training loop, sweeps, tables and plots (``restune train|eval|sweep|plot``)."""
