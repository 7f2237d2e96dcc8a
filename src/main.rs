//! The binary's edge: parse arguments, run, turn failures into exit codes.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = outbox_relay::cli::Cli::parse();
    if let Err(f) = outbox_relay::cli::main(cli).await {
        eprintln!("outbox-relay: {}", f.message);
        std::process::exit(f.code);
    }
}
