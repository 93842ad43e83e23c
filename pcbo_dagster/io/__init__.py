"""Small I/O utilities below every adapter: atomic local files, JSON over HTTP with retries, the one
redaction of secrets, and settings read from environment variables."""
