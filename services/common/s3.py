"""A small S3 client: the few calls the embedded broker's storage repair needs.

Path-style requests signed with AWS Signature Version 4, configured by the variables Tansu
reads (``AWS_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), so it reaches the same server as the broker.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import httpx

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """SigV4's derived key for one day, region and service."""
    key = _hmac(f"AWS4{secret}".encode(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def authorization(
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    payload_sha256: str,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
) -> str:
    """The ``Authorization`` header of a request signed with AWS Signature Version 4.

    ``path`` is already URI-encoded; ``headers`` are the ones signed and must hold
    ``x-amz-date`` (``YYYYMMDDTHHMMSSZ``) and ``host``.
    """
    lowered = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
    signed = ";".join(sorted(lowered))
    canonical = "\n".join(
        [
            method,
            path,
            "&".join(
                f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
            ),
            "".join(f"{name}:{lowered[name]}\n" for name in sorted(lowered)),
            signed,
            payload_sha256,
        ]
    )
    stamp = lowered["x-amz-date"]
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = signing_key(secret_key, stamp[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )


def _without_namespace(root: ET.Element) -> ET.Element:
    """S3 answers in its namespace, s3rver in another: compare local names."""
    for element in root.iter():
        element.tag = element.tag.rpartition("}")[2]
    return root


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int


class S3:
    """One bucket, path-style: ``{endpoint}/{bucket}/{key}``."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        region: str,
        timeout_s: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint.rstrip("/")
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self._http = httpx.Client(timeout=timeout_s)

    @classmethod
    def from_env(cls, bucket: str, env: Mapping[str, str] | None = None) -> S3:
        """Configured as Tansu is, from ``AWS_*`` variables."""
        env = os.environ if env is None else env
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"
        return cls(
            bucket,
            endpoint=env.get("AWS_ENDPOINT") or f"https://s3.{region}.amazonaws.com",
            access_key=env.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY", ""),
            region=region,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> S3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        key: str = "",
        query: Mapping[str, str] | None = None,
        body: bytes = b"",
        extra: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        query = dict(query or {})
        path = quote(f"/{self.bucket}/{key}", safe="/-_.~")
        url = httpx.URL(self.endpoint + path)
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        headers = {
            "host": url.netloc.decode(),
            "x-amz-date": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
            "x-amz-content-sha256": payload,
            **(extra or {}),
        }
        headers["authorization"] = authorization(
            method,
            path,
            query,
            headers,
            payload,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )
        # the query string exactly as signed
        target = url.copy_with(
            query="&".join(
                f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
            ).encode()
            or None
        )
        response = self._http.request(method, target, content=body, headers=headers)
        if response.status_code >= 300 and response.status_code not in (404, 416):
            response.raise_for_status()
        return response

    def list(self, prefix: str, *, start_after: str = "") -> Iterator[S3Object]:
        """ListObjectsV2, every page: the objects under ``prefix``, in key order."""
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if start_after:
                query["start-after"] = start_after
            if token:
                query["continuation-token"] = token
            root = _without_namespace(ET.fromstring(self._request("GET", query=query).content))
            for item in root.iter("Contents"):
                yield S3Object(item.findtext("Key", ""), int(item.findtext("Size", "0")))
            token = root.findtext("NextContinuationToken", "")
            if root.findtext("IsTruncated") != "true" or not token:
                return

    def get(self, key: str, first: int | None = None, last: int | None = None) -> bytes | None:
        """The object's bytes (``first``-``last`` inclusive, when given); None if missing.

        A range of an empty object: S3 answers 416, s3rver closes the connection; ask for
        ranges of objects listed with bytes in them."""
        extra = {"range": f"bytes={first}-{last}"} if first is not None else None
        response = self._request("GET", key, extra=extra)
        if response.status_code == 416:  # a range past the end of an object (an empty one)
            return b""
        return None if response.status_code == 404 else response.content

    def put(self, key: str, body: bytes) -> None:
        self._request("PUT", key, body=body)

    def delete(self, key: str) -> None:
        self._request("DELETE", key)
