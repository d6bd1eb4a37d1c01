"""Online inference: the Ray Serve recommendation API (see docs/serving.md)."""
