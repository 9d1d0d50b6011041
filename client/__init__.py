"""Client of the Triton `anomaly_pipeline` (HTTP or gRPC), used by the CLI, the RunPod handler and the gateway."""

from client.triton_client import AnomalyClient, AnomalyServiceError, Detection

__all__ = ["AnomalyClient", "AnomalyServiceError", "Detection"]
