//! PostgreSQL crashing under the relay (`pg_ctl -m immediate`). A test binary
//! of its own: the restart takes down the whole test cluster.

mod support;

use std::time::Duration;

use support::relay::{churn, free_port, scrape_counter, sigterm, truncate_notifications, Env, Mode};

crate::both_modes!(relay_reconnects_after_an_immediate_postgres_restart);
/// The two modes' runs restart the same cluster: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn relay_reconnects_after_an_immediate_postgres_restart(mode: Mode) {
    let _one_at_a_time = SERIAL.lock().await;
    let env = Env::for_every_change(mode, "pgrestart").await;
    let port = free_port();
    let mut child = env.spawn_binary(port);
    env.wait_streaming().await;

    let mut expect = churn(&env.db.client().await, 100, "before").await;
    // Crash the server mid-stream: the relay is still ingesting and dispatching.
    let server = support::pg::cluster();
    tokio::task::spawn_blocking(move || server.restart_immediate()).await.unwrap().expect("restart");
    let crashed = std::time::Instant::now();
    // New changes after the crash, on a new connection; ids used again.
    let client = env.db.client().await;
    truncate_notifications(&client).await;
    expect.extend(churn(&client, 100, "after").await);

    env.wait_settled(expect.len() as i64, Duration::from_secs(60)).await;
    let caught_up = crashed.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resends = scrape_counter(port, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
    let reconnects = scrape_counter(port, "outbox_relay_source_reconnects_total").await.unwrap_or(0.0);
    sigterm(&child);
    assert!(child.wait().unwrap().success());

    let seen = env.change_counts();
    let lost: Vec<_> = expect.iter().filter(|c| !seen.contains_key(*c)).collect();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "pg restart: changes {}, delivered {}, duplicates {duplicates}, counted re-sends {resends}, lost {}, \
         all settled {caught_up:?} after the crash",
        expect.len(),
        seen.len(),
        lost.len()
    );
    assert!(reconnects >= 1.0, "the relay noticed and reconnected by itself");
    assert!(lost.is_empty(), "lost across the restart: {lost:?}");
    assert_eq!(seen.len(), expect.len(), "nothing but the committed changes");
    assert_eq!(duplicates, 0, "a database restart costs no duplicate ({resends} counted re-sends)");
    // The claim lease is 3 s in tests: no row waited its lease out.
    assert!(caught_up < Duration::from_secs(15), "caught up in {caught_up:?}");
}
