"""The contract between the API, the CLI and the workers, torch-free: settings, Redis keys, queues, job states, parameters, failures, data sealing, callbacks and webhooks."""
