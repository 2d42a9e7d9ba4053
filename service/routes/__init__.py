"""The HTTP routes, one router per resource (tagged so in the OpenAPI schema): ``jobs`` (submit,
view, cancel, outputs), ``models`` (the served checkpoints), ``ops`` (health, readiness,
metrics). Routes parse, call the one job service and answer; blocking work runs in the
thread pool (plain ``def`` routes, or ``run_in_threadpool`` after an async body read)."""
