"""The analytic test bed (a Gaussian mixture with exact posterior quantities) and the sample
quality metrics measured against it."""
from .metrics import frechet_distance, mode_weight_error, sliced_wasserstein
from .mixture import FlowMixtureModel, GaussianMixture, MixtureModel

__all__ = ["FlowMixtureModel", "GaussianMixture", "MixtureModel", "frechet_distance", "mode_weight_error",
           "sliced_wasserstein"]
