"""The payloads of a federated round's steps over the site link (``PullRound`` and
``AnswerRound`` in ``proto/sealroom/v1/site.proto``): a JSON document, its length first, then
any raw bytes (a round's start, a masked update). Each ``*_step``/``*_answer`` pair is one
:class:`enclave.federated.RoundSite` method: what the gateway sends, what the site returns.

Everything decoded here came over the network from the other side: shapes are checked and a
malformed payload raises :class:`InvalidInput` naming what is wrong; the protocol's own checks
(signatures, commitments) are the secure aggregation's.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from sealroom.v1 import site_pb2 as pb

from enclave.contract import SiteReport
from enclave.linkwire import report_message, report_value
from enclave.provenance.federated import Countersign
from enclave.secagg import Advert, Reveal, RoundConfig
from policies.errors import InvalidInput
from trainers.weights import TensorLayout

MAX_DOC = 64 * 1024 * 1024


def pack(doc: Mapping[str, Any], blob: bytes = b"") -> bytes:
    text = json.dumps(doc, sort_keys=True).encode()
    return struct.pack(">Q", len(text)) + text + blob


def unpack(payload: bytes) -> tuple[dict[str, Any], bytes]:
    if len(payload) < 8:
        raise InvalidInput("round payload: too short")
    (size,) = struct.unpack(">Q", payload[:8])
    if size > min(MAX_DOC, len(payload) - 8):
        raise InvalidInput("round payload: its document runs past its end")
    try:
        doc = json.loads(payload[8 : 8 + size])
    except ValueError as e:
        raise InvalidInput(f"round payload: not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidInput("round payload: not a JSON object")
    return doc, payload[8 + size :]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"round payload: {what} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"round payload: {what} is not base64") from e


def _field(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidInput(f"round payload: {key} is missing or not a {kind.__name__}")
    return value


# -- values ------------------------------------------------------------------------------------


def config_doc(config: RoundConfig) -> dict[str, Any]:
    doc = {k: getattr(config, k) for k in config.__dataclass_fields__}
    doc["members"] = list(config.members)
    return doc


def config_value(doc: object) -> RoundConfig:
    if not isinstance(doc, dict) or set(doc) != set(RoundConfig.__dataclass_fields__):
        raise InvalidInput("round payload: the round's settings are malformed")
    try:
        return RoundConfig(**{**doc, "members": tuple(doc["members"])})
    except TypeError as e:
        raise InvalidInput(f"round payload: the round's settings are malformed: {e}") from e


def advert_doc(a: Advert) -> dict[str, str]:
    return {
        "site": a.site,
        "cipher_key": b64(a.cipher_key),
        "mask_key": b64(a.mask_key),
        "seed_commit": b64(a.seed_commit),
        "cert_pem": a.cert_pem,
        "signature": a.signature,
    }


def advert_value(doc: object) -> Advert:
    if not isinstance(doc, dict):
        raise InvalidInput("round payload: an advert is malformed")
    return Advert(
        site=_field(doc, "site", str),
        cipher_key=unb64(doc.get("cipher_key"), "cipher_key"),
        mask_key=unb64(doc.get("mask_key"), "mask_key"),
        seed_commit=unb64(doc.get("seed_commit"), "seed_commit"),
        cert_pem=_field(doc, "cert_pem", str),
        signature=_field(doc, "signature", str),
    )


def boxes_doc(boxes: Mapping[str, bytes]) -> dict[str, str]:
    return {k: b64(v) for k, v in boxes.items()}


def boxes_value(doc: object, what: str) -> dict[str, bytes]:
    if not isinstance(doc, dict):
        raise InvalidInput(f"round payload: {what} is malformed")
    return {str(k): unb64(v, what) for k, v in doc.items()}


def reveal_doc(r: Reveal) -> dict[str, Any]:
    return {"site": r.site, "seeds": boxes_doc(r.seeds), "keys": boxes_doc(r.keys)}


def reveal_value(doc: object) -> Reveal:
    if not isinstance(doc, dict):
        raise InvalidInput("round payload: a reveal is malformed")
    return Reveal(
        site=_field(doc, "site", str),
        seeds=boxes_value(doc.get("seeds"), "seeds"),
        keys=boxes_value(doc.get("keys"), "keys"),
    )


def survivors_value(doc: object) -> tuple[str, ...]:
    if not isinstance(doc, list) or not all(isinstance(s, str) for s in doc):
        raise InvalidInput("round payload: the survivors are not a list of names")
    return tuple(doc)


def layout_doc(layout: TensorLayout) -> dict[str, list[Any]]:
    return {n: [d, list(s)] for n, (d, s) in layout.items()}


def layout_value(doc: object) -> TensorLayout:
    if not isinstance(doc, dict):
        raise InvalidInput("round payload: the layout is malformed")
    try:
        return {str(n): (str(d), tuple(int(x) for x in s)) for n, (d, s) in doc.items()}
    except (TypeError, ValueError) as e:
        raise InvalidInput("round payload: the layout is malformed") from e


def words(blob: bytes, length: int) -> np.ndarray:
    """A masked update: ``length`` little-endian 64-bit words."""
    if len(blob) != 8 * length:
        raise InvalidInput(f"round payload: {len(blob)} bytes, not {length} words")
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64)


def countersign_doc(c: Countersign) -> dict[str, Any]:
    return c.to_obj()


def countersign_value(doc: object) -> Countersign:
    if not isinstance(doc, dict):
        raise InvalidInput("round payload: a countersignature is malformed")
    datasets = doc.get("datasets")
    epsilon = doc.get("epsilon")
    if not isinstance(datasets, dict) or not (epsilon is None or isinstance(epsilon, float | int)):
        raise InvalidInput("round payload: a countersignature is malformed")
    return Countersign(
        site=_field(doc, "site", str),
        datasets={str(k): int(v) for k, v in datasets.items()},
        rounds=_field(doc, "rounds", int),
        epsilon=None if epsilon is None else float(epsilon),
        cert_pem=_field(doc, "cert_pem", str),
        signature=_field(doc, "signature", str),
    )


def reports_doc(reports: list[SiteReport]) -> list[str]:
    return [b64(report_message(r).SerializeToString()) for r in reports]


def reports_value(doc: object, *, site: str) -> list[SiteReport]:
    if not isinstance(doc, list):
        raise InvalidInput("round payload: the reports are not a list")
    out = []
    for text in doc:
        msg = pb.SiteReport()
        msg.ParseFromString(unb64(text, "a report"))
        out.append(report_value(msg, release_dir=None, site=site))
    return out
