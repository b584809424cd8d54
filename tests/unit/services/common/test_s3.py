"""SigV4 against the examples AWS publishes for S3 (Signature Version 4, header-based)."""

from __future__ import annotations

from services.common.s3 import EMPTY_SHA256, authorization, signing_key

ACCESS = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_get_object_with_range() -> None:
    header = authorization(
        "GET",
        "/test.txt",
        {},
        {
            "Host": "examplebucket.s3.amazonaws.com",
            "Range": "bytes=0-9",
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
        },
        EMPTY_SHA256,
        access_key=ACCESS,
        secret_key=SECRET,
        region="us-east-1",
    )
    assert header == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_list_objects_query_string() -> None:
    header = authorization(
        "GET",
        "/",
        {"max-keys": "2", "prefix": "J"},
        {
            "Host": "examplebucket.s3.amazonaws.com",
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
        },
        EMPTY_SHA256,
        access_key=ACCESS,
        secret_key=SECRET,
        region="us-east-1",
    )
    assert header.endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


def test_signing_key() -> None:
    key = signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830", "us-east-1", "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
