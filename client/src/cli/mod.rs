//! The `tidings` command line: argument definitions (clap derive) and one function
//! per command.

mod duration;
mod output;

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use tidings_client::{
    Client, ClientBuilder, ClientTls, ConfirmOptions, Interruption, Message, Overflow, QueueConfig,
};

use duration::{parse_duration, parse_size};
use output::{display_payload, print_info, print_queue_table, print_stats};

/// Command-line client for the tidings event broker.
#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "Poke a tidings broker from the shell: publish, subscribe, request, manage durable queues, show stats"
)]
pub struct Cli {
    /// Broker address (host:port, or tls://host:port for TLS with the system's
    /// roots unless --tls-ca is given).
    #[arg(
        long,
        global = true,
        env = "TIDINGS_SERVER",
        default_value = "127.0.0.1:7878"
    )]
    server: String,
    /// Shared secret, when the broker requires one; with --user, that user's
    /// password or token.
    #[arg(long, global = true, env = "TIDINGS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// User name, for brokers with `[[users]]` (with --token, or a client
    /// certificate that names the user).
    #[arg(long, global = true, env = "TIDINGS_USER")]
    user: Option<String>,
    /// PEM file of the CA certificates to trust; turns TLS on.
    #[arg(long, global = true, env = "TIDINGS_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM file of a client certificate (mutual TLS); needs --tls-key; turns TLS on.
    #[arg(
        long,
        global = true,
        env = "TIDINGS_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(
        long,
        global = true,
        env = "TIDINGS_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish a message (the MESSAGE argument, or stdin when it is absent).
    Pub(PubArgs),
    /// Subscribe to a pattern and print `topic payload` per message.
    Sub(SubArgs),
    /// Send a request and print the reply.
    Req(ReqArgs),
    /// Answer every request on a pattern with its own payload (an echo responder).
    Reply(SubArgs),
    /// Manage durable queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Consume from a queue and print `topic payload (attempt N)` per delivery.
    Consume(ConsumeArgs),
    /// Show the broker's counters.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct PubArgs {
    /// Topic to publish to.
    topic: String,
    /// Payload; read from stdin when absent.
    message: Option<String>,
    /// A header, as KEY=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_name = "K=V")]
    headers: Vec<String>,
    /// Message id, for deduplication in queues.
    #[arg(long)]
    id: Option<String>,
    /// Deliver from queues no sooner than this (e.g. 5s).
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// Wait for the broker's durable confirm and print it. Fails (exit 1) when no
    /// queue is bound to the topic or a full queue refused the message.
    #[arg(long)]
    confirm: bool,
    /// With --confirm: a topic no queue is bound to is fine (exit 0).
    #[arg(long, requires = "confirm")]
    allow_unroutable: bool,
    /// Publish this many copies.
    #[arg(long, default_value_t = 1)]
    count: u64,
}

#[derive(Debug, Args)]
struct SubArgs {
    /// Topic pattern (`*` one token, `>` the rest).
    pattern: String,
    /// Join this group: each message goes to one member.
    #[arg(long)]
    group: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Debug, Args)]
