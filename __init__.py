"""tumorflow: retrain, gate and serve CT/MRI tumor classifiers as a Kubeflow-style pipeline."""

__version__ = "0.1.0"
