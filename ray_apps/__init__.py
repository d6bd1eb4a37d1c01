"""Ray applications: training, evaluation, model registry, batch scoring and serving."""
