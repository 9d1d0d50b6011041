"""RunPod deployment: serverless handler, pod REST gateway, and the entrypoint that starts either."""
