"""Training: backbones, the input pipeline, the distribution strategy, checkpoints, tracking, two-stage fine-tuning and the serving export."""
