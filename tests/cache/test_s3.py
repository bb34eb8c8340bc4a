"""Sharing a store: generate into S3 (a real moto server on 127.0.0.1), verify, train from it, no credential
in any object; read-only over HTTP from a static file server that honours Range requests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("moto", reason="moto[server] is in the 'test' extra")
boto3 = pytest.importorskip("boto3")

from tdr.cache import open_store  # noqa: E402
from tdr.cache.report import verify  # noqa: E402
from tdr.cli import app  # noqa: E402

runner = CliRunner()
KEY_ID, SECRET = "AKIATDRTESTKEY0000001", "tdr-test-secret-do-not-store-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(port, proc)
        for name, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="team")
        yield endpoint, client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_generate_verify_and_train_from_s3(s3):
    endpoint, client = s3
    url = "s3://team/demo.zarr"
    result = runner.invoke(app, ["generate-guidance", "--preset", "tiny", "--steps", "1", "--size", "64", "--device", "cpu",
                                 "--dataset", "demo", "--split", "test", "--store", url, "--batch-size", "4",
                                 "--storage-option", f"endpoint_url={endpoint}"])
    assert result.exit_code == 0, (result.output, result.exception)
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    store = open_store(url, storage_options=options)
    assert store.guidance().done("test").all()
    assert verify(store).ok
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="team") for o in page["Contents"]]
    assert any("/guidance/" in k and "/c/" in k for k in keys) and not any("/claims/" in k for k in keys)
    for key in keys:  # credentials live in the environment only, never in the store
        body = client.get_object(Bucket="team", Key=key)["Body"].read()
        assert KEY_ID.encode() not in body and SECRET.encode() not in body, key
    assert SECRET not in result.output and KEY_ID not in result.output

    from tdr.guided.data import TripleDataset

    ds = TripleDataset(url, "test", patch=64, guidance="cache", storage_options=options)
    item = ds[0]
    values = item.values() if isinstance(item, dict) else item
    assert all(np.asarray(v).size for v in values)


def test_every_cache_command_reaches_s3(s3, tmp_path, monkeypatch):
    endpoint, _ = s3
    url = "s3://team/small.zarr"
    opt = ["--storage-option", f"endpoint_url={endpoint}"]
    res = runner.invoke(app, ["cache", "ingest", "--dataset", "demo", "--split", "test", "--store", url, *opt])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cache", "info", url, "--json", *opt])
    assert res.exit_code == 0 and '"images": 12' in res.stdout, res.output
    guides = tmp_path / "g"
    guides.mkdir()
    for image_id in open_store(url, storage_options={"endpoint_url": endpoint})["test"].ids:
        Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(guides / f"{image_id.replace('/', '_')}.png")
    res = runner.invoke(app, ["cache", "import-guidance", url, "--split", "test", "--from", str(guides), *opt])
    assert res.exit_code == 0 and "imported 12" in res.stdout, res.output
    res = runner.invoke(app, ["cache", "export", url, "--to", str(tmp_path / "out"), *opt])
    assert res.exit_code == 0 and len(list((tmp_path / "out").rglob("*.png"))) == 12, res.output
    # without the option the endpoint is unknown: one clear error line, exit 1 (a real process, so that
    # what the interpreter prints at exit is seen too)
    proc = subprocess.run([sys.executable, "-c", "from tdr.cli import main; main()", "cache", "verify", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Cannot open store" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # the environment variable serves every command and open_store (train/eval DataLoader workers too)
    monkeypatch.setenv("TDR_STORAGE_OPTIONS", f'{{"endpoint_url": "{endpoint}"}}')
    res = runner.invoke(app, ["cache", "verify", url])
    assert res.exit_code == 0 and "ok: 36 images checked" in res.stdout, res.output  # 12 × (lq, gt, guidance)
    assert open_store(url)["test"].ids


RANGE_SERVER = r'''
import http.server, os, re, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        a, b = re.match(r"bytes=(\d*)-(\d*)", rng).groups()
        start, end = (size - int(b), size - 1) if a == "" else (int(a), min(int(b), size - 1) if b else size - 1)
        f = open(path, "rb"); f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.range_left = end - start + 1
        return f
    def copyfile(self, src, dst):
        left = getattr(self, "range_left", None)
        dst.write(src.read() if left is None else src.read(left))
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


class FakePipe:
    def __call__(self, images, ids, *, steps, scale, seed, layout, size):
        return np.stack([np.full((size, size, 3), int(i[:2], 16), np.uint8) for i in ids])


def test_read_only_over_http(tmp_path):
    """Any static server works if it answers Range requests (nginx, caddy, S3/GCS public buckets);
    ``python -m http.server`` does not, so degraded/clean tiles (sharded) cannot be read through it."""
    from tdr.cache import create_store
    from tdr.cache.ingest import ingest_split
    from tdr.guided.data import TripleDataset
    from tdr.pipeline.generate import SamplingSettings, generate

    rng = np.random.default_rng(0)
    pairs = []
    for k in range(3):
        lq, gt = (rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for _ in range(2))
        pairs.append(type("Pair", (), {"id": f"img{k}", "gt_key": f"gt{k}",
                                       "lq": type("R", (), {"key": f"lq{k}", "load": staticmethod(lambda a=lq: a)})(),
                                       "gt": type("R", (), {"key": f"gt{k}", "load": staticmethod(lambda a=gt: a)})()}))
    local = create_store(str(tmp_path / "s.zarr"), dataset="fake", metric={"y_channel": False})
    ingest_split(local, "test", pairs)
    generate(open_store(str(tmp_path / "s.zarr"), "a"), ["test"], FakePipe(), SamplingSettings(steps=1, size=64), {"preset": "fake"})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", RANGE_SERVER, str(port)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(port, proc)
        url = f"http://127.0.0.1:{port}/s.zarr"
        remote = open_store(url)
        assert remote.splits == ["test"] and remote.guidance_ids() == local.guidance_ids()
        assert remote.guidance().done("test").all()  # listing works: the server's directory pages
        mine = open_store(str(tmp_path / "s.zarr"))
        np.testing.assert_array_equal(remote["test"].read_lq(1), mine["test"].read_lq(1))
        np.testing.assert_array_equal(remote.guidance().read("test", 2), mine.guidance().read("test", 2))
        ds = TripleDataset(url, "test", patch=64, guidance="cache")
        assert ds[0] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
