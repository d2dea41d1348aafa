"""The DICOMweb side of ``detflow pacs``: QIDO-RS, WADO-RS and STOW-RS through ``dicomweb-client``.

What this module adds to the library:

* **Credentials from the environment**, never the command line (it ends up in shell history and ``ps``):
  ``DETFLOW_PACS_TOKEN`` (bearer) or ``DETFLOW_PACS_USER`` + ``DETFLOW_PACS_PASSWORD`` (basic); both kinds set is
  an error. Credentials in the URL are refused.
* **TLS verification on by default**; ``DETFLOW_PACS_CA_BUNDLE`` (or ``ca_bundle``) names a private CA;
  ``verify=False`` must be asked for and is warned about.
* **Retries on the network only**: connection failures, connections dropped without an answer and 429 / 503 /
  504 answers are retried ``retries`` times with exponential back-off (urllib3's ``Retry``, the only retry layer;
  a STOW-RS is safe to repeat: its SR UID is deterministic). Anything else fails at once.
* **One clear error per failure**: :class:`PacsUnavailable` (unreachable, timed out, 5xx), :class:`PacsAuthError`
  (401 / 403), :class:`PacsError` (anything else), each naming the server (scheme, host and port: no path, no
  query, no UID) and what to do.
* **No PHI in logs**: dicomweb-client logs every UID at INFO; its logger is held at WARNING.
* One HTTP session per thread (WADO-RS retrievals run in the engine's worker threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import DetflowError

log = logging.getLogger(__name__)

TOKEN_ENV = "DETFLOW_PACS_TOKEN"
USER_ENV = "DETFLOW_PACS_USER"
PASSWORD_ENV = "DETFLOW_PACS_PASSWORD"
CA_BUNDLE_ENV = "DETFLOW_PACS_CA_BUNDLE"
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5  # urllib3: 0, 1, 2 s between four attempts
DEFAULT_TIMEOUT_S = (10.0, 120.0)  # (connect, read)


class PacsError(DetflowError):
    """The PACS answered something we cannot use (a 4xx, a malformed answer, a refused store)."""


class PacsUnavailable(PacsError):
    """The PACS cannot be reached (refused, reset, timed out) or is failing (5xx), after the retries: network
    trouble, worth retrying later (the Prefect flow retries its tasks on this one only)."""


class PacsAuthError(PacsError):
    """The PACS refused the credentials (401 / 403)."""


class InstanceGone(PacsError):
    """An instance QIDO listed is not retrievable any more (404): it was deleted meanwhile."""


@dataclass(frozen=True)
class Credentials:
    """Bearer token or basic credentials, read from the environment."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Credentials:
        env = dict(os.environ if env is None else env)
        token = env.get(TOKEN_ENV) or None
        user, password = env.get(USER_ENV) or None, env.get(PASSWORD_ENV)
        if token and user:
            raise PacsError(f"both {TOKEN_ENV} and {USER_ENV} are set: choose bearer or basic authentication")
        if user and password is None:
            raise PacsError(f"{USER_ENV} is set without {PASSWORD_ENV}")
        if password is not None and not user:
            raise PacsError(f"{PASSWORD_ENV} is set without {USER_ENV}")
        return cls(token=token, user=user, password=password)

    def describe(self) -> str:
        return (f"bearer token ({TOKEN_ENV})" if self.token else f"basic authentication ({USER_ENV})" if self.user
                else "no credentials")


def server_name(url: str) -> str:
    """scheme://host:port of ``url``, for messages (a path can carry tenant names; it is left out)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def check_url(url: str) -> str:
    """The DICOMweb base URL, checked: http(s), a host, no credentials in it. Trailing slash removed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"--url {url!r} is not an http(s) URL of a DICOMweb service, e.g. "
                        "https://pacs.example.org/dicom-web")
    if parts.username or parts.password:
        raise PacsError(f"the PACS URL must not hold credentials; set {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}")
    return url.rstrip("/")


