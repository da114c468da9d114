"""A policy that runs on a policy server (``python -m openvla_ros.serve``): the node's remote mode.

``model:=http://host:port`` gives the node a :class:`RemotePolicy` instead of a loaded model. It asks the
server's ``/health`` what it serves (token or OFT, chunk size, images, proprio), then sends each frame as
JPEG with the instruction to ``/act`` and returns what comes back, exactly where a local policy would
return its action or chunk. A request that gets no answer within ``timeout_s`` (the node passes
``max_image_age_s``: a later answer would act on a stale image), a refused connection or an error status
raises :class:`RemotePolicyError`, an :class:`~openvla_ros.errors.OpenVLAError`: the node treats it as a
failed inference (one zero delta, then nothing until an answer comes), and the next step simply tries
again, so a server that comes back is used without a restart.
"""

from __future__ import annotations

import base64
import collections
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from openvla_ros.errors import OpenVLAError
from openvla_ros.serve.arrays import ArrayFormatError, decode_array
from openvla_ros.serve.batching import nearest_rank

REMOTE_SCHEMES = ("http://", "https://")


class RemotePolicyError(OpenVLAError):
    """The policy server did not answer in time, could not be reached or refused the request."""


def is_remote(model: str) -> bool:
    return str(model).startswith(REMOTE_SCHEMES)


def encode_jpeg(image: np.ndarray, quality: int) -> str:
    """Returns the base64 JPEG of an RGB uint8 image."""
    import cv2

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RemotePolicyError("the camera image could not be encoded as JPEG")
    return base64.b64encode(data.tobytes()).decode("ascii")


class RemotePolicy:
    """The policy a server serves, with the interface of a local token or OFT policy.

    Args:
        url: ``http://host:port`` of the server.
        api_key: sent as ``Authorization: Bearer`` when given.
        timeout_s: how long one request may take (connection included).
        jpeg_quality: JPEG quality of the frames sent (1..100).
        unnorm_key: sent with every request when given (else the server's default).

    Raises:
        RemotePolicyError: the server cannot be reached or does not describe itself (at construction).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 1.0, jpeg_quality: int = 90,
                 unnorm_key: str | None = None, connect_timeout_s: float = 10.0) -> None:
        import requests

        if not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {jpeg_quality}")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.jpeg_quality = int(jpeg_quality)
        self._requests = requests
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.failures = 0
        self.last_failure = ""
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=200)
        self.info = self._health(connect_timeout_s)
        self.unnorm_key = unnorm_key or self.info.get("default_unnorm_key") or ""
        if unnorm_key and unnorm_key not in self.info.get("unnorm_keys", [unnorm_key]):
            raise RemotePolicyError(f"the server at {self.url} has no statistics for unnorm_key {unnorm_key!r}; it "
                                    f"has {', '.join(self.info.get('unnorm_keys', []))}")
        self.is_chunked = self.info.get("kind") == "oft"
        self.chunk_size = int(self.info.get("chunk_size", 1))
        self.action_dim = int(self.info.get("action_dim", 7))
        self.num_images = int(self.info.get("images", 1))
        self.proprio_dim = int(self.info.get("proprio_dim", 0))
        self.energy_model = None  # refinement, if any, happens on the server
        self.last_prediction = None

    def _health(self, timeout_s: float) -> dict[str, Any]:
        try:
            response = self._session.get(f"{self.url}/health", timeout=timeout_s)
        except self._requests.RequestException as exc:
            raise RemotePolicyError(f"the policy server at {self.url} cannot be reached ({type(exc).__name__}); start "
                                    "it (python -m openvla_ros.serve) or check the address") from exc
        if response.status_code == 401:
            raise RemotePolicyError(f"the policy server at {self.url} refused the API key: set the api_key parameter "
                                    "to the server's --api-key")
        if response.status_code != 200:
            raise RemotePolicyError(f"the policy server at {self.url} answered /health with {response.status_code}: "
                                    f"{response.text[:200]}")
        try:
            info = response.json()
        except ValueError as exc:
            raise RemotePolicyError(f"{self.url}/health did not answer JSON: is it an openvla_ros policy server?") from exc
        if not isinstance(info, dict) or "kind" not in info:
            raise RemotePolicyError(f"{self.url}/health does not describe a policy: is it an openvla_ros policy server?")
        return info

    def _act(self, body: dict[str, Any]) -> np.ndarray:
        if self.unnorm_key:
            body["unnorm_key"] = self.unnorm_key
        started = time.perf_counter()
        try:
            with self._lock:
                self.requests_sent += 1
            response = self._session.post(f"{self.url}/act", json=body, timeout=self.timeout_s)
        except self._requests.Timeout as exc:
            self._failed(f"no answer within {self.timeout_s:g} s")
            raise RemotePolicyError(f"the policy server at {self.url} did not answer within {self.timeout_s:g} s "
                                    "(max_image_age_s): the step counts as stale") from exc
        except self._requests.RequestException as exc:
            self._failed(f"unreachable ({type(exc).__name__})")
            raise RemotePolicyError(f"the policy server at {self.url} cannot be reached ({type(exc).__name__}); "
                                    "retrying at the next step") from exc
        if response.status_code != 200:
            try:
                reason = response.json().get("error", response.text[:200])
            except ValueError:
                reason = response.text[:200]
            self._failed(f"HTTP {response.status_code}")
            raise RemotePolicyError(f"the policy server answered {response.status_code}: {reason}")
        try:
            result = np.asarray(decode_array(response.json(), "the server's action"), dtype=np.float64)
        except (ValueError, ArrayFormatError) as exc:
            self._failed("unreadable answer")
            raise RemotePolicyError(f"the policy server's answer is not an action: {exc}") from exc
        with self._lock:
            self._latencies_ms.append((time.perf_counter() - started) * 1e3)
        return result

    def _failed(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_failure = reason

    def predict_action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        action = self._act({"image_jpeg": encode_jpeg(image, self.jpeg_quality), "instruction": instruction})
        if action.shape != (7,):
            raise RemotePolicyError(f"the server answered an action of shape {action.shape}, not (7,)")
        return action

    def predict_chunk(self, image: np.ndarray, instruction: str, wrist_images: Sequence[np.ndarray] = (),
                      proprio: Any = None) -> np.ndarray:
        body: dict[str, Any] = {"image_jpeg": encode_jpeg(image, self.jpeg_quality), "instruction": instruction}
        if wrist_images:
            body["wrist_images_jpeg"] = [encode_jpeg(wrist, self.jpeg_quality) for wrist in wrist_images]
        if proprio is not None:
            body["proprio"] = [float(value) for value in np.asarray(proprio, dtype=np.float64).reshape(-1)]
        chunk = self._act(body)
        if chunk.shape != (self.chunk_size, self.action_dim):
            raise RemotePolicyError(f"the server answered a chunk of shape {chunk.shape}, not "
                                    f"({self.chunk_size}, {self.action_dim})")
        return chunk

    def diagnostic_values(self) -> dict[str, str]:
        """The remote mode's values of ``/diagnostics``: the server, request latency and failures."""
        with self._lock:
            latencies = sorted(self._latencies_ms)
            sent, failures, last = self.requests_sent, self.failures, self.last_failure
        median, p95 = (nearest_rank(latencies, q) if latencies else float("nan") for q in (0.5, 0.95))
        return {"remote_server": self.url, "remote_requests": str(sent), "remote_failures": str(failures),
                "remote_last_failure": last, "remote_latency_ms_median": f"{median:.1f}",
                "remote_latency_ms_p95": f"{p95:.1f}"}

    def release(self) -> None:
        self._session.close()
