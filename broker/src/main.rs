//! `tidings-broker`: reads the configuration, sets up logging, binds and serves
//! until SIGINT or SIGTERM, then shuts down gracefully and exits 0. SIGHUP
//! reloads the TLS certificate and key. `tidings-broker hash-password` makes an
//! argon2id hash for a `[[users]]` entry.

use std::io::IsTerminal;

use anyhow::Context;
use tidings_broker::{Config, ConfigError, LogFormat};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "hash-password")
    {
        return hash_password();
    }
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
    let tls = tidings_broker::tls::Tls::from_config(&config.security)
        .context("loading the TLS certificate and key")?;
    if let Some(tls) = tls.clone() {
        tokio::spawn(reload_on_sighup(tls));
    }
    tidings_broker::serve(listener, http, config, tls, shutdown_signal()).await?;
    Ok(())
}

/// `tidings-broker hash-password`: reads a password from the first line of
/// standard input and prints its argon2id PHC string for `password_hash`.
fn hash_password() -> anyhow::Result<()> {
    use std::io::BufRead;
    if let Some(arg) = std::env::args_os().nth(2) {
        let help = arg == "--help" || arg == "-h";
        eprintln!(
            "usage: tidings-broker hash-password < password-file\n\n\
             Reads one password from the first line of standard input and prints an\n\
             argon2id hash (19 MiB, 2 passes) for the `password_hash` key of [[users]]."
        );
        std::process::exit(if help { 0 } else { 2 });
    }
    if std::io::stdin().is_terminal() {
        eprint!("password (echoed; pipe it in to keep it off the screen): ");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    let phc = tidings_broker::auth::hash_password(password)
        .map_err(anyhow::Error::msg)
        .context("hashing the password")?;
    println!("{phc}");
    Ok(())
}

/// Reloads the TLS files on each SIGHUP; a failed reload keeps the old ones.
async fn reload_on_sighup(tls: tidings_broker::tls::Tls) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGHUP; TLS reload is off");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => info!("SIGHUP: TLS certificate and key reloaded"),
                Err(err) => {
                    tracing::error!(error = %err, "SIGHUP: TLS reload failed; keeping the old certificate")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tls;
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