struct ReqArgs {
    /// Topic of the request.
    topic: String,
    /// Request payload.
    message: String,
    /// How long to wait for the reply.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Create a queue (or check an existing one has these options).
    Declare(DeclareArgs),
    /// List queues.
    Ls,
    /// Show one queue's figures.
    Info {
        /// Queue name.
        name: String,
    },
    /// Delete a queue and its messages.
    Rm {
        /// Queue name.
        name: String,
    },
    /// List a queue's dead letters.
    Dlq {
        /// Queue name.
        name: String,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Move a queue's dead letters back into it.
    Redrive {
        /// Queue name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct DeclareArgs {
    /// Queue name.
    name: String,
    /// Binding patterns (repeatable, or several after one --bind).
    #[arg(long, num_args = 1.., value_name = "PATTERN")]
    bind: Vec<String>,
    /// Deliveries before a message is dead-lettered [default: 5].
    #[arg(long)]
    max_deliveries: Option<u32>,
    /// Redeliver deliveries unacked for this long, e.g. 30s [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    ack_timeout: Option<Duration>,
    /// Redelivery delays after the 1st, 2nd, … failed attempt, comma-separated, the
    /// last repeating, e.g. 1s,5s,30s [default: none, redeliver at once].
    #[arg(long, value_parser = parse_duration, value_delimiter = ',')]
    backoff: Option<Vec<Duration>>,
    /// Most messages the queue holds [default: unlimited].
    #[arg(long)]
    max_length: Option<u64>,
    /// Most payload bytes the queue holds, e.g. 64MiB or 1000000 [default: unlimited].
    #[arg(long, value_parser = parse_size)]
    max_bytes: Option<u64>,
    /// What to do when full: reject-publish or drop-head [default: reject-publish].
    #[arg(long)]
    overflow: Option<Overflow>,
    /// Expire messages older than this, e.g. 10m [default: never].
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Remember message ids this long to drop duplicates [default: 2m].
    #[arg(long, value_parser = parse_duration)]
    dedup_window: Option<Duration>,
    /// Dead-letter queue name [default: the queue's name followed by .dlq].
    #[arg(long)]
    dead_letter: Option<String>,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    /// Queue name.
    queue: String,
    /// Exit after this many deliveries. The broker is asked for no more than
    /// that, so none is taken and abandoned (each would use up a delivery attempt).
    #[arg(long)]
    count: Option<u32>,
    /// Credit window: unacked deliveries at once (at most --count).
    #[arg(long, default_value_t = 16)]
    prefetch: u32,
    /// Acknowledge each delivery (the default).
    #[arg(long, conflicts_with = "nack")]
    ack: bool,
    /// Hand each delivery back instead of acknowledging it.
    #[arg(long)]
    nack: bool,
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<()> {
    let mut builder = ClientBuilder::new(&cli.server).name("tidings-cli");
    if let Some(token) = &cli.token {
        builder = builder.token(token);
    }
    if let Some(user) = &cli.user {
        builder = builder.user(user);
    }
    if cli.tls_ca.is_some() || cli.tls_cert.is_some() {
        let mut tls = match &cli.tls_ca {
            Some(ca) => ClientTls::ca_file(ca),
            None => ClientTls::system_roots(),
        };
        if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
            tls = tls.client_cert_files(cert, key);
        }
        builder = builder.tls(tls);
    }
    // The connect error names the address already.
    let client = builder.connect().await.context("cannot reach the broker")?;
    match cli.command {
        Command::Pub(args) => publish(&client, args).await,
        Command::Sub(args) => subscribe(&client, args, false).await,
        Command::Reply(args) => subscribe(&client, args, true).await,
        Command::Req(args) => request(&client, args).await,
        Command::Queue(cmd) => queue(&client, cmd).await,
        Command::Consume(args) => consume(&client, args).await,
        Command::Stats { json } => {
            let stats = client.stats().await.context("stats failed")?;
            print_stats(&stats, json)
        }
    }
}

async fn publish(client: &Client, args: PubArgs) -> Result<()> {
    let payload = match args.message {
        Some(m) => Bytes::from(m),
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the message from stdin")?;
            Bytes::from(buf)
        }
    };
    let mut message = Message::new(args.topic.as_str(), payload);
    for header in &args.headers {
        let Some((key, value)) = header.split_once('=') else {
            bail!("header `{header}` is not KEY=VALUE");
        };
        message = message.header(key, value);
    }
    if let Some(id) = &args.id {
        message = message.id(id.as_str());
    }
    if let Some(delay) = args.delay {
        message = message.delay(delay);
    }
    let mut out = std::io::stdout().lock();
    let mut options = ConfirmOptions::new();
    if args.allow_unroutable {
        options = options.allow_unroutable();
    }
    for _ in 0..args.count {
        if args.confirm {
            let c = client
                .publish_confirmed_with(message.clone(), options)
                .await
                .context("publish failed")?;
            writeln!(
                out,
                "confirmed: queues={} rejected={} duplicate={}",
                c.queues, c.rejected, c.duplicate
            )?;
        } else {
            client
                .publish_message(message.clone())
                .await
                .context("publish failed")?;
        }
    }
    client.flush().await.context("flush failed")?;
    out.flush()?;
    Ok(())
}

async fn subscribe(client: &Client, args: SubArgs, echo: bool) -> Result<()> {
    let mut sub = match &args.group {
        Some(group) => {
            client
                .subscribe_group(args.pattern.as_str(), group.as_str())
                .await
        }
        None => client.subscribe(args.pattern.as_str()).await,
    }
    .with_context(|| format!("cannot subscribe to `{}`", args.pattern))?;
    let mut seen = 0u64;
    let mut out = std::io::stdout();
    while args.count.is_none_or(|n| seen < n) {
        let msg = match sub.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => bail!("the subscription ended (connection closed)"),
            Err(gap @ Interruption::SlowConsumer { .. }) => {
                eprintln!("warning: {gap}; reconnected and subscribed again");
                continue;
            }
            Err(gap) => {
                eprintln!("warning: {gap}");
                continue;
            }
        };
        if echo {
            if msg.reply_to_topic().is_none() {
                continue;
            }
            msg.respond(msg.payload().clone())
                .await
                .context("cannot reply")?;
        }
        seen += 1;
        writeln!(out, "{} {}", msg.topic(), display_payload(msg.payload()))?;
        out.flush()?;
    }
    client.flush().await.context("flush failed")?;
    Ok(())
}

