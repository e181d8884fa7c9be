"""The bottom layer: what every other corral package may share, and nothing else.

It imports no other corral package. `files` (atomic writes), `native` (the cached
`cc` build), `metrics` (the registry and scrape-time helpers), `supervisor`
(structured concurrency) and `labels` (well-known label names).
"""
