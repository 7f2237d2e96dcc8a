//! PostgreSQL crashing under the relay (`pg_ctl -m immediate`). A test binary
//! of its own: the restart takes down the whole test cluster.

mod support;

use std::time::Duration;

use support::relay::{free_port, insert_notifications, scrape_counter, sigterm, Env, Mode};

crate::both_modes!(relay_reconnects_after_an_immediate_postgres_restart);
/// The two modes' runs restart the same cluster: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn relay_reconnects_after_an_immediate_postgres_restart(mode: Mode) {
    let _one_at_a_time = SERIAL.lock().await;
    let env = Env::in_mode(mode, "pgrestart").await;
    let port = free_port();
    let mut child = env.spawn_binary(port);
    env.wait_streaming().await;

    let mut ids = insert_notifications(&env.db.client().await, 300, 30).await;
    // Crash the server mid-stream: the relay is still ingesting and dispatching.
    let server = support::pg::cluster();
    tokio::task::spawn_blocking(move || server.restart_immediate()).await.unwrap().expect("restart");
    // New rows after the crash, on a new connection.
    let client = env.db.client().await;
    ids.extend(insert_notifications(&client, 300, 30).await);

    env.wait_settled(ids.len() as i64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resends = scrape_counter(port, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
    let reconnects = scrape_counter(port, "outbox_relay_source_reconnects_total").await.unwrap_or(0.0);
    sigterm(&child);
    assert!(child.wait().unwrap().success());

    let counts = env.pusher_counts();
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "pg restart: rows {}, delivered {}, duplicates {duplicates}, counted re-sends {resends}, lost {}",
        ids.len(),
        counts.len(),
        lost.len()
    );
    assert!(reconnects >= 1.0, "the relay noticed and reconnected by itself");
    assert!(lost.is_empty(), "lost across the restart: {lost:?}");
    assert!(duplicates as f64 <= resends, "{duplicates} duplicates, {resends} counted re-sends");
}
