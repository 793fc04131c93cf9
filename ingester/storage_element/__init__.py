"""The reference Storage Element: artStore's Storage Element API over a local directory.

For development, tests and chaos runs; the ingester must work against artStore's own
element just the same. `main` is the command line and the trio entry point, `app` the HTTP
surface, `store` the files on disk and their index, `form` the upload form.
"""
