"""`maniac import`: register a JSONL file of completed examples through the public API.

The file is read as a stream, one line at a time, and sent in batches to
``POST /v1/chat/completions/register``, several requests at a time. Each line is the spec's
register ``Item`` (``input``, ``output``, ``tags``, ``metadata``), or an OpenAI chat fine-tuning
line (``{"messages": [...]}`` ending with the assistant's message), which becomes an item whose
input is the messages before and whose output is the last one.

Pure steps (a line to an item, lines to batches, a response's errors to line numbers) are
plain functions; :func:`run_import` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httpx
import orjson

from services.gateway.upstream import retry_after_s as header_retry_after_s

MAX_ITEMS_PER_REQUEST = 10_000
"""The gateway's default ``MANIAC_MAX_ITEMS_PER_REQUEST``; a gateway set lower answers 422 and
the batch is split."""

MAX_BODY_BYTES = 64 * 1024 * 1024
"""The gateway's default ``MANIAC_MAX_BODY_BYTES``; a gateway set lower answers 413 and the
batch is split."""

DEFAULT_BATCH = 500
DEFAULT_BATCH_BYTES = 8 * 1024 * 1024
DEFAULT_CONCURRENCY = 4
DEFAULT_RETRY_FOR_S = 300.0
REGISTER_PATH = "/v1/chat/completions/register"

_FINE_TUNING_INPUT_KEYS = ("tools", "parallel_tool_calls")
_BOM = b"\xef\xbb\xbf"


def register_body(container: str, items: Sequence[bytes]) -> bytes:
    """The register request for ``items``, each already JSON, as bytes (nothing re-encoded)."""
    return b'{"container":' + orjson.dumps(container) + b',"items":[' + b",".join(items) + b"]}"


@dataclass(frozen=True)
class LineError:
    """A line the import could not register, with the file's line number."""

    line: int
    message: str
    type: str
    loc: tuple[str | int, ...] = ()

    def record(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "loc": list(self.loc),
            "message": self.message,
            "type": self.type,
        }


