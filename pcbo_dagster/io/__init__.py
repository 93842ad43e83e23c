"""Small I/O utilities below every adapter: atomic local files, JSON over HTTP with retries, the one
redaction of secrets, settings read from environment variables, and the wall clock."""
