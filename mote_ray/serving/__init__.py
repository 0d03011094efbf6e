"""Ray Serve app: an OpenAI-compatible router over MoTE expert deployments."""
