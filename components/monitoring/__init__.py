"""Monitoring: drift features, the request-log store, ingest, the drift report and the monitor step."""
