"""Small I/O utilities below every adapter: atomic local files, the checked open of a regular file,
JSON over HTTP with retries, the one redaction of secrets, settings read from environment variables,
and the wall clock."""
