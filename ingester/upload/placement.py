"""Which elements can take an upload, and in which form, once its first bytes are known.

The pipeline asks here at three points (`ingester.storage.capabilities` has the facts):

- **compressing** (the transformer, before its first byte): only when the element the upload
  would go to now does not refuse compressed bytes (`compressed_names: off`); otherwise the
  decision's reason is `element_policy`;
- **choosing** (the streamer, once the transformer has sent its first piece or found the file
  empty): an empty file goes only to elements that store empty files, and if the registry
  has none for its mode the upload ends `400 EMPTY_FILE` before a byte is sent; a compressed
  file never goes to an element that refuses compressed bytes;
- **each attempt**: the name and media type the element is given (the original, or
  `<name>.br` with `application/x-brotli` for an element that drops metadata), so a failover
  between elements of different kinds sends each its own head.
"""

from __future__ import annotations

from typing import Any, Final

from ..errors import EmptyFile
from ..settings import Settings
from ..storage.capabilities import ELEMENT_POLICY, Fit, StoredForm, stored_as, stored_form
from ..storage.pool import ElementPool
from ..storage.selection import Candidate
from .compression import CompressionDecision
from .records import Upload

NOT_FOR_ELEMENT: Final = CompressionDecision(False, None, ELEMENT_POLICY)


def compression_decision(
    pool: ElementPool, settings: Settings, upload: Upload, decision: CompressionDecision
) -> CompressionDecision:
    """`decision`, unless the element the upload would go to must not get compressed bytes."""
    if not decision.compress:
        return decision
    element = pool.first_choice(
        upload.plan.retention_policy.target_mode, upload.request.content_length
    )
    if element is not None and stored_form(element, settings.compressed_names) is (StoredForm.OFF):
        return NOT_FOR_ELEMENT
    return decision


async def fit(pool: ElementPool, settings: Settings, upload: Upload) -> Fit:
    """What the upload needs of its element; `EmptyFile` when it is empty and no element of
    its mode in the registry stores empty files. Call once the transformer has announced
    its first piece (`Upload.data_ready`)."""
    facts = upload.facts
    empty = facts.original_size == 0
    if empty:
        # A late field may still change the mode; an empty file part is read by now, and the
        # rest of the form is small.
        await upload.fields_complete.wait()
        assert upload.options is not None
        mode = upload.options.retention_policy.target_mode
        if not any(c.accepts_empty_files for c in pool.candidates() if c.mode is mode):
            raise EmptyFile(
                f"the file is empty, and no {mode.value} Storage Element stores empty files"
            )
    return Fit(empty=empty, compressed=facts.compressed, default_names=settings.compressed_names)


def stored_identity(settings: Settings, upload: Upload, element: Candidate) -> tuple[str, str]:
    """The file name and media type `element` is given for this upload."""
    facts = upload.facts
    algorithm = facts.algorithm.value if facts.compressed and facts.algorithm else None
    form = stored_form(element, settings.compressed_names)
    return stored_as(
        upload.filename, upload.content_type, algorithm, form, any_name=element.serves_any_name
    )


def compression_facts(upload: Upload) -> dict[str, Any]:
    """What the Admin Module is told, whatever the element kept: enough to read the stored
    bytes back as the original."""
    facts = upload.facts
    name, media_type = upload.stored_as or (upload.filename, upload.content_type)
    return {
        "compressed": facts.compressed,
        "compression_algorithm": facts.algorithm.value if facts.algorithm else None,
        "original_size": facts.original_size,
        "original_checksum": facts.sha256,
        "stored_size": facts.stored_size,
        "stored_checksum": facts.stored_sha256,
        "stored_filename": name,
        "stored_content_type": media_type,
    }
