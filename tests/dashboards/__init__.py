"""Checks of dashboards/ (Grafana dashboard, Prometheus rules) and the generated docs."""
