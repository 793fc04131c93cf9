"""The multipart body of one attempt to store an upload on a Storage Element.

    head (fields that fix the plan, the file part's headers)
    file bytes: first those a failed attempt was given, again from the spool, then live ones
    tail (the closing fields, sent once the client's form is complete and checked)

Each attempt encodes the original bytes itself (`Encoder`: gzip/brotli, and the sha256 of
what the element stores), so an attempt that replaces a failed one re-encodes from the
spool's original bytes and then goes on with the live stream in the same compressor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Final

import httpx
import trio

from ..buffers import Buffer
from ..storage.vectored import Pieces
from .compression import Compressor
from .spool import Spool, SpoolCursor

# Largest piece handed to httpx at once. Smaller pieces cost the element CPU: each is a
# chunked-encoding frame it parses on its own (measured: 256 KiB pieces raised the element's
# CPU per GiB by ~30% over 1 MiB ones).
SEND_PIECE: Final = 1024 * 1024

# A batch of original bytes as the pipeline hands it on: one buffer, or the batch's socket
# reads unjoined (`Pieces`: sent as one frame in one `sendmsg`, no copy).
Chunk = Buffer | Pieces


class Encoder:
    """What one attempt sends for the original bytes: compressed or as they are, with the
    size and sha256 of what the element will store."""

    def __init__(self, compressor: Compressor | None) -> None:
        self._compressor = compressor
        self.compressing = compressor is not None
        self._sha256 = hashlib.sha256() if compressor is not None else None
        self.size = 0

    def close(self) -> None:
        """Let the compressor go: its state (MiBs of C memory for brotli) is freed now, even
        when this encoder lives on in a reference cycle (an exception's traceback, say)
        until the garbage collector's next full pass."""
        self._compressor = None

    def encode_sync(self, data: Chunk) -> bytes:
        """Compress `data` (worker thread)."""
        compressor = self._compressor
        assert compressor is not None
        assert self._sha256 is not None
        parts = data.parts if isinstance(data, Pieces) else (data,)
        out = b"".join(
            compressor.compress(bytes(p) if isinstance(p, memoryview) else p) for p in parts
        )
        self._sha256.update(out)
        self.size += len(out)
        return out

    def finish_sync(self) -> bytes:
        assert self._compressor is not None
        assert self._sha256 is not None
        out = self._compressor.flush()
        self.close()
        self._sha256.update(out)
        self.size += len(out)
        return out

    def sha256(self) -> str | None:
        """The stored bytes' sha256 when compressing; None means the original's."""
        return None if self._sha256 is None else self._sha256.hexdigest()


class SEUploadBody(httpx.AsyncByteStream):
    """The body sent to a Storage Element: head, file bytes, then the tail.

    A class rather than an async generator: httpx closes it explicitly on cancellation,
    where a generator would leave a `ResourceWarning`. Each request for the next piece means
    the previous one was written to the socket, which is our progress signal.

    `chunks` carries batches of original bytes; the budget they hold is given back with
    `release` once the element's socket has taken (the encoding of) each batch.
    """

    def __init__(
        self,
        *,
        head: bytes,
        chunks: trio.MemoryReceiveChannel[Chunk],
        tail: Callable[[Encoder], Awaitable[bytes]],
        encoder: Callable[[], Encoder],
        on_progress: Callable[[int, bool], None],
        release: Callable[[int], None],
        spool: Spool | None = None,
        replay_bytes: int = 0,
    ) -> None:
        self._head = head
        self._chunks = chunks
        self._tail = tail
        self._new_encoder = encoder
        self._on_progress = on_progress
        self._release = release
        self.spool = spool
        # Original bytes to send again from the spool before taking more from the channel.
        self._replay_end = replay_bytes
        self._replay: SpoolCursor | None = None
        self.encoder: Encoder | None = None
        # Original bytes taken from the channel so far (those replayed included).
        self.taken = replay_bytes
        self._stage = 0
        self._sent_file_bytes = 0
        # Bytes of the piece handed out last, and the original bytes it stands for.
        self._last_len = 0
        self._last_raw = 0
        self._rest: Pieces | None = None
        self._rest_raw = 0
        self.started = False
        # The last piece (the tail) was handed out: the element may have the whole body.
        self.ended = False
        # The body's length when known beforehand (sent as Content-Length; else chunked),
        # and the bytes handed out so far, checked against it before the tail goes.
        self.declared: int | None = None
        self._handed = 0
        # Awaited before the last piece is handed out (the saga's `landing_before_end`).
        self.before_end: Callable[[], Awaitable[None]] | None = None

    def __aiter__(self) -> SEUploadBody:  # type: ignore[override]
        return self

    async def __anext__(self) -> Chunk:
        # Asked for the next piece: the previous one is written.
        self._sent_file_bytes += self._last_len
        self._release(self._last_raw)
        self._last_len = self._last_raw = 0
        self._on_progress(self._sent_file_bytes, False)
        piece: Chunk
        while True:
            if self._rest is not None:
                piece = self._next_slice()
                break
            if self._stage == 0:
                self.started = True
                self._stage = 1
                piece = self._head
                break
            if self._stage == 1:
                if await self._load_replayed():
                    continue
                self._stage = 2
            if self._stage == 2:
                try:
                    chunk = await self._chunks.receive()
                except trio.EndOfChannel:
                    self._stage = 3
                    if await self._load_final():
                        continue
                else:
                    self.taken += len(chunk)
                    await self._load(chunk, raw=len(chunk))
                    continue
            if self._stage == 3:
                self._stage = 4
                piece = await self._tail(self._encoder())
                if self.declared is not None and self._handed + len(piece) != self.declared:
                    # The tail would end the body at another length than declared: the
                    # element would wait for more, or h11 refuse it. Nothing is committed.
                    raise RuntimeError(
                        f"the element body was declared as {self.declared} bytes, "
                        f"but it comes to {self._handed + len(piece)}"
                    )
                if self.before_end is not None:
                    await self.before_end()
                self.ended = True
                break
            raise StopAsyncIteration
        self._handed += len(piece)
        self._on_progress(self._sent_file_bytes, True)
        return piece

    async def _load_replayed(self) -> bool:
        """The next piece of what a failed attempt had already been given, if any is left."""
        if not self._replay_end:
            return False
        if self._replay is None:
            if self.spool is None:
                raise RuntimeError("a replay needs the spool")
            self._replay = self.spool.cursor(0, self._replay_end)
        piece = await self._replay.next()
        if piece is None:
            self._replay_end = 0
            return False
        # Replayed bytes hold no budget: nothing to give back for them.
        await self._load(piece, raw=0)
        return True

    def _encoder(self) -> Encoder:
        # Made with the first file bytes: whether to compress is settled before they come.
        if self.encoder is None:
            self.encoder = self._new_encoder()
        return self.encoder

    async def _load(self, data: Chunk, *, raw: int) -> None:
        encoder = self._encoder()
        if encoder.compressing:
            data = await trio.to_thread.run_sync(encoder.encode_sync, data)
        if data:
            self._rest = data if isinstance(data, Pieces) else Pieces([data])
            self._rest_raw = raw
        else:
            # The compressor kept it (bounded by its window): nothing left to hold.
            self._release(raw)

    async def _load_final(self) -> bool:
        encoder = self._encoder()
        if not encoder.compressing:
            return False
        tail = await trio.to_thread.run_sync(encoder.finish_sync)
        if not tail:
            return False
        self._rest, self._rest_raw = Pieces([tail]), 0
        return True

    def restart(self, head: bytes | None = None) -> SEUploadBody:
        """A body for the next element: the same head (or `head`), everything taken so far
        again from the spool, then the rest of the channel and the tail."""
        # This attempt is over: what its pieces held goes back (the spool has the bytes).
        self._release(self._last_raw + self._rest_raw)
        self._last_raw = self._rest_raw = 0
        self._rest = None
        if self.encoder is not None:
            self.encoder.close()
        return SEUploadBody(
            head=self._head if head is None else head,
            chunks=self._chunks,
            tail=self._tail,
            encoder=self._new_encoder,
            on_progress=self._on_progress,
            release=self._release,
            spool=self.spool,
            replay_bytes=self.taken,
        )

    def _next_slice(self) -> Chunk:
        """At most SEND_PIECE bytes: one frame of a chunked body. A piece of one buffer goes
        as that buffer (a whole `bytes` with a Content-Length: no copy even without the
        vectored send), several as `Pieces`."""
        assert self._rest is not None
        rest: Pieces | None = None
        if len(self._rest) > SEND_PIECE:
            piece, rest = self._rest.split(SEND_PIECE)
        else:
            piece = self._rest
        self._last_len = len(piece)
        if rest:
            self._rest = rest
        else:
            # The batch's original bytes are given back once its last slice is written.
            self._rest, self._last_raw, self._rest_raw = None, self._rest_raw, 0
        return piece.simplest()

    async def aclose(self) -> None:
        self._stage = 4
        self._replay = None
        if self.encoder is not None:
            self.encoder.close()
