//! Replication stream (stub).
