"""Spark ETL: raw clickstream → clean events → features and key data points (EMR on EKS or local)."""
