//! Throwaway PostgreSQL cluster (stub).
