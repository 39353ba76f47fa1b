"""Download one URL to a file: resumed after interruptions, retried on transient failures, verified.

Data sets are large and networks drop connections, stall and answer 503 now and then. Starting a
multi-gigabyte download from zero after every hiccup wastes hours, and a truncated or corrupted
file must never look complete. So:

- the body streams into `<dest>.part`; `dest` appears (by rename) only once the file is complete
  and its sha256 matches the pinned one, if any;
- beside the part file, `<dest>.part.json` keeps the URL and the validator (ETag, or else
  Last-Modified) of the response it came from. A later attempt, or a later run, asks only for the
  missing bytes with `Range` and `If-Range`: a server whose resource has changed since answers
  with the whole new body instead, so old and new bytes are never mixed;
- transient failures (dropped or stalled connections, HTTP 5xx and 429) are retried with
  exponential backoff; failures that retrying cannot fix (HTTP 4xx, unknown host, connection
  refused) fail at once with what the user can do;
- a URL is shown and recorded with its secrets redacted (`redact_url`): a password in it
  (`https://user:password@host/...`, sent as HTTP basic auth) and the signature, token or key of
  a presigned URL (`?X-Amz-Signature=...`).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from classifier import saving
from classifier.errors import StageError

log = logging.getLogger(__name__)

USER_AGENT = "image-classifier-pipeline"
CHUNK = 1 << 20

#: Raised while connecting or reading when the connection broke or stalled: worth another attempt.
TRANSIENT_ERRORS = (
    TimeoutError,  # socket.timeout is TimeoutError: no data within `timeout`
    ConnectionResetError,  # includes http.client.RemoteDisconnected: closed before the headers
    ConnectionAbortedError,
    BrokenPipeError,
    http.client.IncompleteRead,  # a chunked body cut short
    ssl.SSLEOFError,  # a TLS connection closed early
)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


#: Query parameters whose values are secrets: signatures, tokens, keys, credentials of presigned URLs.
SECRET_PARAMETER = re.compile(r"sig|token|key|credential|secret|password|passwd|auth", re.IGNORECASE)


def is_url(source: str) -> bool:
    """Whether `source` is an http(s) URL (else a preset name or a local path)."""
    return source.startswith(("http://", "https://"))


def redact_url(url: str) -> str:
    """`url` as it may be shown and recorded: `***` for its user and password and for the values
    of query parameters that hold secrets (X-Amz-Signature, X-Amz-Credential, token, key...)."""
    parts = urllib.parse.urlsplit(url)
    netloc = f"***@{parts.netloc.rpartition('@')[2]}" if "@" in parts.netloc else parts.netloc
    pairs = [pair.partition("=") for pair in parts.query.split("&") if pair]
    query = "&".join(
        f"{name}{eq}***" if SECRET_PARAMETER.search(urllib.parse.unquote_plus(name)) else f"{name}{eq}{value}"
        for name, eq, value in pairs
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The HTTP header that sends `user` and `password` by basic auth."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")}


def _credentials(url: str) -> tuple[str, dict[str, str]]:
    """`url` without its user:password, and the basic-auth header that carries them instead."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    plain = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return plain, basic_auth(user, password)


class _Transient(Exception):
    """This attempt failed in a way another attempt may not."""


