"""Two-way sync between Prospect CRM and Unleashed, built as a Dagster pipeline over DuckDB."""
