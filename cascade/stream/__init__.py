"""The stream layer: Kafka topics in and out, one faust agent per cascade stage (see docs/stream.md)."""
