"""The policy server for real: ``python -m openvla_ros.serve`` as a process on localhost, HTTP with ``requests``,
and clients written as OpenVLA's ``deploy.py`` documents them (``json_numpy.patch()``, ``POST /act``)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import json_numpy  # the official client's array encoding
import numpy as np
import pytest
import requests
from serve_helpers import Server

INSTRUCTION = "pick up the red block"
REPO = Path(__file__).resolve().parents[1]


_PATCH_LOCK = threading.Lock()
_PATCH_USERS = [0]
_ORIGINAL_JSON = (json.dumps, json.loads, json.dump, json.load)


@contextlib.contextmanager
def numpy_json() -> Iterator[None]:
    """``json_numpy.patch()``, as the official client does, undone when the last concurrent user leaves (the patch
    breaks other users of ``json.loads(object_hook=...)`` in this process, numpy.testing among them)."""
    with _PATCH_LOCK:
        if _PATCH_USERS[0] == 0:
            json_numpy.patch()
        _PATCH_USERS[0] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_USERS[0] -= 1
            if _PATCH_USERS[0] == 0:
                json.dumps, json.loads, json.dump, json.load = _ORIGINAL_JSON


class Answer:
    """A response read as the official client reads it: ``.json()`` with json_numpy patched in."""

    def __init__(self, response: requests.Response) -> None:
        self.status_code = response.status_code
        self.text = response.text
        with numpy_json():
            self.body = response.json()

    def json(self):
        return self.body


def post(url: str, body, **kwargs) -> Answer:
    """What a client of the official server does: json_numpy patched into json, then ``requests.post(json=...)``."""
    with numpy_json():
        return Answer(requests.post(f"{url}/act", json=body, timeout=120, **kwargs))


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(96 + 8 * i, 128, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def token_server(tiny_checkpoint: Path) -> Iterator[Server]:
    server = Server(tiny_checkpoint, "--max-batch", "8", "--batch-window-ms", "300", "--max-request-mb", "1")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def oft_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

    return make_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "oft", seed=0, proprio_dim=8, num_images=2)


@pytest.fixture(scope="module")
def oft_server(oft_checkpoint: Path) -> Iterator[Server]:
    server = Server(oft_checkpoint, "--dtype", "float32", "--max-batch", "8", "--batch-window-ms", "300")
    yield server
    assert server.stop() == 0


def test_an_official_client_gets_the_action_predict_gives(token_server: Server, tiny_checkpoint: Path,
                                                           tmp_path: Path) -> None:
    from PIL import Image

    image = images(1)[0]
    Image.fromarray(image).save(tmp_path / "frame.png")
    predicted = subprocess.run(
        [sys.executable, "-m", "openvla_ros.predict", "--model", str(tiny_checkpoint), "--image",
         str(tmp_path / "frame.png"), "--instruction", INSTRUCTION, "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=300, check=True, cwd=REPO)
    expected = np.array(json.loads(predicted.stdout.strip().splitlines()[-1]))
    response = post(token_server.url, {"image": image, "instruction": INSTRUCTION})
    assert response.status_code == 200, response.text
    action = response.json()
    assert isinstance(action, np.ndarray) and action.shape == (7,) and action.dtype == np.float64
    np.testing.assert_allclose(action, expected, rtol=0, atol=1e-9)
    # deploy.py's double encoding: the request and the answer as JSON strings
    with numpy_json():
        request = json.dumps({"image": image, "instruction": INSTRUCTION})
    encoded = post(token_server.url, {"encoded": request})
    assert encoded.status_code == 200, encoded.text
    with numpy_json():
        decoded = json.loads(encoded.json())
    np.testing.assert_allclose(decoded, expected, rtol=0, atol=1e-9)


def _concurrent(url: str, bodies: list[dict]) -> list[Answer]:
    answers: list[Answer | None] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def client(index: int) -> None:
        start.wait()
        answers[index] = post(url, bodies[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers  # type: ignore[return-value]


def test_concurrent_token_clients_each_get_their_own_result_in_batches(token_server: Server) -> None:
    instructions = [INSTRUCTION, "open the top drawer", "push the blue cube to the left edge", INSTRUCTION,
                    "close it", "stack the cups"]
    bodies = [{"image": image, "instruction": text} for image, text in zip(images(6, seed=1), instructions, strict=True)]
    before = requests.get(f"{token_server.url}/health", timeout=30).json()["batches"]
    together = _concurrent(token_server.url, bodies)
    assert all(answer.status_code == 200 for answer in together), [a.text for a in together]
    health = requests.get(f"{token_server.url}/health", timeout=30).json()
    assert health["largest_batch"] > 1 and health["batches"] - before < len(bodies), health
    for body, answer in zip(bodies, together, strict=True):
        alone = post(token_server.url, body)
        np.testing.assert_array_equal(answer.json(), alone.json())
    distinct = {tuple(answer.json().round(9)) for answer in together}
    assert len(distinct) > 1, "every client got the same action"


def _oft_body(seed: int, instruction: str = INSTRUCTION) -> dict:
    primary, wrist = images(2, seed=seed)
    proprio = np.random.default_rng(seed).uniform(-1.0, 1.0, 8)
    return {"image": primary, "wrist_images": [wrist], "proprio": proprio, "instruction": instruction}


def test_concurrent_oft_clients_get_their_chunks_equal_to_alone(oft_server: Server, oft_checkpoint: Path) -> None:
    from openvla_ros.model.oft_policy import OFTPolicy

    bodies = [_oft_body(seed, text) for seed, text in enumerate([INSTRUCTION, "open the drawer", "go left", "stack"])]
    together = _concurrent(oft_server.url, bodies)
    assert all(answer.status_code == 200 for answer in together), [a.text for a in together]
    assert requests.get(f"{oft_server.url}/health", timeout=30).json()["largest_batch"] > 1
    policy = OFTPolicy.from_pretrained(str(oft_checkpoint), device="cpu", dtype="float32")
    for body, answer in zip(bodies, together, strict=True):
        chunk = answer.json()
        assert chunk.shape == (8, 7)
        alone = policy.predict_chunk(body["image"], body["instruction"], wrist_images=body["wrist_images"],
                                     proprio=body["proprio"])
        np.testing.assert_allclose(chunk, alone, rtol=0, atol=1e-5)
    health = requests.get(f"{oft_server.url}/health", timeout=30).json()
    assert (health["kind"], health["chunk_size"], health["images"], health["proprio_dim"]) == ("oft", 8, 2, 8)


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not JSON"),
    ({"image": "abc", "instruction": INSTRUCTION}, 422, "json-numpy"),
    ({"image": np.zeros((32, 32), np.uint8), "instruction": INSTRUCTION}, 422, "HxWx3"),
    ({"image": np.zeros((32, 32, 3), np.float32), "instruction": INSTRUCTION}, 422, "uint8"),
    ({"image": np.zeros((32, 32, 3), np.uint8), "instruction": "  "}, 422, "instruction is empty"),
    ({"image": np.zeros((32, 32, 3), np.uint8), "instruction": "x" * 1001}, 422, "limit is 1000"),
    ({"image": np.zeros((32, 32, 3), np.uint8), "instruction": INSTRUCTION, "unnorm_key": "bridge_orig"}, 422,
     "unknown unnorm_key 'bridge_orig'"),
    ({"instruction": INSTRUCTION}, 400, "'image'"),
    ({"image": np.zeros((32, 32, 3), np.uint8), "instruction": INSTRUCTION, "speed": 2}, 400, "unknown field"),
    ({"image": np.zeros((32, 32, 3), np.uint8), "instruction": INSTRUCTION, "proprio": [0.0]}, 422,
     "token model"),
    ({"image": np.zeros((700, 700, 3), np.uint8), "instruction": INSTRUCTION}, 413, "limit"),
])
def test_a_bad_request_gets_a_json_error_and_the_server_keeps_serving(token_server: Server, body, status: int,
                                                                        words: str) -> None:
    if isinstance(body, bytes):
        response = requests.post(f"{token_server.url}/act", data=body, timeout=60,
                                 headers={"Content-Type": "application/json"})
    else:
        response = post(token_server.url, body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    good = post(token_server.url, {"image": images(1)[0], "instruction": INSTRUCTION})
    assert good.status_code == 200


def test_oft_requests_need_their_wrist_images_and_proprio(oft_server: Server) -> None:
    body = _oft_body(0)
    for change, words in (({"wrist_images": []}, "takes 2 image(s)"), ({"proprio": None}, "needs 'proprio'"),
                          ({"proprio": [0.1, 0.2]}, "proprio")):
        broken = {key: value for key, value in {**body, **change}.items() if value is not None}
        response = post(oft_server.url, broken)
        assert response.status_code == 422 and words in response.json()["error"], response.text
    assert post(oft_server.url, body).status_code == 200


def test_a_model_failure_is_a_500_with_the_reason_and_the_server_goes_on(tiny_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    """Statistics that overflow give a non-finite action: that request fails with 500, the next one works."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    for name in ("config.json", "dataset_statistics.json"):
        data = json.loads((model / name).read_text())
        stats = data["norm_stats"] if name == "config.json" else data
        broken = json.loads(json.dumps(stats["tiny_demo"]))
        broken["action"]["q01"] = [-1e308] * 7
        broken["action"]["q99"] = [1e308] * 7
        broken["action"]["min"], broken["action"]["max"] = broken["action"]["q01"], broken["action"]["q99"]
        stats["overflow"] = broken
        (model / name).write_text(json.dumps(data))
    server = Server(model, "--unnorm-key", "tiny_demo")
    try:
        image = images(1)[0]
        failed = post(server.url, {"image": image, "instruction": INSTRUCTION, "unnorm_key": "overflow"})
        assert failed.status_code == 500 and "not finite" in failed.json()["error"], failed.text
        assert post(server.url, {"image": image, "instruction": INSTRUCTION}).status_code == 200
        assert requests.get(f"{server.url}/health", timeout=30).json()["requests_failed"] == 1
    finally:
        assert server.stop() == 0


