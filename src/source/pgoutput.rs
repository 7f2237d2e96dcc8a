//! pgoutput decoding (stub).
