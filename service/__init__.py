"""FastAPI front end of the explanation service (never imports torch)."""