def test_with_a_key_requests_without_it_get_401(tiny_checkpoint: Path) -> None:
    server = Server(tiny_checkpoint, "--api-key", "s3cret")
    try:
        body = {"image": images(1)[0], "instruction": INSTRUCTION}
        assert post(server.url, body).status_code == 401
        assert post(server.url, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.get(f"{server.url}/health", timeout=30).status_code == 401
        assert post(server.url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(server.url, body, headers={"X-API-Key": "s3cret"}).status_code == 200
        metrics = requests.get(f"{server.url}/metrics", headers={"X-API-Key": "s3cret"}, timeout=30).text
        assert "openvla_requests_total 2" in metrics and "openvla_requests_refused_total 3" in metrics
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_waiting_request_and_exits_0(tiny_checkpoint: Path) -> None:
    """The request sits in a 3 s batch window when SIGTERM arrives: it is still answered, then the server exits 0
    and refuses new connections."""
    server = Server(tiny_checkpoint, "--batch-window-ms", "3000")
    answer: dict[str, Answer] = {}
    client = threading.Thread(target=lambda: answer.setdefault(
        "response", post(server.url, {"image": images(1)[0], "instruction": INSTRUCTION})))
    client.start()
    time.sleep(1.0)
    code = server.stop(signal.SIGTERM)
    client.join(timeout=60)
    assert code == 0, "".join(server.lines)
    assert answer["response"].status_code == 200
    assert any("stopped (SIGTERM)" in line for line in server.lines)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=5)


def test_a_port_in_use_is_one_clear_error(token_server: Server, tiny_checkpoint: Path) -> None:
    port = token_server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "openvla_ros.serve", "--model", str(tiny_checkpoint), "--port", port],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_the_batcher_groups_by_window_and_size_and_isolates_a_failing_request() -> None:
    """A stand-in model of known behaviour: requests arriving together run as batches of at most max_batch; a batch
    that fails is run again request by request, so only the bad request fails."""
    from openvla_ros.serve.batching import Batcher

    calls: list[list[int]] = []

    def run(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        if -1 in jobs:
            raise RuntimeError("bad input")
        return [job * 10 for job in jobs]

    batcher = Batcher(run, max_batch=3, window_s=0.5)
    futures = [batcher.submit(job) for job in range(5)]
    assert [future.result(timeout=10) for future in futures] == [0, 10, 20, 30, 40]
    assert [len(call) for call in calls] == [3, 2] and batcher.stats.largest_batch == 3
    calls.clear()
    futures = [batcher.submit(job) for job in (7, -1, 8)]
    assert futures[0].result(timeout=10) == 70 and futures[2].result(timeout=10) == 80
    with pytest.raises(RuntimeError, match="bad input"):
        futures[1].result(timeout=10)
    assert calls == [[7, -1, 8], [7], [-1], [8]]
    assert batcher.stats.failed == 1 and batcher.stats.requests == 7
    batcher.close()


def test_closing_the_batcher_finishes_the_running_batch_and_fails_the_waiting_ones() -> None:
    from openvla_ros.serve.batching import Batcher, ServerClosingError

    started, release = threading.Event(), threading.Event()

    def run(jobs: list[int]) -> list[int]:
        started.set()
        release.wait(10)
        return jobs

    batcher = Batcher(run, max_batch=1, window_s=0.0)
    running = batcher.submit(1)
    assert started.wait(10)
    waiting = batcher.submit(2)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.2)
    release.set()
    closer.join(timeout=10)
    assert running.result(timeout=10) == 1
    with pytest.raises(ServerClosingError):
        waiting.result(timeout=10)
    with pytest.raises(ServerClosingError):
        batcher.submit(3).result(timeout=10)


def test_latency_quantiles_are_nearest_rank_and_none_before_any_request() -> None:
    from openvla_ros.serve.batching import Stats, nearest_rank

    assert nearest_rank([], 0.5) is None
    assert [nearest_rank([1.0, 2.0, 3.0, 4.0, 5.0], q) for q in (0.0, 0.5, 0.95, 1.0)] == [1.0, 3.0, 5.0, 5.0]
    stats = Stats()
    assert stats.quantile(0.5) is None
    for latency in (0.3, 0.1, 0.2):
        stats.record_request(latency, ok=True)
    stats.record_request(9.0, ok=False)  # a failed request has no latency
    assert (stats.quantile(0.5), stats.quantile(1.0)) == (0.2, 0.3)
