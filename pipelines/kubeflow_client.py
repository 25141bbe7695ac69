"""The one way this project talks to a Kubeflow Pipelines endpoint: `kfp.Client`, with the
API's failures (a refusal, an unreachable host, kfp's own refusals) as one-line project errors."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from typing import Any

from tumorflow.core.errors import TumorflowError


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def kfp_message(body: Any) -> str:
    """The message of a KFP API error body (JSON with `error_message` or `message`)."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        payload = json.loads(text)
    except ValueError:
        return _one_line(text)
    if isinstance(payload, dict):
        return _one_line(payload.get("error_message") or payload.get("message") or text)
    return _one_line(text)


@contextlib.contextmanager
def kubeflow_api(host: str, error: type[TumorflowError], client: Any = None) -> Iterator[Any]:
    """A `kfp.Client` of `host` (`client` when given: one made before), raising `error` with one
    line for whatever the API or the connection answers instead."""
    import kfp
    import kfp_server_api
    import urllib3

    try:
        if client is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=host)
        yield client
    except kfp_server_api.ApiException as exc:
        raise error(
            f"Kubeflow Pipelines at {host} answered {exc.status} {exc.reason}: "
            f"{kfp_message(exc.body)}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise error(f"cannot reach Kubeflow Pipelines at {host}: {_one_line(reason)}") from None
    except ValueError as exc:  # kfp's own refusals, e.g. two pipelines of one name
        raise error(f"Kubeflow Pipelines at {host}: {exc}") from None
