"""The BentoML service, its page and batch prediction."""
