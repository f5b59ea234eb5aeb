"""Dataset-wide replication scans."""