class _Fatal(Exception):
    """Retrying would fail the same way."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at `path`, read in chunks so size does not matter."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mismatch(digest: str, expected: str | None) -> str | None:
    """'with sha256 <digest>, but <expected> was expected' when a pinned hash differs, else None."""
    if expected and digest != expected.strip().lower():
        return f"with sha256 {digest}, but {expected.strip().lower()} was expected"
    return None


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
    hint: str = "",
) -> str:
    """Download `url` to `dest` and return the sha256 (hex) of the complete file.

    sha256:  the expected hash (any case); on a mismatch the download is discarded.
    timeout: seconds to wait for a connection or for more data before the attempt fails.
    retries: attempts in all (at least one) before giving up on transient failures.
    backoff: seconds before the second attempt, doubled before each further one.
    hint:    what the user can do instead; appended to the error message.

    Raises StageError on failure; a part file left behind by transient failures is resumed by the
    next call for the same `url` and `dest`.
    """
    dest = Path(dest)
    shown = redact_url(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    attempts = max(1, retries)
    suffix = f"\n{hint}" if hint else ""
    last_error = ""
    for attempt in range(1, attempts + 1):
        try:
            _attempt(url, part, meta, timeout, label=dest.name)
            break
        except _Fatal as err:
            raise StageError(f"Could not download {shown}: {err}.{suffix}") from err.__cause__
        except _Transient as err:
            last_error = str(err)
            if attempt < attempts:
                delay = backoff * 2 ** (attempt - 1)
                log.warning(
                    "download of %s failed (%s); attempt %d of %d, next in %.2g s", shown, err, attempt, attempts, delay
                )
                time.sleep(delay)
    else:
        kept = part.stat().st_size if part.exists() else 0
        resume = f" Running again resumes from the {kept} bytes kept in {part}." if kept else ""
        raise StageError(
            f"Could not download {shown}: {last_error}; gave up after {attempts} "
            f"attempt{'s' if attempts != 1 else ''}.{resume}{suffix}"
        )

    digest = sha256_file(part)
    if wrong := mismatch(digest, sha256):
        # A complete file with the wrong content: resuming it could never fix it.
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise StageError(
            f"{shown} downloaded {wrong}; the download was discarded. Check the URL and the expected hash.{suffix}"
        )
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    log.info("downloaded %s to %s (sha256 %s)", shown, dest, digest)
    return digest


def _attempt(url: str, part: Path, meta: Path, timeout: float, label: str) -> None:
    """One request: complete `part` from where it stops, or from zero. Raises _Transient or _Fatal."""
    offset = part.stat().st_size if part.exists() else 0
    url, auth = _credentials(url)
    shown = redact_url(url)
    validator = _stored_validator(meta, shown) if offset else None
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **auth}
    if offset and validator:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator
        log.info("resuming %s at byte %d", shown, offset)
    else:
        offset = 0  # bytes of unknown origin cannot be trusted to match what the server sends now
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            offset, total = _where_body_starts(response, offset, shown, part, meta)
            with (
                open(part, "r+b" if offset else "wb") as out,
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar,
            ):
                out.seek(offset)
                out.truncate()
                if not offset:
                    # Recorded only after the part file was emptied: a crash in between must not
                    # pair old bytes with the new validator.
                    _store_validator(meta, shown, response.headers)
                # read1 hands over what has arrived, so a stall after some bytes still keeps them
                while chunk := response.read1(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
                size = out.tell()
    except urllib.error.HTTPError as err:
        err.close()
        status = f"HTTP {err.code} {err.reason}"
        if err.code == 416 and offset:
            _range_not_satisfiable(err, offset, shown, part, meta)
            return
        if err.code == 429 or err.code >= 500:
            raise _Transient(status) from err
        raise _Fatal(status) from err
    except urllib.error.URLError as err:
        # urlopen wraps errors raised while connecting: a timeout or a reset is worth another
        # attempt; an unknown host, a refused connection or a bad certificate is not.
        if isinstance(err.reason, TRANSIENT_ERRORS):
            raise _Transient(_describe(err.reason, timeout)) from err
        if isinstance(err.reason, socket.gaierror):
            raise _Fatal(f"unknown host ({err.reason})") from err
        raise _Fatal(err.reason) from err
    except TRANSIENT_ERRORS as err:
        raise _Transient(_describe(err, timeout)) from err
    if total is not None and size != total:
        raise _Transient(f"the connection closed after {size} of {total} bytes")


def _where_body_starts(
    response: http.client.HTTPResponse, offset: int, url: str, part: Path, meta: Path
) -> tuple[int, int | None]:
    """(offset in the file where this body belongs, full size if known)."""
    length = response.headers.get("Content-Length")
    if response.status != 206:
        if offset:
            # If-Range did not match (the resource changed) or Range is not supported.
            log.info("%s: the server sent the whole file; starting again from zero", url)
        return 0, int(length) if length and length.isdigit() else None
    match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
    if not offset or not match or int(match.group(1)) != offset:
        # Not the bytes asked for: the part file is of no use with this server.
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        sent = response.headers.get("Content-Range") or "no Content-Range"
        raise _Transient(f"asked for bytes {offset}- but the server sent {sent}")
    total = match.group(3)
    return offset, int(total) if total != "*" else int(match.group(2)) + 1


def _range_not_satisfiable(err: urllib.error.HTTPError, offset: int, url: str, part: Path, meta: Path) -> None:
    """HTTP 416 to our Range: fine if the part file already is the whole file, else start over."""
    match = _UNSATISFIED_RANGE.fullmatch((err.headers.get("Content-Range") or "").strip())
    if match and int(match.group(1)) == offset:
        log.info("%s: the part file is already complete", url)
        return
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)
    raise _Transient(
        f"HTTP 416 {err.reason}: the part file does not fit the file on the server; starting again"
    ) from err


def _describe(err: BaseException, timeout: float) -> str:
    if isinstance(err, TimeoutError):
        return f"timed out: no data within the {timeout:g} s timeout"
    if isinstance(err, http.client.IncompleteRead):
        return f"the connection closed early ({len(err.partial)} bytes of a chunk read)"
    return f"the connection broke ({type(err).__name__}: {err})"


def _stored_validator(meta: Path, url: str) -> str | None:
    """The If-Range validator of the part file, if it was recorded for this URL."""
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != url:
        return None
    validator = data.get("validator")
    return validator if isinstance(validator, str) and validator else None


def _store_validator(meta: Path, url: str, headers: http.client.HTTPMessage) -> None:
    etag = (headers.get("ETag") or "").strip()
    # If-Range only works with a strong validator: a weak ETag (W/"...") is never matched.
    validator = etag if etag and not etag.startswith("W/") else (headers.get("Last-Modified") or "").strip()
    if validator:
        saving.write_json(meta, {"url": url, "validator": validator})
    else:
        meta.unlink(missing_ok=True)  # without a validator a resume could mix two versions
