"""The data download as two nodes' local rank 0 run it at once into one shared data.root, from a real (slow)
HTTP server on loopback serving the MNIST archives: every file under MNIST/raw is whole whenever it is
seen, both downloads succeed, and no temporary folder is left."""

from __future__ import annotations

import gzip
import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import REPO, job_env

CHUNK, PAUSE = 256 * 1024, 0.01  # about 25 MB/s: a download takes a while, as over a network


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001 (the base class's signature)
        while chunk := source.read(CHUNK):
            outputfile.write(chunk)
            outputfile.flush()
            time.sleep(PAUSE)

    def log_message(self, *args: object) -> None:
        pass


# The archives here are recompressed copies: their checksums, not torchvision's list of the originals.
DOWNLOAD = """
import hashlib, pathlib, sys
import torchvision.datasets as d
d.MNIST.mirrors = [sys.argv[2]]
d.MNIST.resources = [(n, hashlib.md5((pathlib.Path(sys.argv[3]) / n).read_bytes()).hexdigest()) for n, _ in d.MNIST.resources]
from rnnddp.data.mnist import locate_dataset
locate_dataset("mnist", sys.argv[1], cache_dir=sys.argv[1] + "/cache")
"""


def test_two_nodes_downloading_at_once_never_show_a_partial_file(tmp_path: Path, mnist_root: Path) -> None:
    gz = mnist_root / "MNIST" / "raw"
    sizes = {}
    for f in gz.glob("*.gz"):
        sizes[f.name] = f.stat().st_size
        with gzip.open(f, "rb") as src:
            sizes[f.name[:-3]] = len(src.read())

    def serve(*args: object) -> _SlowHandler:
        return _SlowHandler(*args, directory=str(gz))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    root = tmp_path / "shared_root"
    raw = root / "MNIST" / "raw"
    partial: list[str] = []
    try:
        nodes = [
            subprocess.Popen(
                [sys.executable, "-c", DOWNLOAD, str(root), url, str(gz)],
                env=job_env(),
                cwd=REPO,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        while any(n.poll() is None for n in nodes):
            for f in raw.glob("*") if raw.is_dir() else ():
                try:
                    size = f.stat().st_size
                except FileNotFoundError:
                    continue
                if size != sizes.get(f.name):
                    partial.append(f"{f.name}: {size} of {sizes.get(f.name)} bytes")
            time.sleep(0.005)
        errors = [n.stderr.read().decode()[-2000:] for n in nodes]
    finally:
        server.shutdown()
    assert [n.returncode for n in nodes] == [0, 0], errors
    assert not partial, partial[:5]
    assert {f.name: f.stat().st_size for f in raw.iterdir()} == sizes
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
