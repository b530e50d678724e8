//! Kubernetes CRI v1 server and the `atoll` CLI: arrive with the container issues.
