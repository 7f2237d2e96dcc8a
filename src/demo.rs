//! `outbox-relay demo` (filled in once the embedded cluster lands).
pub async fn run() -> Result<(), String> {
    Err("demo not built yet".into())
}
