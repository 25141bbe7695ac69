"""Release: the model registry, the human approval and deploy to the served-model layout."""
