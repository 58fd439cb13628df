"""The Airflow UI pages (a FastAPI app the plugin mounts)."""