async fn request(client: &Client, args: ReqArgs) -> Result<()> {
    let reply = client
        .request_timeout(args.topic.as_str(), args.message, args.timeout)
        .await
        .context("request failed")?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", display_payload(reply.payload()))?;
    out.flush()?;
    Ok(())
}

async fn queue(client: &Client, cmd: QueueCommand) -> Result<()> {
    let mut out = std::io::stdout();
    match cmd {
        QueueCommand::Declare(a) => {
            let mut config = QueueConfig::new(a.name.as_str());
            for pattern in &a.bind {
                config = config.bind(pattern.as_str());
            }
            if let Some(v) = a.max_deliveries {
                config = config.max_deliveries(v);
            }
            if let Some(v) = a.ack_timeout {
                config = config.ack_timeout(v);
            }
            if let Some(v) = a.backoff {
                config = config.backoff(v);
            }
            if let Some(v) = a.max_length {
                config = config.max_length(v);
            }
            if let Some(v) = a.max_bytes {
                config = config.max_bytes(v);
            }
            if let Some(v) = a.overflow {
                config = config.overflow(v);
            }
            if let Some(v) = a.ttl {
                config = config.ttl(v);
            }
            if let Some(v) = a.dedup_window {
                config = config.dedup_window(v);
            }
            if let Some(v) = &a.dead_letter {
                config = config.dead_letter(v.as_str());
            }
            client
                .declare_queue(config)
                .await
                .with_context(|| format!("cannot declare queue `{}`", a.name))?;
            writeln!(out, "declared queue {}", a.name)?;
        }
        QueueCommand::Ls => {
            let queues = client.list_queues().await.context("cannot list queues")?;
            print_queue_table(&mut out, &queues)?;
        }
        QueueCommand::Info { name } => {
            let info = client
                .queue_info(name.as_str())
                .await
                .with_context(|| format!("cannot get queue `{name}`"))?;
            print_info(&mut out, &info)?;
        }
        QueueCommand::Rm { name } => {
            client
                .delete_queue(name.as_str())
                .await
                .with_context(|| format!("cannot delete queue `{name}`"))?;
            writeln!(out, "deleted queue {name}")?;
        }
        QueueCommand::Dlq { name, limit } => {
            let letters = client
                .dead_letters(name.as_str(), limit)
                .await
                .with_context(|| format!("cannot list dead letters of `{name}`"))?;
            for l in &letters {
                writeln!(
                    out,
                    "{} {} {} attempts={} reason={}",
                    l.id,
                    l.topic,
                    display_payload(&l.payload),
                    l.attempts,
                    l.reason
                )?;
            }
        }
        QueueCommand::Redrive { name } => {
            let moved = client
                .redrive(name.as_str())
                .await
                .with_context(|| format!("cannot redrive `{name}`"))?;
            writeln!(out, "redrove {moved} message(s) into {name}")?;
        }
    }
    out.flush()?;
    Ok(())
}

async fn consume(client: &Client, args: ConsumeArgs) -> Result<()> {
    // With --count the broker sends no more than that many (the consumer's limit):
    // a delivery taken and never printed would use up one of the message's
    // attempts when it is handed back.
    let consumer = match args.count {
        Some(0) => return Ok(()),
        Some(n) => {
            client
                .consume_limited(args.queue.as_str(), args.prefetch.min(n), n)
                .await
        }
        None => client.consume(args.queue.as_str(), args.prefetch).await,
    };
    let mut consumer = consumer.with_context(|| format!("cannot consume from `{}`", args.queue))?;
    let mut out = std::io::stdout();
    let mut seen = 0u32;
    while args.count.is_none_or(|n| seen < n) {
        let delivery = match consumer.try_next().await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => bail!("the consumer ended (connection closed)"),
            Err(ended) => return Err(ended).context("the consumer ended"),
        };
        seen += 1;
        writeln!(
            out,
            "{} {} (attempt {})",
            delivery.topic(),
            display_payload(delivery.payload()),
            delivery.attempt()
        )?;
        out.flush()?;
        if args.nack {
            delivery.nack().await.context("nack failed")?;
        } else {
            delivery.ack().await.context("ack failed")?;
        }
    }
    // The broker has applied the acks and nacks once the close is answered.
    consumer.close().await.context("cancel failed")?;
    Ok(())
}
