"""`ingester upload`: the command-line client of the ingester.

Files above a size threshold go up with tus (creation, `Upload-Checksum` on every chunk)
and resume by themselves: after a dropped connection from `HEAD`'s offset, with backoff;
after the process was killed, from a small state file under the user's cache dir when the
same command runs again. Smaller files go as one multipart request with an
`Idempotency-Key` (kept in the same state file, so a rerun never stores a file twice).
The sha256 computed while reading is compared with the stored file's `checksum`.

Synchronous httpx: a command-line client has one thing to do at a time. The service itself
stays on Trio; nothing here is imported by it.

    options.py    the command line and its checks (exit code 2)
    command.py    one file after the other, output, exit codes
    tus.py        the resumable path      multipart.py  the one-request path
    resume.py     the state files         retry.py      backoff
    source.py     the local file, hashed while read
    answers.py    HTTP answers -> errors  tokens.py     what a 401 or 403 means
    progress.py   the progress bar        errors.py     the client's exceptions
"""

from .options import add_arguments as add_arguments
