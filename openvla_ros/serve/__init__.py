"""The policy server: OpenVLA's ``/act`` REST API, batched across robots (``python -m openvla_ros.serve``).

- :mod:`.arrays`: the json-numpy wire format of arrays (strict: only the dtypes a request may carry).
- :mod:`.engine`: a loaded policy behind request validation and batched inference (no web code).
- :mod:`.batching`: the dynamic batcher (one worker thread) and the served-request statistics.
- :mod:`.app`: the FastAPI application, the command line and the uvicorn server.
- :mod:`.client`: the HTTP client the policy node's remote mode uses.
"""
