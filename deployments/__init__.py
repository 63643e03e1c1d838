"""The Ray Serve graph: thin deployments around the `pipeline` stages, the
FastAPI ingress that composes them, and the job tracker actor."""
