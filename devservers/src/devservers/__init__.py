"""Local Unleashed and Prospect CRM servers for tests, benchmarks, the demo and development.

Not part of the product: this package imports sync_pipeline, never the other way round.
"""