def _status_error(status: int, server: str, action: str) -> PacsError:
    if status in (401, 403):
        return PacsAuthError(f"the PACS at {server} refused the credentials while {action} (HTTP {status}); set "
                             f"{TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}, to an account it accepts")
    if status == 404:
        return InstanceGone(f"the PACS at {server} answered 404 while {action}")
    if status >= 500 or status in (408, 429):
        return PacsUnavailable(f"the PACS at {server} failed while {action} (HTTP {status}); try again later")
    return PacsError(f"the PACS at {server} answered HTTP {status} while {action}")


def tag_value(item: dict[str, Any], keyword: str) -> Any:
    """The first value of ``keyword`` in a DICOM JSON object (QIDO-RS), None when absent or empty."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    values = (item.get(f"{tag:08X}") or {}).get("Value") or []
    return values[0] if values else None


class Pacs:
    """A DICOMweb server: ``studies`` / ``series`` / ``instances`` (QIDO-RS), ``iter_series`` (WADO-RS, one
    streamed request per series), ``retrieve`` (WADO-RS, one instance per request), ``has_instance`` (QIDO-RS by
    SOP Instance UID), ``store`` (STOW-RS)."""

    def __init__(self, url: str, credentials: Credentials | None = None, *, verify: bool = True,
                 ca_bundle: str | None = None, retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                 timeout_s: tuple[float, float] = DEFAULT_TIMEOUT_S) -> None:
        self.url = check_url(url)
        self.server = server_name(self.url)
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self.ca_bundle = ca_bundle or os.environ.get(CA_BUNDLE_ENV) or None
        if self.ca_bundle and not os.path.isfile(self.ca_bundle):
            raise PacsError(f"CA bundle {self.ca_bundle} not found")
        self.verify = verify
        if not verify:
            log.warning("TLS certificate verification is OFF for %s: anyone on the network path can read and "
                        "change what is sent", self.server)
        host = urlsplit(self.url).hostname or ""
        if self.url.startswith("http://") and (self.credentials.token or self.credentials.user) \
                and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("credentials are sent to %s over plain http: use https", self.server)
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self._local = threading.local()
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # it logs every UID at INFO
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # retries: counted in our one line

    # ------------------------------------------------------------------ sessions and errors

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            import requests
            from dicomweb_client.api import DICOMwebClient
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            session = requests.Session()
            # the one retry layer (dicomweb-client's own, which also repeats on any exception, is off): requests
            # that never connected, connections the server dropped without an answer (a keep-alive connection it
            # closed meanwhile), and 429 / 503 / 504 answers (Retry-After honoured). Every request is safe to
            # repeat: QIDO and WADO read, and a STOW-RS stores an SR whose UID is deterministic
            retry = Retry(total=None, connect=self.retries, read=self.retries, status=self.retries, other=0, redirect=3,
                          status_forcelist=(429, 503, 504), backoff_factor=self.backoff_s, allowed_methods=None,
                          respect_retry_after_header=True, raise_on_status=False)
            adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=8)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.verify = self.ca_bundle or self.verify
            if self.credentials.token:
                session.headers["Authorization"] = f"Bearer {self.credentials.token}"
            elif self.credentials.user:
                session.auth = (self.credentials.user, self.credentials.password or "")
            client = DICOMwebClient(self.url, session=session, timeout=self.timeout_s)
            client.set_http_retry_params(retry=False)
            self._local.client = client
        return client

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Every failure of a request as one of this module's errors, with what we were doing."""
        import requests

        start = time.monotonic()
        try:
            yield
        except requests.exceptions.SSLError as e:
            raise PacsError(f"TLS verification failed for {self.server} while {action} ({_reason(e)}); give its CA "
                            f"with --ca-bundle or {CA_BUNDLE_ENV}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            waited = time.monotonic() - start
            raise PacsUnavailable(f"cannot reach the PACS at {self.server} while {action}: {_reason(e)} "
                                  f"({self.retries + 1} attempts over {waited:.1f} s); is it running, and is the "
                                  "URL right?") from None
        except requests.exceptions.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            raise _status_error(status, self.server, action) from None
        except requests.exceptions.RequestException as e:
            raise PacsError(f"request to {self.server} failed while {action}: {_reason(e)}") from None

    # ------------------------------------------------------------------ QIDO-RS

    def check(self) -> None:
        """One cheap query, so that an unreachable server or refused credentials fail before any work."""
        with self._errors("checking the connection (QIDO-RS studies)"):
            self._client().search_for_studies(limit=1, fields=["StudyInstanceUID"])

    def studies(self, study: str | None = None, since: str | None = None,
                modality: str | None = None) -> list[dict[str, Any]]:
        """QIDO-RS studies: one (``study``), those from a date on (``since``, YYYYMMDD), of a modality, or all."""
        filters: dict[str, Any] = {}
        if study:
            filters["StudyInstanceUID"] = study
        if since:
            filters["StudyDate"] = f"{since}-"
        if modality:
            filters["ModalitiesInStudy"] = modality
        with self._errors("searching studies (QIDO-RS)"):
            return list(self._client().search_for_studies(search_filters=filters, get_remaining=True,
                                                          fields=["StudyDate", "ModalitiesInStudy"]))

    def series(self, study: str) -> list[dict[str, Any]]:
        with self._errors("searching series (QIDO-RS)"):
            return list(self._client().search_for_series(study, get_remaining=True,
                                                         fields=["Modality", "SeriesNumber",
                                                                 "NumberOfSeriesRelatedInstances"]))

    def instances(self, study: str, series: str) -> list[dict[str, Any]]:
        with self._errors("listing instances (QIDO-RS)"):
            return list(self._client().search_for_instances(study, series, get_remaining=True,
                                                            fields=["SOPClassUID", "InstanceNumber"]))

    def has_instance(self, study: str, sop_instance_uid: str) -> bool:
        """Whether the PACS holds an instance with this SOP Instance UID in ``study``."""
        with self._errors("looking for an existing report (QIDO-RS)"):
            found = self._client().search_for_instances(study, search_filters={"SOPInstanceUID": sop_instance_uid},
                                                        fields=["SOPInstanceUID"])
        return any(tag_value(f, "SOPInstanceUID") == sop_instance_uid for f in found)

    # ------------------------------------------------------------------ WADO-RS, STOW-RS

    def retrieve(self, study: str, series: str, sop_instance_uid: str) -> Any:
        """One instance (WADO-RS), as stored (any transfer syntax): a pydicom Dataset. Raises
        :class:`InstanceGone` for a 404, :class:`PacsUnavailable` for network trouble."""
        with self._errors("retrieving an instance (WADO-RS)"):
            return self._client().retrieve_instance(study, series, sop_instance_uid,
                                                    media_types=(("application/dicom", "*"),))

    def iter_series(self, study: str, series: str) -> Iterator[Any]:
        """Every instance of a series in one streamed WADO-RS request (multipart), as stored: pydicom Datasets, one
        at a time (the series is never held in memory). An instance that does not parse stops the stream with a
        :class:`PacsError` (the caller retrieves what it did not get one by one); network trouble raises
        :class:`PacsUnavailable` as for every request."""
        import requests

        action = "retrieving a series (WADO-RS)"
        with self._errors(action):
            parts = iter(self._client().iter_series(study, series, media_types=(("application/dicom", "*"),)))
        while True:
            with self._errors(action):
                try:
                    ds = next(parts)
                except StopIteration:
                    return
                except requests.exceptions.RequestException:
                    raise  # the network's: _errors names it
                except Exception as e:  # noqa: BLE001 - pydicom on a part that is not DICOM
                    raise PacsError(f"the PACS at {self.server} sent a part that does not parse while {action} "
                                    f"({type(e).__name__})") from None
            yield ds

    def store(self, study: str, dataset: Any) -> None:
        """STOW-RS one instance into ``study``; PacsError when the server lists it as failed."""
        with self._errors("storing the report (STOW-RS)"):
            response = self._client().store_instances([dataset], study_instance_uid=study)
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", "?")
            raise PacsError(f"the PACS at {self.server} refused the report (STOW-RS failure reason {reason})")


def _reason(e: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, shortly (no URL: it may carry query parameters)."""
    cause: BaseException = e
    seen = 0
    while seen < 10:
        nxt = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
        if not isinstance(nxt, BaseException) or nxt is cause:
            break
        cause, seen = nxt, seen + 1
    text = str(cause)
    if "Connection refused" in text or isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if "timed out" in text.lower():
        return "timed out"
    return text.split(": ", 1)[-1][:160] if text else type(cause).__name__
