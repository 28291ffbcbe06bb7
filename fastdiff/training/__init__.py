"""Training: progressive distillation, consistency distillation and the OCM covariance head,
over one shared trainer (fastdiff.training.trainer)."""
