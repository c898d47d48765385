//! `tidings-broker`: reads the configuration, sets up logging, binds and serves
//! until SIGINT or SIGTERM, then shuts down gracefully and exits 0.

use std::io::IsTerminal;

use anyhow::Context;
use tidings_broker::{Config, ConfigError, LogFormat};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tidings_broker::memory::tune_allocator();
    let config = match Config::load() {
        Ok(config) => config,
        // --help, --version and usage errors print themselves with the right exit code.
        Err(ConfigError::Cli(err)) => err.exit(),
        Err(err) => return Err(err).context("invalid configuration"),
    };
    if config.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }

    tidings_broker::prepare_data_dir(&config)?;
    let listener = tidings_broker::bind(config.listen).await?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let http = match config.http_listen.0 {
        Some(addr) => Some(tidings_broker::bind(addr).await?),
        None => None,
    };
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %config.data_dir.display(),
        http = %http_addr.map_or("off".to_owned(), |a| format!("http://{a}/")),
        "listening on {addr}"
    );
    tidings_broker::serve(listener, http, config, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => info!(signal = "SIGINT", "shutdown requested"),
        _ = terminate => info!(signal = "SIGTERM", "shutdown requested"),
    }
}
