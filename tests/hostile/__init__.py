"""The hostile-input suite: each test is one attack a client can make, found by trying.

Rules (add a test here for every new finding, following them):

- One test per attack, named for what the attacker does. It fails on the code before the
  fix it guards (check that when adding one).
- Real parts only: reference Storage Elements and the ingester as processes on loopback
  ports (the `stack` fixture of `tests/conftest.py`, plus ingesters with the settings the
  attack needs), attacked with httpx or raw sockets.
- Every test asserts what the attacked service must show: the status and `error.code` (the
  JSON envelope, with the response's `X-Request-ID`), nothing stored on any element that
  no `201` acknowledged, and the service still ready afterwards (`assert_unharmed`).
- Nothing sleeps to wait for the server: waits are bounded polls or reads under
  `trio.fail_after`/`move_on_after`, and every test body runs under `trio.fail_after`.
  Where an attack is slowness itself, the settings shrink its time scale (windows and
  timeouts of about a second) rather than the test waiting for production defaults.
"""
