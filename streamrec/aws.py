"""The one AWS client factory.

All AWS access goes through :func:`client`, so endpoint (moto locally), credentials and the retry
policy (botocore adaptive mode, which also rate-limits the client under throttling) are set in one place.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from streamrec.settings import AwsSettings


def client(service: str, region: str, aws: AwsSettings | None = None, *, max_attempts: int | None = None,
           **config: Any) -> Any:
    """A boto3 client. ``max_attempts`` overrides ``aws.max_attempts`` where a caller has a deadline of
    its own (the serving path gives up after milliseconds; retrying for seconds would only pile up)."""
    aws = aws or AwsSettings()
    cfg = Config(
        region_name=region,
        retries={"mode": "adaptive", "max_attempts": max_attempts or aws.max_attempts},
        connect_timeout=5,
        read_timeout=config.pop("read_timeout", 30),
        max_pool_connections=config.pop("max_pool_connections", 20),
        **config,
    )
    session = boto3.session.Session(
        aws_access_key_id=aws.access_key_id,
        aws_secret_access_key=aws.secret_access_key,
        region_name=region,
    )
    # endpoint_url=None lets botocore apply AWS_ENDPOINT_URL / the real regional endpoint.
    return session.client(service, endpoint_url=aws.endpoint_url, config=cfg)