def item_from_fine_tuning(line: dict[str, Any]) -> dict[str, Any] | str:
    """The register item for an OpenAI chat fine-tuning line, or why it does not map onto one.

    ``messages`` but the last become the input's messages (``tools`` and
    ``parallel_tool_calls`` go to the input too); the last, the assistant's, becomes the output's
    one choice. Nothing else is made up: no id (the gateway derives one from the content, so
    importing the file again stores nothing twice), no model, no usage.
    """
    other = sorted(set(line) - {"messages", *_FINE_TUNING_INPUT_KEYS})
    if other:
        return f"a fine-tuning line has only messages, tools and parallel_tool_calls, not {other}"
    messages = line["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        return "messages must be a list: the prompt's messages, then the assistant's answer"
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return "the last message is not the assistant's"
    given = {key: line[key] for key in _FINE_TUNING_INPUT_KEYS if key in line}
    return {
        "input": {"messages": messages[:-1], **given},
        "output": {"choices": [{"index": 0, "message": last}]},
    }


def item_from_line(number: int, raw: bytes) -> bytes | LineError:
    """A non-blank line as the item to send (its own bytes when it is an item), or its error."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return LineError(number, f"not JSON: {exc}", "json_invalid")
    if not isinstance(value, dict):
        return LineError(number, f"not a JSON object but {type(value).__name__}", "not_an_object")
    if "messages" in value and "input" not in value:
        item = item_from_fine_tuning(value)
        if isinstance(item, str):
            return LineError(number, item, "fine_tuning_line")
        return orjson.dumps(item)
    return raw


@dataclass
class Batch:
    """Items of consecutive lines; ``first`` to ``end`` (exclusive) are the lines it covers."""

    first: int
    end: int = 0
    lines: list[int] = field(default_factory=list)
    items: list[bytes] = field(default_factory=list)
    bad: list[LineError] = field(default_factory=list)
    bytes: int = 0


def make_batches(
    lines: Iterable[bytes], *, start: int = 1, max_items: int, max_bytes: int, overhead: int = 0
) -> Iterator[Batch]:
    """Lines (numbered from 1; those before ``start`` skipped) into batches of at most
    ``max_items`` items whose request (``overhead`` bytes of envelope, then the items with a
    comma each) stays within ``max_bytes``; an item larger than that goes alone. Blank lines are
    skipped; lines that are no item are the batch's ``bad``, at most ``max_items`` of them."""
    batch = Batch(first=start)
    number = 0
    for number, raw in enumerate(lines, start=1):
        if number < start:
            continue
        text = raw.strip()
        if number == 1:
            text = text.removeprefix(_BOM)
        if not text:
            continue
        item = item_from_line(number, text)
        if isinstance(item, LineError):
            batch.bad.append(item)
            if len(batch.bad) >= max_items:
                batch.end = number + 1
                yield batch
                batch = Batch(first=number + 1)
            continue
        if batch.items and overhead + batch.bytes + len(item) + 1 > max_bytes:
            batch.end = number
            yield batch
            batch = Batch(first=number)
        batch.lines.append(number)
        batch.items.append(item)
        batch.bytes += len(item) + 1
        if len(batch.items) >= max_items:
            batch.end = number + 1
            yield batch
            batch = Batch(first=number + 1)
    if batch.items or batch.bad:
        batch.end = max(number + 1, batch.first)
        yield batch


def rejected_lines(lines: Sequence[int], errors: Iterable[dict[str, Any]]) -> list[LineError]:
    """A register response's ``errors`` for a request of the items of ``lines``, by line."""
    found = []
    for error in errors:
        index = int(error["index"])
        loc = error.get("loc") or []
        # ["items", index, ...]: the place within the item
        within = tuple(loc[2:]) if loc[:2] == ["items", index] else tuple(loc)
        found.append(
            LineError(lines[index], str(error.get("message")), str(error.get("type")), within)
        )
    return found


# -- I/O -------------------------------------------------------------------------------------


class ImportFailed(Exception):
    """The import cannot go on (a refused key, a server that does not answer, ...)."""


@dataclass
class Options:
    url: str
    key: str
    container: str
    batch: int = DEFAULT_BATCH
    batch_bytes: int = DEFAULT_BATCH_BYTES
    concurrency: int = DEFAULT_CONCURRENCY
    resume_from: int = 1
    retry_for_s: float = DEFAULT_RETRY_FOR_S
    timeout_s: float = 300.0


@dataclass
class Summary:
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    bad_json: int = 0
    requests: int = 0
    seconds: float = 0.0
    resume_from: int | None = None
    """Set when the import did not finish: every line before it was answered."""

    def line(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "received": self.received,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "bad_json": self.bad_json,
            "requests": self.requests,
            "seconds": round(self.seconds, 2),
            "items_per_s": round(self.received / self.seconds) if self.seconds else 0,
        }
        if self.resume_from is not None:
            result["resume_from"] = self.resume_from
        return result


def retry_after_s(response: httpx.Response, default: float) -> float:
    """The response's ``Retry-After`` in seconds (at most a minute), else ``default``."""
    seconds = header_retry_after_s(response.headers.get("Retry-After"))
    return default if seconds is None else min(seconds, 60.0)


def _envelope_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return f"{error.get('code')}: {error.get('message')}"
    if isinstance(body, dict) and isinstance(body.get("detail"), list) and body["detail"]:
        first = body["detail"][0]
        return str(first.get("msg") if isinstance(first, dict) else first)
    return response.text[:200]


class Importer:
    """Sends batches, several at a time, and keeps the counts and the line to resume from."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        options: Options,
        report: Callable[[LineError], None],
    ) -> None:
        self.client = client
        self.options = options
        self.report = report
        self.summary = Summary()
        self.pending: set[int] = set()  # first lines of the batches taken and not yet answered
        self.read_to = options.resume_from  # the line after the last batch taken

    async def post(self, body: bytes) -> httpx.Response:
        """POST one request until it is answered other than 429, 503 or another 5xx.

        429 and 503 wait their ``Retry-After``; connection errors, timeouts and other 5xx back
        off from 0.5 s up to 30 s; all for at most ``retry_for_s`` from the first failure. A
        request whose answer was lost may have been stored: sending it again is harmless,
        register being idempotent by id.
        """
        url = self.options.url.rstrip("/") + REGISTER_PATH
        failed_at: float | None = None
        backoff = 0.5
        while True:
            self.summary.requests += 1
            try:
                response = await self.client.post(url, content=body)
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                wait = backoff
            else:
                if response.status_code < 500 and response.status_code != 429:
                    return response
                why = f"{response.status_code} {_envelope_message(response)}"
                wait = (
                    retry_after_s(response, backoff)
                    if response.status_code in (429, 503)
                    else backoff
                )
            now = time.monotonic()
            failed_at = failed_at or now
            if now + wait - failed_at > self.options.retry_for_s:
                raise ImportFailed(
                    f"{url} did not take a batch within {self.options.retry_for_s:g} s ({why})"
                )
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, 30.0)

    async def send(self, lines: list[int], items: list[bytes]) -> None:
        """Register ``items``; count and report each one's outcome."""
        while items:
            response = await self.post(register_body(self.options.container, items))
            if response.status_code in (413, 422):  # too large or too many for this gateway
                if len(items) == 1:
                    kind = "too_large" if response.status_code == 413 else "refused"
                    self.reject([LineError(lines[0], _envelope_message(response), kind)])
                    return
                half = len(items) // 2
                await self.send(lines[:half], items[:half])
                lines, items = lines[half:], items[half:]
                continue
            if response.status_code == 401:
                raise ImportFailed(f"the key was refused (401 {_envelope_message(response)})")
            if response.status_code != 200:
                raise ImportFailed(
                    f"the gateway answered {response.status_code} {_envelope_message(response)}"
                )
            try:
                answer = response.json()
                errors = answer["errors"]
                rejected = int(answer["summary"]["rejected"])
                found = rejected_lines(lines, errors)
                if any(int(e["index"]) < 0 for e in errors):
                    raise IndexError("a negative index")
            except (ValueError, KeyError, TypeError, IndexError):
                raise ImportFailed(
                    f"the gateway answered 200 with no register response: {response.text[:200]}"
                ) from None
            self.reject(found)
            if rejected == len(errors):
                self.summary.accepted += len(items) - rejected
                return
            # The gateway lists at most 200 errors: the items after the last one listed are sent
            # again to learn theirs (those it accepted are stored once, register being
            # idempotent by id).
            last = max(int(e["index"]) for e in errors) if errors else -1
            self.summary.accepted += last + 1 - len(errors)
            lines, items = lines[last + 1 :], items[last + 1 :]

    def reject(self, errors: list[LineError]) -> None:
        self.summary.rejected += len(errors)
        for error in errors:
            self.report(error)

    def resume_line(self) -> int:
        """Every line before this one was answered (or is no item)."""
        return min(self.pending, default=self.read_to)

    async def run(self, batches: Iterator[Batch]) -> None:
        reading = asyncio.Lock()

        async def take() -> Batch | None:
            async with reading:  # one reader at a time, off the event loop
                try:
                    batch = await _next_in_daemon(batches)
                except OSError as exc:
                    raise ImportFailed(f"the file cannot be read: {exc}") from None
            if batch is not None:
                self.pending.add(batch.first)
                self.read_to = batch.end
                self.summary.received += len(batch.items) + len(batch.bad)
                self.summary.bad_json += sum(e.type != "fine_tuning_line" for e in batch.bad)
                self.summary.rejected += sum(e.type == "fine_tuning_line" for e in batch.bad)
                for error in batch.bad:
                    self.report(error)
            return batch

        async def sender() -> None:
            while (batch := await take()) is not None:
                if batch.items:
                    await self.send(batch.lines, batch.items)
                self.pending.discard(batch.first)

        async with asyncio.TaskGroup() as group:
            for _ in range(self.options.concurrency):
                group.create_task(sender())


READER = "maniac-import-reader"


async def _next_in_daemon(batches: Iterator[Batch]) -> Batch | None:
    """The next batch, read in a daemon thread: a read from standard input may never end (its
    producer stalled), and an import that stops must not wait for it, as it would for a thread
    of the loop's executor. See :func:`reading`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Batch | None] = loop.create_future()

    def settle(batch: Batch | None, exc: BaseException | None) -> None:
        if done.done():  # the import stopped meanwhile
            return
        if exc is None:
            done.set_result(batch)
        else:
            done.set_exception(exc)

    def read() -> None:
        batch, failure = None, None
        try:
            batch = next(batches, None)
        except BaseException as exc:  # handed to the task that waits for it
            failure = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, batch, failure)

    threading.Thread(target=read, name=READER, daemon=True).start()
    return await done


def reading() -> bool:
    """Whether a read is still under way: the process must then end without the interpreter's
    shutdown, which would wait for the file's lock the reader holds (and abort for stdin)."""
    return any(thread.name == READER for thread in threading.enumerate())


def open_lines(path: str, stdin: BinaryIO) -> BinaryIO:
    """The file to read (``-``: standard input); raises OSError when it cannot be opened."""
    return stdin if path == "-" else open(path, "rb")  # noqa: SIM115


async def run_import(
    source: BinaryIO, options: Options, report: Callable[[LineError], None]
) -> tuple[Summary, str | None]:
    """Import ``source``; the summary, and why it stopped when it did not finish."""
    overhead = len(register_body(options.container, []))
    batches = make_batches(
        source,
        start=options.resume_from,
        max_items=options.batch,
        max_bytes=options.batch_bytes,
        overhead=overhead,
    )
    headers = {"Authorization": f"Bearer {options.key}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=options.concurrency)
    started = time.monotonic()
    failure: str | None = None
    async with httpx.AsyncClient(
        headers=headers, limits=limits, timeout=options.timeout_s
    ) as client:
        importer = Importer(client, options, report)
        task = asyncio.ensure_future(importer.run(batches))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            failure = "interrupted"
        except ExceptionGroup as group:  # the senders' task group
            failed = group.subgroup(ImportFailed)
            if failed is None:
                raise
            failure = str(failed.exceptions[0])
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    summary = importer.summary
    summary.seconds = time.monotonic() - started
    if failure is not None:
        summary.resume_from = importer.resume_line()
    return summary, failure
