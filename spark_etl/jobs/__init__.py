"""The three PySpark jobs: ``clean_events``, ``build_features``, ``export_keys``."""
