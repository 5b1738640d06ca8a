"""``GET /dashboard``: a live web page of the swarm, drawn from ``GET /v1/swarm`` (routes.py)."""
