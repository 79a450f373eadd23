"""One server in its own process, for the benches and the load run: ``python -m tests.bench._serve
MODE HOME [options]``. It prints one JSON line (``{"port": ..., "pid": ...}``) once it listens,
serves until its stdin closes, then stops cleanly.

Modes, all with the deployment's server certificate and client certificates required:
- ``gateway``: the real gateway (:func:`gateway.server.build`) with a :class:`FastSite`, or with
  its embedded Docker site (``--site docker``), or none but remote ones (``--site remote``); the
  fast site's run counts go to ``--runs-out``.
- ``echo``: a bare gRPC echo (a generic handler, the gateway's thread pool and message limits).
- ``site``: a remote site (``--site remote`` gateways take them) in its own process, dialling
  ``--gateway`` as ``--name``: a fast site that signs its releases, one dataset of its own.
- ``tls``: raw TLS over a socket: ``PUT n`` stores the next n bytes in a file under ``--dir``,
  ``GET n`` sends n bytes of ``--source``; the limit the gateway's transfers are measured against.
  Files are written the way the gateway and the client write theirs (:class:`WriteBehind`), so
  that the ratio measures the transport and not a difference in how the bytes reach the disk.

A separate process keeps the clients' work out of the server's interpreter and lets the caller
read the server's resident memory from ``/proc/PID/status``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

CHUNK = 1 << 20
ECHO_METHOD = "/bench.Echo/Echo"


def _announce(port: int) -> None:
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)


def _wait_for_stdin_eof() -> None:
    while sys.stdin.read(4096):
        pass


def serve_gateway(args: argparse.Namespace) -> None:
    from gateway.server import build
    from tests.bench._fast import FastSite

    site = None
    if args.site == "fast":
        site = FastSite(
            args.home / "fast-site", release_bytes=args.release_bytes, hold_s=args.hold_s
        )
    running = build(
        args.home,
        site=site,
        address="localhost:0",
        workers=args.workers,
        max_queued=args.max_queued,
        local_site=args.site != "remote",
    )
    running.gateway.max_bundle_bytes = args.max_bundle_bytes
    _announce(running.port)
    try:
        _wait_for_stdin_eof()
    finally:
        running.stop()
        if site is not None and args.runs_out is not None:
            site.write_runs(args.runs_out)


def serve_site(args: argparse.Namespace) -> None:
    """A remote site in its own process, dialling ``--gateway``: a :class:`FastSite` that signs
    its releases, one dataset of its own (``d-NAME``, for olivia), its own audit log."""
    import io
    import tarfile

    from enclave.link import PushedDataset, SiteLink, open_site_audit
    from enclave.provenance import SiteSigner
    from tests.bench._fast import FastSite

    ids = args.home / "identities"
    ca = args.home / "ca" / "ca.pem"
    from enclave.identity import IdentityFiles

    tls = IdentityFiles(ids / f"{args.name}.pem", ids / f"{args.name}.key", ca)
    signer_ids = IdentityFiles(ids / f"{args.name}-signer.pem", ids / f"{args.name}-signer.key", ca)
    site = FastSite(
        args.home / "site",
        signer=SiteSigner.from_files(cert=signer_ids.cert, key=signer_ids.key),
        hold_s=args.hold_s,
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = f"texts kept at {args.name}\n".encode() * 64
        info = tarfile.TarInfo("doc-0.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    stored = site.store_dataset(f"d-{args.name}", archive=buf)
    audit, audit_cert = open_site_audit(args.home / "audit" / "audit.db", signer_ids)
    link = SiteLink(
        site,
        address=args.gateway,
        identity=tls,
        state=args.home / "link",
        slots=args.workers,
        datasets=lambda: [PushedDataset(stored, "olivia")],
        audit=audit,
        audit_cert=audit_cert,
    )
    serving = threading.Thread(target=link.serve, daemon=True)
    serving.start()
    link.connected.wait(60)
    _announce(0)
    try:
        _wait_for_stdin_eof()
    finally:
        link.stop()
        serving.join(timeout=60)
        audit.close()
        if args.runs_out is not None:
            site.write_runs(args.runs_out)


def _server_credentials(home: Path) -> grpc.ServerCredentials:
    from gateway.server import server_identity

    cert, key, ca = server_identity(home).read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def serve_echo(args: argparse.Namespace) -> None:
    from gateway.server import MAX_MESSAGE

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    port = server.add_secure_port("localhost:0", _server_credentials(args.home))
    server.start()
    _announce(port)
    try:
        _wait_for_stdin_eof()
    finally:
        server.stop(1).wait()


def serve_tls(args: argparse.Namespace) -> None:
    from enclave.writebehind import WriteBehind
    from gateway.server import server_identity

    ident = server_identity(args.home)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ident.cert, ident.key)
    ctx.load_verify_locations(ident.ca_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    counter = iter(range(1 << 30))

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            f = conn.makefile("rb", buffering=0)
            verb, n_text = f.readline().decode().split()
            n = int(n_text)
            if verb == "PUT":
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                left = n
                with WriteBehind.create(args.dir / f"put-{next(counter)}.bin") as out:
                    while left:
                        got = conn.recv_into(view, min(left, CHUNK))
                        if not got:
                            raise ConnectionError("the sender went away")
                        out.write(view[:got])
                        left -= got
                conn.sendall(b"OK\n")
            elif verb == "GET":
                with args.source.open("rb") as src:
                    left = n
                    while left:
                        data = src.read(min(left, CHUNK))
                        if not data:
                            raise ValueError(f"{args.source} is shorter than {n} bytes")
                        conn.sendall(data)
                        left -= len(data)

    def accept() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    _announce(listener.getsockname()[1])
    try:
        _wait_for_stdin_eof()
    finally:
        listener.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench._serve", description=__doc__)
    p.add_argument("mode", choices=["gateway", "echo", "tls", "site"])
    p.add_argument("home", type=Path)
    p.add_argument("--site", choices=["fast", "docker", "remote"], default="fast")
    p.add_argument("--gateway", help="site: the gateway's address")
    p.add_argument("--name", help="site: its name (its identities under HOME/identities)")
    p.add_argument("--release-bytes", type=int, default=0)
    p.add_argument("--hold-s", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-queued", type=int, default=100)
    p.add_argument("--max-bundle-bytes", type=int, default=256 << 20)
    p.add_argument("--runs-out", type=Path)
    p.add_argument("--dir", type=Path, help="tls: where PUT stores what it receives")
    p.add_argument("--source", type=Path, help="tls: what GET sends")
    args = p.parse_args(argv)
    serve: dict[str, Any] = {
        "gateway": serve_gateway,
        "echo": serve_echo,
        "tls": serve_tls,
        "site": serve_site,
    }
    serve[args.mode](args)


if __name__ == "__main__":
    main()
