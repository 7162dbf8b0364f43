"""relaybeat benchmarks: load generators, real brokers and the real monitor process, measured.

`python -m bench <fanin|ingest|detector|lag|api|persist> [--smoke|--large]`; see BENCHMARKS.md for
the method and the latest figures. Nothing in relay/, monitor/, api/ or relaybeat/ imports this.
"""
