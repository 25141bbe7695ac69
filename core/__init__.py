"""The bottom layer: typed configuration, errors, storage and the served-model layout; imports nothing of the project."""
