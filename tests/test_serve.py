"""`python -m sd35_mlx.serve` on a tiny random model, spoken to with the real `openai` client
(and raw HTTP where a client would not send what we test), on 127.0.0.1 with a free port.

Every wait is bounded in count and time; every server is stopped by the test that started it.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.images import read_metadata
from sd35_mlx.serve.background import BackgroundServer
from sd35_mlx.serve.cli import build_app, build_parser

ROOT = Path(__file__).resolve().parents[1]
QUEUE_SIZE = 2
WAIT = 60.0  # seconds any single wait may take


def start(root: Path, *flags: str) -> BackgroundServer:
    args = build_parser().parse_args(["--model", str(root), "--dtype", "float32", *flags])
    return BackgroundServer(build_app(args)).__enter__()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_serve")
    make_tiny_model(root, TinySpec(seed=1))
    return root


@pytest.fixture(scope="module")
def server(tiny_root):
    s = start(tiny_root, "--queue-size", str(QUEUE_SIZE))
    yield s
    s.stop()


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=kw.pop("timeout", WAIT), **kw)  # fmt: skip


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) over plain http.client."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        return r.status, dict(r.getheaders()), payload
    finally:
        conn.close()


def post_json(server, body, path="/v1/images/generations"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(server, "POST", path, data, {"Content-Type": "application/json"})


def health(server) -> dict:
    status, _, payload = request(server, "GET", "/health")
    assert status == 200
    return payload


def wait_for(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def decode_png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd35_mlx.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


# ---- images ---------------------------------------------------------------------------------
def test_generation_png_metadata_regenerates_it_through_the_cli(server, tiny_root, tmp_path):
    result = client(server).images.generate(
        model=str(tiny_root), prompt="a red fox", size="64x48", response_format="b64_json", n=1,
        extra_body={"negative_prompt": "fog", "steps": 3, "cfg": 4, "seed": 123, "t5_length": 77},
    )  # fmt: skip
    assert len(result.data) == 1
    path = tmp_path / "served.png"
    path.write_bytes(base64.b64decode(result.data[0].b64_json))
    meta = read_metadata(path)
    expected = dict(prompt="a red fox", negative_prompt="fog", seed=123, steps=3, cfg=4.0, width=64, height=48,
                    sampler="euler", t5="t5xxl:77", model=str(tiny_root), dtype="float32")  # fmt: skip
    assert {k: meta[k] for k in expected} == expected

    r = run_cli("--from-image", str(path), "--model", str(tiny_root), "--dtype", "float32", "-o", str(tmp_path / "cli.png"))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "cli.png")))


def test_n_images_get_consecutive_seeds(server):
    result = client(server).images.generate(prompt="a fox", size="32x32", n=3, extra_body={"steps": 2, "seed": 40})
    assert [d.model_extra["seed"] for d in result.data] == [40, 41, 42]
    images = [np.asarray(decode_png(d.b64_json)) for d in result.data]
    seeds = [json.loads(decode_png(d.b64_json).text["sd35_mlx"])["seed"] for d in result.data]
    assert seeds == [40, 41, 42]
    assert images[0].shape == (32, 32, 3) and not np.array_equal(images[0], images[1])


def test_edit_is_img2img_of_the_upload(server, tiny_root, tmp_path):
    source = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(source)
    with open(source, "rb") as f:
        result = client(server).images.edit(image=f, prompt="a fox in snow",
                                            extra_body={"strength": 0.5, "steps": 4, "seed": 9})  # fmt: skip
    edited = tmp_path / "edited.png"
    edited.write_bytes(base64.b64decode(result.data[0].b64_json))
    meta = read_metadata(edited)
    assert (meta["init_image"], meta["strength"], meta["width"], meta["height"]) == ("photo.png", 0.5, 64, 48)
    # the CLI, given the same picture, regenerates the same pixels from the metadata
    r = run_cli("--from-image", str(edited), "--model", str(tiny_root), "--init-image", str(source),
                "--strength", "0.5", "--dtype", "float32", "-o", str(tmp_path / "cli.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(edited)), np.asarray(Image.open(tmp_path / "cli.png")))
    assert not list(Path(server.app.state.uploads).iterdir()), "the upload was not removed"
    with open(source, "rb") as f:  # streamed, the events are OpenAI's image_edit.* ones
        events = list(client(server).images.edit(image=f, prompt="a fox", stream=True, size="32x32",
                                                 extra_body={"steps": 2, "seed": 9}))  # fmt: skip
    assert [e.type for e in events] == ["image_edit.progress"] * 2 + ["image_edit.completed"]
    assert decode_png(events[-1].b64_json).size == (32, 32)


def test_edit_with_a_mask_inpaints(server, tiny_root, tmp_path):
    rng = np.random.default_rng(1)
    source, mask = tmp_path / "photo.png", tmp_path / "hole.png"
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(source)
    hole = np.zeros((32, 48), np.uint8)
    hole[8:24, 16:32] = 255  # white = repaint
    Image.fromarray(hole).save(mask)
    with open(source, "rb") as image, open(mask, "rb") as m:
        result = client(server).images.edit(image=image, mask=m, prompt="a window",
                                            extra_body={"strength": 1.0, "steps": 3, "seed": 4})  # fmt: skip
    edited = tmp_path / "inpainted.png"
    edited.write_bytes(base64.b64decode(result.data[0].b64_json))
    meta = read_metadata(edited)
    assert (meta["init_image"], meta["mask"]) == ("photo.png", "hole.png")
    r = run_cli("--from-image", str(edited), "--model", str(tiny_root), "--init-image", str(source), "--mask", str(mask),
                "--strength", "1.0", "--dtype", "float32", "-o", str(tmp_path / "cli.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(edited)), np.asarray(Image.open(tmp_path / "cli.png")))
    assert not list(Path(server.app.state.uploads).iterdir())


def test_stream_sends_progress_partial_images_and_each_image(server):
    events = list(client(server).images.generate(prompt="a fox", size="32x32", n=2, stream=True, partial_images=2,
                                                 extra_body={"steps": 4, "seed": 1}))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds.count("image_generation.progress") == 8
    assert kinds.count("image_generation.partial_image") == 4
    assert kinds.count("image_generation.completed") == 2 and kinds[-1] == "image_generation.completed"
    done = [e for e in events if e.type == "image_generation.completed"]
    assert [e.model_extra["seed"] for e in done] == [1, 2]
    assert decode_png(done[0].b64_json).size == (32, 32)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert [e.partial_image_index for e in partial] == [0, 1, 0, 1] and decode_png(partial[0].b64_json).size == (32, 32)


# ---- the queue, cancellation ------------------------------------------------------------------
def test_eight_concurrent_clients_are_served_or_told_to_retry(server):
    served_before = health(server)["stats"]["served"]
    barrier = threading.Barrier(8)
    outcomes = [None] * 8

    def one(i):
        barrier.wait(WAIT)
        try:
            r = client(server).images.generate(prompt=f"fox {i}", size="32x32", extra_body={"steps": 6, "seed": i})
            outcomes[i] = ("ok", decode_png(r.data[0].b64_json).size)
        except openai.RateLimitError as e:
            outcomes[i] = ("429", e.response.headers.get("retry-after"), e.body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert all(o is not None for o in outcomes), outcomes  # every client got an answer
    ok = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[0] == "429"]
    assert len(ok) + len(refused) == 8
    assert 1 <= len(ok) and refused, outcomes  # at most 1 running + QUEUE_SIZE waiting were admitted at once
    assert all(o[1] == (32, 32) for o in ok)
    assert all(o[1] and int(o[1]) >= 1 and o[2]["code"] == "rate_limit_exceeded" for o in refused)
    stats = wait_for(lambda: (h := health(server)) and not h["waiting"] and h["stats"], "the queue to drain")
    assert stats["served"] - served_before == len(ok)  # nothing ran that was refused, nothing admitted was lost


def _cancelled_jobs(server):
    return [j for j in server.app.state.worker.history if j.status == "cancelled"]


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_the_generation_and_the_server_stays_healthy(server, stream):
    before = len(_cancelled_jobs(server))
    conn = http.client.HTTPConnection(server.host, server.port, timeout=WAIT)
    body = {"prompt": "a long one", "size": "128x128", "steps": 200, "seed": 5, "stream": stream}
    conn.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        assert r.readline().startswith(b"event: image_generation.progress")
    else:
        wait_for(lambda: (h := health(server))["running"] and h["running"]["step"] >= 1, "the generation to start")
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: len(_cancelled_jobs(server)) > before, "the generation to be cancelled")
    job = _cancelled_jobs(server)[-1]
    assert 1 <= job.steps_done < job.steps_total == 200
    assert health(server)["running"] is None
    result = client(server).images.generate(prompt="after", size="32x32", extra_body={"steps": 2})
    assert decode_png(result.data[0].b64_json).size == (32, 32)


def test_a_failing_generation_answers_500_and_the_server_keeps_serving(server, monkeypatch):
    registry = server.app.state.registry
    pipe = registry.prepared(registry.default)

    def out_of_memory(**kwargs):
        raise RuntimeError("[metal::malloc] out of memory (simulated)")

    monkeypatch.setattr(pipe, "generate", out_of_memory)
    code, _, payload = post_json(server, {"prompt": "x", "size": "32x32", "steps": 1})
    assert code == 500 and payload["error"]["type"] == "server_error"
    assert "RuntimeError" in payload["error"]["message"] and "simulated" in payload["error"]["message"]
    monkeypatch.undo()
    result = client(server).images.generate(prompt="after", size="32x32", extra_body={"steps": 1})
    assert decode_png(result.data[0].b64_json).size == (32, 32)


# ---- refusals -------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (body, status, param, words in the message)
    ({"prompt": "x", "size": "100x64"}, 400, "size", "multiple of 16"),
    ({"prompt": "x", "size": "large"}, 400, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size", ""),  # beyond the tiny model's position grid
    ({"prompt": "x", "steps": 0}, 400, "steps", "steps"),
    ({"prompt": "x", "steps": 10**9}, 400, "steps", "steps"),
    ({"prompt": "x", "steps": 201}, 400, "steps", "at most 200 on this server"),
    ({"prompt": "x", "steps": 2.5}, 400, "steps", "whole number"),
    ({"prompt": "x", "steps": "ten"}, 400, "steps", "whole number"),
    (b'{"prompt": "x", "cfg": NaN}', 400, None, "NaN"),
    ({"prompt": "x", "cfg": "nan"}, 400, "cfg", "number"),
    ({"prompt": "x", "cfg": -1}, 400, "cfg", "cfg"),
    ({"prompt": "x", "seed": True}, 400, "seed", "whole number"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "seed"),
    ({"prompt": "x", "sampler": "ddim"}, 400, "sampler", "unknown sampler"),
    ({"prompt": "x", "t5_length": 600}, 400, "t5_length", "t5_length"),
    ({"prompt": "x", "n": 11}, 400, "n", "between 1 and 10"),
    ({"prompt": "x", "skip_layer_guidance": {"layers": "7"}}, 400, "skip_layer_guidance", "list"),
    ({"prompt": "x", "skip_layer_guidance": {"start": 0.5, "end": 0.1}}, 400, "skip_layer_guidance", "start < end"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "b64_json"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "x", "quality": 5}, 400, "quality", "must be a string"),
    ({"prompt": "x", "background": "transparent"}, 400, "background", "auto or opaque"),
    ({"prompt": "x", "foo": 1}, 400, "foo", "unknown parameter"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "must be a string"),
    ({"prompt": "x" * 100_000}, 400, "prompt", "characters"),
    ({"size": "64x64"}, 400, "prompt", "required"),
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    # a path in a field: no field names a file, and only served models can be named
    ({"prompt": "x", "init_image": "/etc/passwd"}, 400, "init_image", "unknown parameter"),
    ({"prompt": "x", "tokenizers": "/etc"}, 400, "tokenizers", "unknown parameter"),
    ({"prompt": "x", "model": "/etc"}, 404, "model", "not served here"),
    ({"prompt": "x", "model": "stabilityai/stable-diffusion-3.5-large"}, 404, "model", "not served here"),
]


@pytest.mark.parametrize("body, status, param, words", BAD_REQUESTS, ids=[f"{i}-{case[2] or 'body'}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_refused_with_a_clear_message(server, body, status, param, words):
    served_before = health(server)["stats"]
    code, _, payload = post_json(server, body)
    assert code == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"] and error["param"] == param, error
    assert health(server)["stats"] == served_before  # nothing was queued


def test_a_path_named_as_model_is_not_read(server, tmp_path):
    other = tmp_path / "other_model"  # exists, but the server was not started with it
    other.mkdir()
    code, _, payload = post_json(server, {"prompt": "x", "model": str(other)})
    assert code == 404 and payload["error"]["code"] == "model_not_found"
    assert list(other.iterdir()) == []


def test_oversized_body_is_413(server):
    code, _, payload = post_json(server, json.dumps({"prompt": "x", "negative_prompt": "y" * (2 << 20)}).encode())
    assert code == 413 and payload["error"]["code"] == "request_too_large"
    # without a Content-Length the limit is counted as the body arrives
    conn = http.client.HTTPConnection(server.host, server.port, timeout=WAIT)
    conn.putrequest("POST", "/v1/images/generations")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for _ in range(3):
        chunk = b"x" * (1 << 20)
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert health(server)["status"] == "ok"


def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "sd35boundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("fields, files, param, words", [
    ({"prompt": "x", "cfg": "nan"}, {"image": ("a.png", _png())}, "cfg", "finite"),
    ({"prompt": "x", "strength": "1.5"}, {"image": ("a.png", _png())}, "strength", "strength"),
    ({"prompt": "x", "steps": "many"}, {"image": ("a.png", _png())}, "steps", "whole number"),
    ({"prompt": "x"}, {}, "image", "image is required"),
    ({"prompt": "x"}, {"image": ("a.png", b"not an image")}, "image", "not a readable image"),
    ({"prompt": "x"}, {"image": ("a.png", _png()), "mask": ("m.png", _png((64, 16)))}, "mask", "aspect ratio"),
    ({"prompt": "x", "mask_blur": "nan"}, {"image": ("a.png", _png()), "mask": ("m.png", _png())}, "mask_blur", "finite"),
    ({"prompt": "x", "init_image": "/etc/passwd"}, {"image": ("a.png", _png())}, "init_image", "unknown parameter"),
    ({"prompt": "x", "size": "64x6"}, {"image": ("../../etc/passwd", _png())}, "size", "multiple of 16"),
])  # fmt: skip
def test_bad_edits_are_refused(server, fields, files, param, words):
    body, content_type = _multipart(fields, files)
    code, _, payload = request(server, "POST", "/v1/images/edits", body, {"Content-Type": content_type})
    assert code == 400, payload
    assert words in payload["error"]["message"] and payload["error"]["param"] == param, payload
    assert not list(Path(server.app.state.uploads).iterdir()), "a refused upload was left on disk"


def test_loras_loaded_by_the_server_are_reweighted_per_request(tiny_root, tmp_path):
    from lora_files import PEFT, dotted_key, linear_stems, random_lora, save
    from safetensors.torch import load_file

    state = load_file(str(tiny_root / "transformer" / "diffusion_pytorch_model.safetensors"))
    tensors, _ = random_lora(state, linear_stems(state), dotted_key("transformer."), suffixes=PEFT, with_alpha=False)
    lora = save(tensors, tmp_path / "style.safetensors")
    s = start(tiny_root, "--lora", f"{lora}:0.8")
    try:
        assert client(s).models.list().data[0].model_extra["loras"] == {"style": 0.8}

        def generate(**extra) -> bytes:
            r = client(s).images.generate(prompt="a fox", size="32x32", extra_body={"steps": 2, "seed": 3, **extra})
            return base64.b64decode(r.data[0].b64_json)

        default, off, again = generate(), generate(loras={"style": 0}), generate()
        pixels = [np.asarray(Image.open(io.BytesIO(png))) for png in (default, off, again)]
        assert not np.array_equal(pixels[0], pixels[1])
        assert np.array_equal(pixels[0], pixels[2])  # the --lora weight is restored after a request
        records = json.loads(Image.open(io.BytesIO(off)).text["sd35_mlx"])["loras"]
        assert [(r["name"], r["scale"]) for r in records] == [("style", 0.0)]
        code, _, payload = post_json(s, {"prompt": "x", "loras": {"other": 1}})
        assert code == 400 and payload["error"]["param"] == "loras" and "no LoRA named 'other'" in payload["error"]["message"]
        # the metadata names the LoRA and its weight, so the CLI regenerates the image with it
        # (metadata is untrusted: the LoRA file it names is read only with --trust-metadata-model)
        (tmp_path / "served.png").write_bytes(default)
        r = run_cli("--from-image", str(tmp_path / "served.png"), "--model", str(tiny_root), "--dtype", "float32",
                    "--trust-metadata-model", "-o", str(tmp_path / "cli.png"))  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert np.array_equal(pixels[0], np.asarray(Image.open(tmp_path / "cli.png")))
    finally:
        s.stop()


def test_allowed_models_are_prepared_on_their_first_request(tiny_root, tmp_path):
    other = tmp_path / "allowed"
    other.symlink_to(tiny_root, target_is_directory=True)  # another id, the same files
    s = start(tiny_root, "--allow-model", str(other))
    try:
        listed = {m.id: m.model_extra["prepared"] for m in client(s).models.list()}
        assert listed == {str(tiny_root): True, str(other): False}
        result = client(s).images.generate(model=str(other), prompt="x", size="32x32", extra_body={"steps": 1})
        assert json.loads(decode_png(result.data[0].b64_json).text["sd35_mlx"])["model"].endswith("allowed")
        assert {m.id: m.model_extra["prepared"] for m in client(s).models.list()}[str(other)] is True
    finally:
        s.stop()


# ---- security defaults -------------------------------------------------------------------------
def test_api_key_is_enforced_and_cors_is_opt_in(server, tiny_root):
    _, headers, _ = request(server, "GET", "/v1/models", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}  # CORS off by default
    keyed = start(tiny_root, "--api-key", "sekret", "--cors", "http://app.example")
    try:
        for auth in (None, "Bearer wrong", "sekret", "Basic sekret"):
            code, headers, payload = request(keyed, "GET", "/v1/models", headers={"Authorization": auth} if auth else {})
            assert code == 401 and payload["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            client(keyed, api_key="wrong").models.list()
        assert [m.id for m in client(keyed, api_key="sekret").models.list()] == [str(tiny_root)]
        result = client(keyed, api_key="sekret").images.generate(prompt="x", size="32x32", extra_body={"steps": 1})
        assert decode_png(result.data[0].b64_json).size == (32, 32)
        assert request(keyed, "GET", "/health")[0] == 200  # liveness needs no key
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        code, headers, _ = request(keyed, "OPTIONS", "/v1/images/generations", headers=preflight)
        assert code == 200 and headers["access-control-allow-origin"] == "http://app.example"
        code, headers, _ = request(keyed, "OPTIONS", "/v1/images/generations", headers={**preflight, "Origin": "http://evil.example"})
        assert code == 400 and "access-control-allow-origin" not in headers
    finally:
        keyed.stop()


def test_command_line_server_binds_loopback_by_default(tiny_root):
    assert build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"
    proc = subprocess.Popen([sys.executable, "-m", "sd35_mlx.serve", "--model", str(tiny_root), "--port", "0",
                             "--dtype", "float32", "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()  # the first line names the address (bounded by the timeout below)
        assert line.startswith("sd35_mlx server on http://127.0.0.1:"), (line, proc.poll())
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        assert _listening_addresses(port) == [f"127.0.0.1:{port}"]  # not 0.0.0.0, not [::]
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT)


def _listening_addresses(port: int) -> list[str]:
    """'ip:port' of every TCP socket listening on `port` (Linux /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                ip = ".".join(str(b) for b in raw[::-1]) if len(raw) == 4 else raw.hex()
                found.append(f"{ip}:{port}")
    return found


def test_command_line_refuses_bad_flags_before_loading(capsys):
    from sd35_mlx.serve.cli import main

    assert main(["--model", "/nonexistent-model", "--queue-size", "-1"]) == 2
    assert "--queue-size" in capsys.readouterr().err
    assert main(["--model", "/nonexistent-model", "--port", "0"]) == 2
    assert "error:" in capsys.readouterr().err
