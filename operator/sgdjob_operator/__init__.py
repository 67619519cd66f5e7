"""The sgdjob Kubernetes operator (Kopf)."""
